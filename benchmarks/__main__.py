"""Command line: ``python -m benchmarks {run, plot, list}`` (run it from the repository root).

    python -m benchmarks run --suite quick                      # CPU here, CUDA where there is a GPU
    python -m benchmarks run --suite cpu-acceptance --device cpu
    python -m benchmarks run --suite gpu-goals --goals speed,memory
    python -m benchmarks run --suite full --only clip,siglip --out /tmp/bench
    python -m benchmarks plot benchmarks/results/cpu-2core/quick.json
    python -m benchmarks list                                   # ops, implementations, why some are skipped
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    from .suites import SUITES

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite; writes JSON, markdown and PNGs")
    run.add_argument("--suite", choices=SUITES, default="quick")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    run.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device-slug>/")
    run.add_argument("--name", default=None, help="file stem (default: the suite, '-custom' when filtered)")
    run.add_argument("--only", type=_names, default=None, help="ops, comma-separated (clip,siglip,...)")
    run.add_argument("--impls", type=_names, default=None, help="implementations, comma-separated")
    run.add_argument("--n", type=_ints, default=None, help="override every sweep's N values")
    run.add_argument("--d", type=_ints, default=None, help="override every sweep's D values")
    run.add_argument("--dtype", type=_names, default=None, help="override dtypes (float32,bfloat16,float16)")
    run.add_argument("--goals", type=_names, default=None, help="gpu-goals groups: speed,memory,max-batch")
    run.add_argument("--mem-isolation", choices=("case", "batch"), default="case",
                     help="CPU memory probes: a fresh process per case (default) or one for all")
    run.add_argument("--cpu-mem-cap-gb", type=float, default=4.0, help="CPU memory cap per case (GB)")
    run.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch searches")
    run.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (CUDA)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--reps", type=int, default=None, help="exactly this many timed calls per case")
    run.add_argument("--gemm-size", type=int, default=None, help="square size of the GEMM ceiling")
    run.add_argument("--copy-mb", type=int, default=None, help="buffer size of the copy-bandwidth ceiling (MiB)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    run.add_argument("--no-plots", action="store_true")
    run.set_defaults(func=_run)

    plot = sub.add_parser("plot", help="regenerate PNGs (and the markdown) from a results JSON")
    plot.add_argument("json", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="default: the JSON's folder")
    plot.set_defaults(func=_plot)

    lst = sub.add_parser("list", help="registered ops and implementations, and which run here")
    lst.add_argument("--device", choices=("cpu", "cuda"), default=None)
    lst.add_argument("--dtype", default="float32")
    lst.set_defaults(func=_list)
    return p


def _run(args) -> int:
    from . import hardware
    from .report import goal_lines, write_json, write_markdown
    from .runner import Runner, RunOptions

    device = args.device or _default_device()
    filtered = any(x is not None for x in (args.only, args.impls, args.n, args.d, args.dtype, args.goals))
    stem = args.name or (f"{args.suite}-custom" if filtered else args.suite)
    partial = {}

    def checkpoint(record: dict) -> None:
        """Keep every finished case in <stem>.partial.json until the run completes."""
        if "path" not in partial:
            partial["path"] = (args.out or RESULTS / hardware.device_slug(record["machine"])) / f"{stem}.partial.json"
        write_json(record, partial["path"])

    opts = RunOptions(
        suite=args.suite, device=device, only_ops=args.only, only_impls=args.impls, ns=args.n, dims=args.d,
        dtypes=args.dtype, goals=args.goals, mem_isolation=args.mem_isolation,
        cpu_mem_cap_bytes=int(args.cpu_mem_cap_gb * 1e9), max_batch=not args.no_max_batch, tf32=args.tf32,
        threads=args.threads, gemm_size=args.gemm_size, copy_bytes=args.copy_mb and args.copy_mb * 2**20,
        seed=args.seed, note=args.note,
        timing=None if args.reps is None else _fixed_reps(device, args.reps),
        command="python -m benchmarks " + shlex.join(sys.argv[1:] or ["run"]),
        log=lambda line: print(line, flush=True), checkpoint=checkpoint)
    record = Runner(opts).run()
    out = args.out or RESULTS / hardware.device_slug(record["machine"])
    if "path" in partial:
        partial["path"].unlink(missing_ok=True)
    write_json(record, out / f"{stem}.json")
    write_markdown(record, out / f"{stem}.md")
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    if not args.no_plots:
        from .plots import plot_record

        written += plot_record(record, out, stem)
    print("\n".join(["", *goal_lines(record["goals"])]) if record["goals"] else "")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _plot(args) -> int:
    from .plots import plot_record
    from .report import load_json, write_markdown

    record = load_json(args.json)
    if record.get("partial"):  # a checkpoint of a run that did not finish: derive what the run would have
        from .registry import discover
        from .report import derive_all

        derive_all(record, discover())
    out = args.out or args.json.parent
    paths = plot_record(record, out, args.json.stem)
    write_markdown(record, out / f"{args.json.stem}.md")
    print("wrote " + ", ".join(str(p) for p in [*paths, out / f"{args.json.stem}.md"]))
    return 0


def _list(args) -> int:
    from .cases import DTYPES
    from .registry import Context, Shape, discover

    device = args.device or _default_device()
    for name, op in sorted(discover().items()):
        reason = op.skip_reason()
        print(f"{name}: {op.title} [{op.mode}]" + (f"  -- skipped: {reason}" if reason else ""))
        ctx = Context(device, DTYPES[args.dtype], Shape(4096, 768))
        for impl in op.impls:
            why = impl.skip_reason(ctx)
            print(f"    {impl.name:<18} {impl.kind:<10} {'runs' if why is None else 'skipped: ' + why}")
    return 0


def _fixed_reps(device: str, reps: int) -> dict:
    """Timer options for exactly `reps` timed calls."""
    if device == "cuda":
        return {"min_reps": reps, "max_reps": reps, "rep_ms": 0.0, "warmup_ms": 0.0}
    return {"min_reps": reps, "max_reps": reps, "budget_s": 0.0}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    return [int(t.replace("_", "")) for t in _names(text)]


if __name__ == "__main__":
    sys.exit(main())
