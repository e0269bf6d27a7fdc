"""The losses on torch.distributed (gloo, CPU): time and peak memory per rank against open_clip.

For each world size W and implementation, W ranks are spawned on loopback, each holding n = N/W rows
of a global batch (float32). Each rank runs one small warm-up step, then `--repeat` timed
forward + backward steps; before each, garbage is collected, glibc's free pages are returned, the
peak-RSS counter is reset (``5 > /proc/self/clear_refs``) and the ranks meet at a barrier. Reported:
the slowest rank's best time, and the largest extra peak (VmHWM minus the RSS before the step) over
the ranks. Every (W, implementation) runs in fresh processes.

Implementations, with the options open_clip users run at scale (local_loss + gather_with_grad;
SigLIP with every dist_impl):
    clip    open_clip ClipLoss | pyclipfast.ClipLoss (chunked torch) | pyclipfast.distributed.clip_loss
    siglip  open_clip SigLipLoss | pyclipfast.SigLipLoss, each dist_impl | pyclipfast.distributed.siglip_loss

    python -m benchmarks.bench_distributed                      # N=16384 D=256, W = 2 and 4, both losses
    python -m benchmarks.bench_distributed --n 2048 --worlds 2 --losses clip --repeat 1 --no-write

Results go to benchmarks/results/<machine>/distributed.json, and the table into the block between
the markers of distributed.md next to it (the rest of that file is prose kept by hand).

    python -m benchmarks.bench_distributed --cost-model      # the per-rank cost model on W GPUs (no run)
    python -m benchmarks.bench_distributed --memory          # bytes per rank at fixed n, W = 2, 4, 8

--cost-model writes the cost model (`cost_model`: FLOPs, bytes sent, extra memory per rank) into the
second marked block of benchmarks/results/cpu-2core/distributed.md; --memory counts the peak bytes
of the tensors one forward + backward creates on each rank (`LiveBytes`, a counter: no timing, no
RSS) for pyclipfast.ClipLoss and open_clip's ClipLoss (local_loss + gather_with_grad) at a fixed
per-rank batch, into the third block.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.hardware import device_slug, machine_info
from benchmarks.memory import malloc_trim, proc_status_bytes, reset_peak_rss

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- bench_distributed:begin -->", "<!-- bench_distributed:end -->"
MODEL_BEGIN, MODEL_END = "<!-- cost_model:begin -->", "<!-- cost_model:end -->"
MEMORY_BEGIN, MEMORY_END = "<!-- memory_in_w:begin -->", "<!-- memory_in_w:end -->"
SCALE, BIAS, WARMUP_ROWS = 14.3, -10.0, 64
CLIP_OPTIONS = "local_loss+gather_with_grad"
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def cases(loss: str):
    """(implementation, variant) pairs of one loss; a variant's open_clip run is its baseline."""
    variants = (CLIP_OPTIONS,) if loss == "clip" else DIST_IMPLS
    for variant in variants:
        yield "open_clip", variant
        yield "pyclipfast", variant
    yield "pyclipfast.distributed", variants[0]


def _loss_fn(loss: str, implementation: str, variant: str, rank: int, world: int) -> Callable:
    """(image, text, scale, bias) -> loss for one rank."""
    import pyclipfast as pcf
    from pyclipfast import distributed as pcd

    if implementation == "pyclipfast.distributed":
        if loss == "clip":
            return lambda a, b, s, bias: pcd.clip_loss(a, b, s, backend="torch")
        return lambda a, b, s, bias: pcd.siglip_loss(a, b, s, bias, backend="torch")
    if implementation == "open_clip":
        from open_clip import loss as library
        backend = {}
    else:
        library, backend = pcf, dict(backend="torch")
    if loss == "clip":
        module = library.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, **backend)
        return lambda a, b, s, bias: module(a, b, s)
    return library.SigLipLoss(rank=rank, world_size=world, dist_impl=variant, **backend)


