"""CPU fwd+bwd of distill_loss: the chunked torch backend against the materialised reference.

Each implementation runs in a fresh process: the inputs are built, the peak-RSS
counter is reset (``5 > /proc/self/clear_refs``), one forward + backward is timed,
and the extra peak memory is VmHWM minus the RSS before the call.

    python benchmarks/bench_distill_cpu.py                     # N=8192 D=256 Dt=256, margin 0.1, filter 0.5, kl
    python benchmarks/bench_distill_cpu.py --n 4096 --repeat 3
    python benchmarks/bench_distill_cpu.py --margin 0 --threshold none --kd ce   # open_clip's DistillClipLoss objective
    OMP_NUM_THREADS=1 python benchmarks/bench_distill_cpu.py                    # one core
    python benchmarks/bench_distill_cpu.py --repeat 3 --out benchmarks/results/cpu-2core   # + distill-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = {"fused": "torch", "materialised": "reference"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pyclipfast as pcf

    torch.manual_seed(0)
    a, b = torch.randn(args.n, args.d), torch.randn(args.n, args.d)
    ta, tb = torch.randn(args.n, args.dt), torch.randn(args.n, args.dt)
    options = dict(margin=args.margin, false_negative_threshold=args.threshold, kd=args.kd,
                   backend=IMPLEMENTATIONS[args.worker])

    def step(rows):
        x, y = a[:rows].detach().requires_grad_(), b[:rows].detach().requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        contrastive, distill = pcf.distill_loss(x, y, ta[:rows], tb[:rows], scale, 20.0, **options)
        (contrastive + distill).backward()
        return float(contrastive + distill)

    step(256)  # warm-up: imports, kernels, allocator
    times, cpu_times, extra = [], [], []
    for _ in range(args.repeat):
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(args.n)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        extra.append((_status_kib("VmHWM") - before) / 1024)
    return dict(implementation=args.worker, seconds=min(times), cpu_seconds=min(cpu_times),
                extra_peak_mib=max(extra), loss=loss, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dt", type=int, default=256)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--threshold", type=lambda v: None if v == "none" else float(v), default=0.5,
                        help="false-negative threshold, or 'none' for no filter")
    parser.add_argument("--kd", choices=("kl", "ce"), default="kl")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, help="folder for distill-cpu.json and distill-cpu.md")
    parser.add_argument("--worker", choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results, load_before, started = {}, os.getloadavg(), time.time()
    for name in IMPLEMENTATIONS:
        cmd = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
        results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    fused, materialised = results["fused"], results["materialised"]
    lines = [f"distill_loss fwd+bwd, CPU float32, N={args.n} D={args.d} Dt={args.dt}, margin={args.margin} "
             f"threshold={args.threshold} kd={args.kd}, {fused['threads']} threads, best of {args.repeat}"]
    for name, r in results.items():
        lines.append(f"  {name:13s} {r['seconds']:7.2f} s wall {r['cpu_seconds']:7.2f} s cpu   "
                     f"extra peak {r['extra_peak_mib']:8.1f} MiB   loss {r['loss']:.6f}")
    ratios = dict(wall=fused["seconds"] / materialised["seconds"],
                  cpu=fused["cpu_seconds"] / materialised["cpu_seconds"],
                  memory=fused["extra_peak_mib"] / materialised["extra_peak_mib"])
    lines.append(f"  fused / materialised: wall {ratios['wall']:.2f}x, cpu {ratios['cpu']:.2f}x, "
                 f"extra memory {100 * ratios['memory']:.1f}%")
    print("\n".join(lines))
    if args.out:
        _write(args, results, ratios, lines, load_before, started)


def _write(args, results, ratios, lines, load_before, started) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.hardware import machine_info, versions

    machine, software = machine_info("cpu"), versions()  # machine_info's load average is the one at the end
    command = "python benchmarks/bench_distill_cpu.py " + shlex.join(
        a for a in sys.argv[1:] if not a.startswith("--out") and a != str(args.out))
    record = dict(command=command.strip(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  machine=dict(machine, load_average_before=list(load_before)), software=software,
                  args={k: v for k, v in vars(args).items() if k not in ("out", "worker")},
                  results=results, fused_over_materialised=ratios,
                  goal=dict(shape="N=8192 D=Dt=256", time="<= 0.5x", memory="<= 5%",
                            met=(ratios["wall"] <= 0.5 and ratios["memory"] <= 0.05)
                            if (args.n, args.d, args.dt) == (8192, 256, 256) else None))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    load = lambda t: "/".join(f"{x:.2f}" for x in t)  # noqa: E731
    md = ["# distill_loss on the CPU: fused (chunked torch backend) vs materialised (reference backend)", "",
          f"- Command: `{record['command']}` ({record['started']}, commit {software['git_commit'][:12]})",
          f"- Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores; load average {load(load_before)} "
          f"before, {load(machine['load_average'])} after",
          f"- Software: Python {software['python']}, torch {software['torch']}",
          "- Each implementation runs in a fresh process; one forward + backward (gradients of the student "
          "features and scale), best wall time of the repeats; extra peak = VmHWM − RSS before the call.",
          f"- Goal (at N=8192 D=Dt=256): fused ≤ 0.5× the time and ≤ 5% of the extra memory of the "
          f"materialised implementation: **{ {True: 'met', False: 'not met', None: 'n/a at this shape'}[record['goal']['met']]}**",
          "", "```", *lines, "```", ""]
    (args.out / "distill-cpu.md").write_text("\n".join(md))

if __name__ == "__main__":
    main()
