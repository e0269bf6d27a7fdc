"""Time per training step of the CPU demo's model, eager vs torch.compile(fullgraph=True).

The step is the demo's (``--preset cpu-demo``: open_clip model pcf-tiny-48, pyclipfast.ClipLoss,
fp32) on one batch of random images and captions: forward of both towers, the fused loss,
``loss.backward()`` inside the compiled function (Dynamo's ``trace_autograd_ops``) and an AdamW
step outside it. The compiled step uses Inductor; the first call (compilation) is reported apart
from the steady-state steps, of which the median is reported.

    python benchmarks/bench_compile_cpu.py                       # batch 128 (the demo's chunk), 8 steps
    python benchmarks/bench_compile_cpu.py --batch 256 --steps 5
    python benchmarks/bench_compile_cpu.py --out benchmarks/results/cpu-2core   # + compile-step.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyclipfast  # noqa: E402
from benchmarks.hardware import machine_info, versions  # noqa: E402
from pyclipfast.train.model import create_model  # noqa: E402

MODEL = "pcf-tiny-48"


def make_step(model, loss_fn):
    def step(images, texts):
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss.detach()
    return step


def run(step, model, batches, steps: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, losses = [], []
    for i in range(steps + 1):
        images, texts = batches[i % len(batches)]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step(images, texts)))
        opt.step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": times[0], "median_step_s": statistics.median(times[1:]), "step_s": times[1:],
            "losses": losses}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="folder for compile-step.{json,md}")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1:
        parser.error("--batch must be >= 2 and --steps >= 1")

    torch.manual_seed(0)
    model = create_model(MODEL, "clip", torch.device("cpu"))
    model.output_dict = True
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = model.context_length
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, size, size, generator=g),
                torch.randint(1, model.vocab_size, (args.batch, context), generator=g)) for _ in range(2)]

    eager_model = copy.deepcopy(model)
    eager = run(make_step(eager_model, pyclipfast.ClipLoss()), eager_model, batches, args.steps)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_step = torch.compile(make_step(model, pyclipfast.ClipLoss()), fullgraph=True)
        compiled = run(compiled_step, model, batches, args.steps)
    result = {
        "command": "python benchmarks/bench_compile_cpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": MODEL, "batch": args.batch, "steps": args.steps, "loss": "pyclipfast.ClipLoss (torch backend)",
        "machine": machine_info("cpu"), "versions": versions(),
        "eager": eager, "compiled": compiled,
        "speedup": eager["median_step_s"] / compiled["median_step_s"],
        "max_loss_difference": max(abs(x - y) for x, y in zip(eager["losses"], compiled["losses"])),
    }
    print(f"{MODEL}, batch {args.batch}: eager {eager['median_step_s'] * 1e3:.0f} ms/step, compiled "
          f"{compiled['median_step_s'] * 1e3:.0f} ms/step ({result['speedup']:.2f}x), first compiled call "
          f"{compiled['first_step_s']:.1f} s, largest loss difference {result['max_loss_difference']:.2e}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile-step.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "compile-step.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    e, c = r["eager"], r["compiled"]
    return "\n".join([
        f"# Training step of {r['model']}, eager vs torch.compile(fullgraph=True)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['name']}, {r['machine']['cpu_cores']} cores (the development VM, shared; "
        f"load average {r['machine']['load_average'][0]:.1f} when the run ended)  ",
        f"Versions: python {r['versions']['python']}, torch {r['versions']['torch']}, "
        f"pyclipfast commit {r['versions']['git_commit'][:8]}",
        "",
        f"Batch {r['batch']}, fp32, {r['loss']}, AdamW; median of {r['steps']} steps after the first.",
        "",
        "| | first step | median step |",
        "| --- | ---: | ---: |",
        f"| eager | {e['first_step_s']:.2f} s | {e['median_step_s'] * 1e3:.0f} ms |",
        f"| compiled (Inductor) | {c['first_step_s']:.1f} s (compilation) | {c['median_step_s'] * 1e3:.0f} ms |",
        "",
        f"Speed-up {r['speedup']:.2f}x; largest difference between the eager and compiled losses "
        f"{r['max_loss_difference']:.2e}. Steps after the first, eager: "
        f"{', '.join(f'{t:.2f}' for t in e['step_s'])} s; compiled: {', '.join(f'{t:.2f}' for t in c['step_s'])} s.",
        "",
    ])


if __name__ == "__main__":
    main()