def _rank(rank: int, world: int, loss: str, implementation: str, variant: str, args: argparse.Namespace,
          rendezvous: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=20))
    fn = _loss_fn(loss, implementation, variant, rank, world)
    g = torch.Generator().manual_seed(rank)
    image, text = (F.normalize(torch.randn(args.n // world, args.d, generator=g), dim=-1) for _ in range(2))

    def step(rows: int) -> float:
        a, b = image[:rows].clone().requires_grad_(), text[:rows].clone().requires_grad_()
        scale, bias = torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True)
        value = fn(a, b, scale, bias)
        value.backward()
        return float(value.detach())

    step(WARMUP_ROWS)
    times, peaks = [], []
    for _ in range(args.repeat):
        gc.collect()
        malloc_trim()
        base = proc_status_bytes("VmRSS")
        reset_peak_rss()
        dist.barrier()
        start = time.perf_counter()
        value = step(image.shape[0])
        times.append(time.perf_counter() - start)
        peaks.append(proc_status_bytes("VmHWM") - base)
    dist.destroy_process_group()
    result = dict(seconds=min(times), extra_peak_bytes=max(peaks), vm_hwm_bytes=proc_status_bytes("VmHWM"),
                  loss=value, threads=torch.get_num_threads())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_case(loss: str, implementation: str, variant: str, world: int, args: argparse.Namespace) -> Dict:
    """Spawn `world` ranks for one implementation; the slowest rank's time, the largest peak."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(world, loss, implementation, variant, args, os.path.join(out_dir, "rendezvous"),
                              out_dir), nprocs=world)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    return dict(loss=loss, implementation=implementation, variant=variant, world_size=world, n_global=args.n,
                rows_per_rank=args.n // world, dim=args.d, dtype="float32", threads_per_rank=ranks[0]["threads"],
                seconds=max(r["seconds"] for r in ranks),
                extra_peak_bytes_per_rank=max(r["extra_peak_bytes"] for r in ranks),
                vm_hwm_bytes_per_rank=max(r["vm_hwm_bytes"] for r in ranks),
                loss_rank0=ranks[0]["loss"])


def markdown_table(results: List[Dict]) -> str:
    lines = ["| loss | W | n per rank | implementation | options | time (s, slowest rank) "
             "| extra peak per rank (MiB) | vs open_clip (time, memory) | loss on rank 0 |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        base = next(b for b in results if b["loss"] == r["loss"] and b["world_size"] == r["world_size"]
                    and b["implementation"] == "open_clip" and b["variant"] == r["variant"])
        ratio = (f"{r['seconds'] / base['seconds']:.2f}×, "
                 f"{100 * r['extra_peak_bytes_per_rank'] / base['extra_peak_bytes_per_rank']:.1f}%")
        options = "" if r["implementation"] == "pyclipfast.distributed" else r["variant"]
        lines.append(f"| {r['loss']} | {r['world_size']} | {r['rows_per_rank']} | {r['implementation']} | {options} "
                     f"| {r['seconds']:.2f} | {r['extra_peak_bytes_per_rank'] / 2**20:.1f} | {ratio} "
                     f"| {r['loss_rank0']:.6f} |")
    return "\n".join(lines)


def write(results: List[Dict], info: Dict, args: argparse.Namespace) -> Path:
    folder = RESULTS / device_slug(info)
    folder.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_distributed " + " ".join(sys.argv[1:])
    (folder / "distributed.json").write_text(json.dumps(
        dict(command=command.strip(), machine=info, torch=torch.__version__, results=results), indent=2) + "\n")
    block = (f"{BEGIN}\n`{command.strip()}` — {info['cpu_cores']} cores, load average before the run "
             f"{info['load_average'][0]:.1f}, gloo on loopback, fp32, D={args.d}, best of {args.repeat}.\n\n"
             f"{markdown_table(results)}\n{END}")
    md = folder / "distributed.md"
    text = md.read_text() if md.exists() else f"# torch.distributed on {device_slug(info)}\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    md.write_text(head + block + rest.split(END, 1)[1])
    return folder


# --------------------------------------------------------------------------- bytes per rank, counted

class LiveBytes(TorchDispatchMode):
    """Peak bytes held at once by the tensors created while it is active (``with LiveBytes() as c``).

    Every op's output that owns new storage is counted until its tensor is freed (views and
    in-place results are not new storage). A counter, so it does not depend on the machine's
    load or on the allocator; it sees tensors only, not the communication library's buffers.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in inputs:
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, storage.nbytes())
        return out


def counted_peak(module, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> int:
    """Peak tensor bytes of one forward + backward of module(image, text, scale) on this rank."""
    with LiveBytes() as counter:
        loss = module(image, text, scale)
        loss.backward()
        del loss
    return counter.peak


def _memory_rank(rank: int, world: int, args: argparse.Namespace, rendezvous: str, out_dir: str) -> None:
    import pyclipfast as pcf
    from open_clip import loss as oc

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    g = torch.Generator().manual_seed(rank)
    image, text = (F.normalize(torch.randn(args.n, args.d, generator=g), dim=-1) for _ in range(2))
    options = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    peaks = {}
    for name, module in (("pyclipfast", pcf.ClipLoss(backend="torch", **options)), ("open_clip", oc.ClipLoss(**options))):
        a, b, scale = image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(SCALE).requires_grad_()
        peaks[name] = counted_peak(module, a, b, scale)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(peaks))


