"""CPU time of the losses when the scores spread wider than float32's exp range (the trained regime).

float32 exp on the CPU leaves its vector path for arguments below about −87.3, and products of
exponentials just above that with the features make the gradient matmuls subnormal: both run tens
of times slower. A trained CLIP model at logit scale 100 puts most negatives that far below their
row's positive, so every exp-based loss meets it. The chunked backend floors such arguments
(pyclipfast/chunked/_tiles.py, EXP_FLOOR); this benchmark times one forward + backward of each loss

    open_clip            open_clip.loss (ClipLoss, SigLipLoss; materialised, as users run it)
    pyclipfast           the chunked backend (backend="torch")
    pyclipfast, no floor the same with the floor switched off (what the floor saves)

on two kinds of unit features: "random" (independent images and texts, scale 14.3: scores within
±15) and "trained" (text i a close copy of image i, scale 100: positives ~95, negatives ~0 ± 20).

    python -m benchmarks.bench_score_spread                  # N=2048 D=256, all threads, best of 2
    python -m benchmarks.bench_score_spread --n 1024 --no-write
    python -m benchmarks.bench_score_spread --out benchmarks/results/cpu-2core   # + score-spread.{json,md}
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .hardware import REPO_ROOT, device_slug, machine_info, versions

REGIMES = {"random": 14.3, "trained": 100.0}
SIGLIP_BIAS = -10.0


def unit_features(n: int, d: int, regime: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    noise = torch.randn(n, d, generator=g)
    if regime == "random":
        return image, F.normalize(noise, dim=-1)
    return image, F.normalize(image + 0.3 * noise / d ** 0.5, dim=-1)


def losses() -> Dict[str, Dict[str, Callable]]:
    """loss -> implementation -> fn(image, text, scale) returning the scalar loss."""
    import pyclipfast as pcf
    from open_clip import loss as oc

    bias = lambda: torch.tensor(SIGLIP_BIAS, requires_grad=True)
    return {
        "clip": {
            "open_clip": lambda a, b, s: oc.ClipLoss()(a, b, s),
            "pyclipfast": lambda a, b, s: pcf.clip_loss(a, b, s, backend="torch"),
        },
        "siglip": {
            "open_clip": lambda a, b, s: oc.SigLipLoss()(a, b, s, bias()),
            "pyclipfast": lambda a, b, s: pcf.siglip_loss(a, b, s, bias(), backend="torch"),
        },
        "distill": {  # open_clip's DistillClipLoss objective; the teacher is the student's features
            "open_clip": lambda a, b, s: sum(oc.DistillClipLoss()(a, b, s, a.detach(), b.detach(), s.detach())),
            "pyclipfast": lambda a, b, s: sum(pcf.distill_loss(a, b, a.detach(), b.detach(), s, s.detach(),
                                                               kd="ce", backend="torch")),
        },
    }


def time_step(fn: Callable, image: torch.Tensor, text: torch.Tensor, scale: float, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
        s = torch.tensor(scale, requires_grad=True)
        start = time.perf_counter()
        fn(a, b, s).backward()
        best = min(best, time.perf_counter() - start)
    return best


def run(args) -> List[dict]:
    from pyclipfast.chunked import _tiles

    rows = []
    floor = _tiles.EXP_FLOOR
    for regime, scale in REGIMES.items():
        image, text = unit_features(args.n, args.d, regime)
        s = scale * image.double() @ text.double().T
        deep = float(((s - s.amax(1, keepdim=True)) < -87.3).double().mean())
        for loss, impls in losses().items():
            if loss not in args.losses:
                continue
            times = {}
            for name, fn in impls.items():
                fn(image[:64], text[:64], torch.tensor(scale))  # warm-up
                times[name] = time_step(fn, image, text, scale, args.repeat)
                if name == "pyclipfast":
                    _tiles.EXP_FLOOR = -math.inf
                    try:
                        times["pyclipfast, no floor"] = time_step(fn, image, text, scale, args.repeat)
                    finally:
                        _tiles.EXP_FLOOR = floor
            for name, seconds in times.items():
                row = dict(loss=loss, regime=regime, scale=scale, implementation=name, seconds=seconds,
                           vs_open_clip=seconds / times["open_clip"], deep_fraction=deep)
                rows.append(row)
                print(f"{loss:8s} {regime:8s} s={scale:5.1f} {name:22s} {seconds:7.3f} s  "
                      f"{row['vs_open_clip']:.2f}× open_clip")
    return rows


HEADER = """# Losses on widely spread scores (CPU)

float32 exp on the CPU leaves its vector path for arguments below about −87.3, and exponentials just
above that, multiplied by the features in the gradient matmuls, give subnormal products: both run
tens of times slower. "random" features (independent unit vectors, scale 14.3) keep every score
within ±15; "trained" ones (text i a close copy of image i, scale 100) put the negatives ~95 below
their row's positive, as a trained CLIP model does. "pyclipfast" is the chunked backend as shipped
(arguments that can reach the slow range are floored at −64, `pyclipfast/chunked/_tiles.py`);
"no floor" is the same code with the floor switched off. SigLIP's bias of −10 keeps its arguments
in range on both kinds of features.

"""


def markdown(rows: List[dict], info: dict, command: str) -> str:
    lines = [
        f"`{command}` — {info['cpu_model']}, {info['cpu_cores']} cores, {info['torch_threads']} threads, "
        f"load average before the run {info['load_average'][0]:.1f}; fp32, one forward + backward, best of the runs.",
        "",
        "| loss | features | scale | scores > 87.3 below their row's max | implementation | time (s) | vs open_clip |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['regime']} | {r['scale']:g} | {100 * r['deep_fraction']:.0f}% | "
                     f"{r['implementation']} | {r['seconds']:.3f} | {r['vs_open_clip']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["clip", "siglip", "distill"],
                        choices=["clip", "siglip", "distill"])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    info = machine_info("cpu")
    rows = run(args)
    if args.no_write:
        return
    out = args.out or REPO_ROOT / "benchmarks" / "results" / device_slug(info)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_score_spread" + "".join(
        f" --{k} {v}" for k, v in (("n", args.n), ("d", args.d), ("repeat", args.repeat))
        if v != parser.get_default(k))
    (out / "score-spread.json").write_text(json.dumps(dict(machine=info, versions=versions(), command=command,
                                                           rows=rows), indent=1))
    (out / "score-spread.md").write_text(HEADER + markdown(rows, info, command))
    print(f"wrote {out / 'score-spread.md'}")


if __name__ == "__main__":
    main()