def memory_in_w(args: argparse.Namespace) -> List[Dict]:
    """Counted peak bytes per rank (the largest over ranks) for W = args.worlds at n = args.n."""
    results = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(_memory_rank, args=(world, args, os.path.join(out_dir, "rendezvous"), out_dir), nprocs=world)
            ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
        for name in ranks[0]:
            results.append(dict(implementation=name, world_size=world, rows_per_rank=args.n, dim=args.d,
                                n_global=world * args.n, peak_bytes_per_rank=max(r[name] for r in ranks)))
        print(f"W={world}: " + ", ".join(f"{r['implementation']} {r['peak_bytes_per_rank'] / 2**20:.2f} MiB"
                                         for r in results[-2:]), flush=True)
    return results


def memory_markdown(results: List[Dict], args: argparse.Namespace) -> str:
    command = "python -m benchmarks.bench_distributed " + " ".join(sys.argv[1:])
    lines = [f"`{command.strip()}` — fp32, n = {args.n} rows per rank, D = {args.d}, ClipLoss(local_loss, "
             "gather_with_grad), peak bytes of the tensors one forward + backward creates on a rank (counted, "
             "the largest rank). The gathered texts and their gradient, 2·N·D·4 B, are the part that grows "
             "with W at fixed n.", "",
             "| W | N | implementation | peak per rank (MiB) | minus 2·N·D·4 B (MiB) | growth per added rank (MiB) |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in results:
        first = next(f for f in results if f["implementation"] == r["implementation"])
        features = 2 * r["n_global"] * r["dim"] * 4
        steps = r["world_size"] - first["world_size"]
        growth = "" if steps == 0 else f"{(r['peak_bytes_per_rank'] - first['peak_bytes_per_rank']) / steps / 2**20:.2f}"
        lines.append(f"| {r['world_size']} | {r['n_global']:,} | {r['implementation']} "
                     f"| {r['peak_bytes_per_rank'] / 2**20:.2f} | {(r['peak_bytes_per_rank'] - features) / 2**20:.2f} "
                     f"| {growth} |")
    return "\n".join(lines)


def _write_block(begin: str, end: str, body: str) -> Path:
    md = RESULTS / "cpu-2core" / "distributed.md"
    text = md.read_text()
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    md.write_text(head + f"{begin}\n{body}\n{end}" + rest.split(end, 1)[1])
    return md


# --------------------------------------------------------------------------- cost model (no run)

COST_WORLDS, COST_BATCHES, COST_DIM, COST_BYTES = (8, 64, 512), (2**16, 2**20, 2**23), 768, 2   # bf16
GEMM_TFLOPS = 780          # dense bf16 GEMM measured on the project's H200 (770-800 TFLOP/s)
NVLINK_GBPS = 450          # NVLink 4 (H100/H200 SXM), 900 GB/s both directions: published rate, one direction
INFINIBAND_GBPS = 50       # one 400 Gb/s NDR InfiniBand port per GPU: published rate, one direction
TRAINER_MODEL = "ViT-L-14"  # open_clip's config with embed_dim 768


def _trainer_model() -> Dict:
    """Parameters and forward FLOPs per sample (2·params·tokens, attention scores left out) of
    TRAINER_MODEL, built on the meta device from open_clip's config."""
    import open_clip

    cfg = open_clip.get_model_config(TRAINER_MODEL)
    with torch.device("meta"):
        model = open_clip.model.CLIP(**cfg)
    vision = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    text_cfg, vision_cfg = cfg["text_cfg"], cfg["vision_cfg"]
    image_tokens = (vision_cfg["image_size"] // vision_cfg["patch_size"]) ** 2 + 1
    text_matmul = total - vision - text_cfg["vocab_size"] * text_cfg["width"]   # embeddings are lookups
    return dict(name=TRAINER_MODEL, params=total,
                forward_flops=2 * vision * image_tokens + 2 * text_matmul * text_cfg["context_length"])


def cost_model(world: int, n_global: int, dim: int = COST_DIM, b: int = COST_BYTES,
               model: Optional[Dict] = None) -> Dict[str, Dict[str, float]]:
    """Per rank, per training step (forward + backward): FLOPs, bytes sent, extra memory (bytes).

    Ring collectives: an all-gather or reduce-scatter of a tensor of X bytes in total sends
    (W−1)/W·X from each rank, an all-reduce twice that. Statistics are fp32 (4 B); kernels
    accumulate the gathered columns' gradient in fp32 before casting it.
    """
    n, share = n_global // world, (world - 1) / world
    features = n_global * dim * b                        # one gathered (N, D) tensor
    column_stats = 4 * n_global * share * (2 + 1 + 1)      # max all-reduce, reduce-scatter, its all-gather
    fused_memory = features + n_global * dim * 4 + features + 8 * 4 * n_global
    rows = {
        "pyclipfast.distributed.clip_loss = pyclipfast.ClipLoss": dict(
            flops=8 * n * n_global * dim, sent=2 * share * features + column_stats, memory=fused_memory),
        "open_clip ClipLoss(local_loss, gather_with_grad)": dict(
            flops=12 * n * n_global * dim, sent=4 * share * features,
            memory=2 * features + 2 * n * n_global * (b + 4 + 4)),
        "pyclipfast.distributed.siglip_loss": dict(
            flops=6 * n * n_global * dim, sent=2 * share * features, memory=fused_memory),
        # every block keeps its texts' gradient; one sum of the image gradients; two text blocks in flight
        "pyclipfast.SigLipLoss (ring, any dist_impl)": dict(
            flops=6 * n * n_global * dim, sent=2 * share * features, memory=features + 3 * n * dim * b),
        "open_clip SigLipLoss (ring)": dict(
            flops=6 * n * n_global * dim, sent=2 * share * features, memory=features + n * n_global * (b + 4 + 4)),
    }
    if model is not None:
        # Gradient caching: a no-grad forward, then forward + backward (2×) chunk by chunk; a fp32
        # gradient all-reduce; cached embeddings and their gradients, fp32 weights, gradients, Adam.
        loss = rows["pyclipfast.distributed.clip_loss = pyclipfast.ClipLoss"]
        rows[f"trainer step: {model['name']} + clip_loss, gradient caching, DDP"] = dict(
            flops=loss["flops"] + 4 * model["forward_flops"] * n,
            sent=loss["sent"] + 2 * share * model["params"] * 4,
            memory=loss["memory"] + 2 * 2 * n * dim * b + 16 * model["params"])
    return rows


def cost_model_markdown(model: Dict) -> str:
    lines = [f"`python -m benchmarks.bench_distributed --cost-model` — D = {COST_DIM}, bf16 features, per rank "
             f"and training step. Times are lower bounds: FLOPs at {GEMM_TFLOPS} TFLOP/s (dense bf16 GEMM "
             f"measured on an H200), bytes at the published link rates {NVLINK_GBPS} GB/s (NVLink 4, W = 8 "
             f"in one node) and {INFINIBAND_GBPS} GB/s (one 400 Gb/s InfiniBand port per GPU, W > 8), not "
             f"NCCL measurements. Trainer: {model['name']}, {model['params'] / 1e6:.1f} M parameters, "
             f"{model['forward_flops'] / 1e9:.0f} GFLOP forward per pair; activation memory of one "
             f"gradient-caching chunk not included.", "",
             "| path | W | N | n per rank | TFLOP | compute (ms) | GB sent | comm (ms) | extra memory (GB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for world in COST_WORLDS:
        rate = NVLINK_GBPS if world <= 8 else INFINIBAND_GBPS
        for n_global in COST_BATCHES:
            for path, c in cost_model(world, n_global, model=model).items():
                lines.append(f"| {path} | {world} | {n_global:,} | {n_global // world:,} | {c['flops'] / 1e12:,.1f} "
                             f"| {c['flops'] / (GEMM_TFLOPS * 1e9):,.1f} | {c['sent'] / 1e9:,.2f} "
                             f"| {c['sent'] / (rate * 1e6):,.1f} | {c['memory'] / 1e9:,.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384, help="global batch size")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--losses", nargs="+", choices=("clip", "siglip"), default=["clip", "siglip"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--cost-model", action="store_true", help="write the per-rank cost model and exit")
    parser.add_argument("--memory", action="store_true",
                        help="count the peak bytes per rank at fixed n (--n is then the per-rank batch)")
    args = parser.parse_args()
    if args.cost_model:
        print(f"written to {_write_block(MODEL_BEGIN, MODEL_END, cost_model_markdown(_trainer_model()))}")
        return
    if args.memory:
        body = memory_markdown(memory_in_w(args), args)
        print(body if args.no_write else f"written to {_write_block(MEMORY_BEGIN, MEMORY_END, body)}")
        return
    if any(args.n % w for w in args.worlds):
        parser.error(f"--n {args.n} must divide by every world size {args.worlds}")
    info = machine_info("cpu")
    results = []
    for loss in args.losses:
        for world in args.worlds:
            for implementation, variant in cases(loss):
                results.append(run_case(loss, implementation, variant, world, args))
                r = results[-1]
                print(f"{loss:6s} W={world} {implementation:24s} {variant:28s} {r['seconds']:8.2f} s "
                      f"{r['extra_peak_bytes_per_rank'] / 2**20:9.1f} MiB/rank  loss {r['loss_rank0']:.6f}",
                      flush=True)
    print(markdown_table(results))
    if not args.no_write:
        print(f"written to {write(results, info, args)}")


if __name__ == "__main__":
    main()
