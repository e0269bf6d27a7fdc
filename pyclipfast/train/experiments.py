"""The methods' results table: every variant, several seeds, equal compute, one command.

    python -m pyclipfast.train experiments --preset quick --out benchmarks/results/cpu-2core/methods
    python -m pyclipfast.train experiments --preset full --out benchmarks/results/h100/methods   # one GPU

Variants (each trained for the same steps on the same batch size, so every student sees the same
number of image–caption pairs; their wall time is reported beside their results):

    baseline         InfoNCE on the short captions
    clipc            + CLIP-C compositions (--clipc-rate)
    clipin           + CLIPin (--clipin, λ_inter = λ_intra = 1, m = 0.95)
    distill          + distillation from a larger teacher (--teacher), trained first by this command
                       (one teacher, seed 0, twice the student's steps; its own results are a row)
    detailed         detailed captions instead of short ones
    sentences        sentence sampling from the detailed captions
    omit-colour-r    --omit colour=r      (selection bias), r in the preset's rates
    perturb-colour-r --perturb colour=r   (perturbation bias)

Every run is evaluated the same way from its final checkpoint, whatever it trained on: retrieval
recall@1 on the short and on the detailed val captions, the compositional probe, the attribute
probe and zero-shot accuracy. Outputs in --out: methods.json (settings, machine, every run, mean
± std per variant), methods.md (the tables) and methods.png (the plot). Runs live in --work;
a finished run is not trained again, so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .attribute_probe import AttributeProbe
from .batches import synthetic_split
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .evaluate import SyntheticEvaluation, evaluate
from .model import create_model, create_tokenizer, image_size

PRESETS: dict[str, dict[str, Any]] = {
    # 2-core CPU: a 0.6M-parameter-tower student (context 40: detailed captions and two short
    # captions joined by CLIP-C fit), 150 steps of 128 pairs; a 4-layer teacher.
    "quick": dict(student="pcf-micro-32-ctx40", teacher="pcf-mini-32-ctx40", device="cpu", precision="fp32",
                  train_size=8192, val_size=500, batch_size=128, chunk_size=None, steps=150, teacher_steps=300,
                  lr=2e-3, warmup=15, seeds=3, rates=(0.25, 0.5, 0.75), workers=0),
    # One GPU (not run yet): 64×64 images, the GPU preset's model as the teacher, 5 seeds. The
    # synthetic images are rendered on the CPU, so the loader's workers bound the speed: 2M pairs a
    # student run.
    "full": dict(student="pcf-tiny-64", teacher="pcf-small-64", device="cuda", precision="bf16",
                 train_size=100_000, val_size=2_000, batch_size=2_048, chunk_size=None, steps=1_000,
                 teacher_steps=2_000, lr=1e-3, warmup=50, seeds=5, rates=(0.25, 0.5, 0.75), workers=8),
}
CLIPC_RATE = 0.5
DISTILL = dict(distill_margin=0.1, distill_weight=1.0, distill_kd="kl")
SWEEP_ATTRIBUTE = "colour"
# (metric, column title) of the tables, in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("short/i2t_R@1", "R@1 i→t short"), ("short/t2i_R@1", "R@1 t→i short"),
    ("detailed/i2t_R@1", "R@1 i→t detailed"), ("detailed/t2i_R@1", "R@1 t→i detailed"),
    ("probe/mean", "probe mean"), ("attribute/colour", "attr colour"), ("attribute/shape", "attr shape"),
    ("attribute/size", "attr size"), ("attribute/position", "attr position"),
    ("zeroshot/colour", "0-shot colour"), ("zeroshot/shape", "0-shot shape"),
)
SWEEP_COLUMNS = ("attribute/colour", "zeroshot/colour", "attribute/shape", "short/i2t_R@1")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a name, a label and the trainer settings it changes."""

    name: str
    label: str
    overrides: dict[str, Any]
    rate: Optional[float] = None  # the sweep's rate (None outside the sweep)
    bias: Optional[str] = None  # "omit" or "perturb" in the sweep


def variants(rates: Sequence[float], teacher_checkpoint: str, teacher: str) -> list[Variant]:
    """The rows of the grid, baseline first."""
    rows = [
        Variant("baseline", "baseline (InfoNCE, short captions)", {}),
        Variant("clipc", f"+ CLIP-C (ρ = {CLIPC_RATE})", {"clipc_rate": CLIPC_RATE}),
        Variant("clipin", "+ CLIPin (λ = 1, 1; m = 0.95)", {"clipin": True}),
        Variant("distill", f"+ distillation (m = {DISTILL['distill_margin']}, λ = 1, KL)",
                {"teacher": teacher, "teacher_checkpoint": teacher_checkpoint, **DISTILL}),
        Variant("detailed", "detailed captions", {"caption": "detailed"}),
        Variant("sentences", "sentence sampling (detailed)", {"caption": "sentences"}),
    ]
    for bias in ("omit", "perturb"):
        rows += [Variant(f"{bias}-{SWEEP_ATTRIBUTE}-{rate:g}", f"--{bias} {SWEEP_ATTRIBUTE}={rate:g}",
                         {bias: f"{SWEEP_ATTRIBUTE}={rate:g}"}, rate, bias) for rate in rates]
    return rows


def run_config(preset: dict[str, Any], work: Path, name: str, seed: int, overrides: dict[str, Any],
               *, model: Optional[str] = None, steps: Optional[int] = None) -> TrainConfig:
    """The TrainConfig of one run of the grid."""
    return TrainConfig(
        model=model or preset["student"], device=preset["device"], precision=preset["precision"],
        train_size=preset["train_size"], val_size=preset["val_size"], batch_size=preset["batch_size"],
        chunk_size=preset["chunk_size"], steps=steps or preset["steps"], lr=preset["lr"], warmup=preset["warmup"],
        workers=preset["workers"], seed=seed, output_dir=str(work / name / f"seed{seed}"), eval_at_start=False,
        progress=False, plots=False, threads=1 if preset["device"] == "cpu" else None, **overrides)


def common_evaluation(cfg: TrainConfig, checkpoint: Path) -> dict[str, float]:
    """The same metrics for every run: retrieval on short and on detailed val captions, probes, zero-shot."""
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    model = create_model(cfg.model, cfg.loss, device)
    model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    tokenizer = create_tokenizer(cfg.model)
    scenes = synthetic_split(cfg, "val", image_size(model))
    metrics = {}
    for caption in ("short", "detailed"):
        found = evaluate(model, [SyntheticEvaluation(scenes, tokenizer, caption, cfg.backend)], device, cfg.precision,
                         batch_size=512)
        metrics.update({k.replace("val/", f"{caption}/"): v for k, v in found.items() if k.startswith("val/")})
        if caption == "short":
            metrics.update({k: v for k, v in found.items() if not k.startswith("val/")})
    metrics.update(evaluate(model, [AttributeProbe(scenes, tokenizer)], device, cfg.precision, batch_size=512))
    return metrics


def run_one(job: tuple[dict[str, Any], bool]) -> dict[str, Any]:
    """Train one run (unless its result exists), evaluate it, drop its checkpoint unless `keep`."""
    from .loop import train  # a worker process imports the loop itself

    settings, keep = job
    cfg = TrainConfig(**settings)
    result_path = Path(cfg.output_dir) / "result.json"
    if result_path.is_file():
        saved = json.loads(result_path.read_text())
        if saved.get("config") == settings:
            return {**saved, "reused": True}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    result = train(cfg, echo=lambda _: None)
    train_seconds = time.perf_counter() - start
    metrics = common_evaluation(cfg, result.checkpoint)
    record = {"config": settings, "metrics": metrics, "train_seconds": train_seconds,
              "seconds": time.perf_counter() - start, "load_average": os.getloadavg()[0]}
    if not keep:
        result.checkpoint.unlink()
    result_path.write_text(json.dumps(record, indent=1))
    return record


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mean, std (over seeds, n − 1) and n of every metric and of the run time."""
    values: dict[str, list[float]] = {}
    for record in records:
        for key, value in {**record["metrics"], "seconds": record["seconds"]}.items():
            values.setdefault(key, []).append(value)
    return {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for key, v in values.items()}


def _cell(summary: dict[str, dict[str, float]], key: str, percent: bool = True) -> str:
    if key not in summary:
        return "—"
    mean, std, n = summary[key]["mean"], summary[key]["std"], summary[key]["n"]
    scale = 100 if percent else 1
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if n > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    """The tables of a report (methods.json) in markdown."""
    rows = report["variants"]
    lines = [f"# Methods on the built-in data ({report['preset']} preset)", "",
             f"`{report['command']}` — {report['seeds']} seeds, {report['settings']['steps']} steps of "
             f"{report['settings']['batch_size']} pairs per student, {report['minutes']:.1f} minutes in all "
             f"on {report['machine']['description']}.", "",
             *_reuse_note(report),
             "Accuracies in %, mean ± std over seeds; chance: probe and attribute 50, 0-shot 12.5, "
             f"R@1 {100 / report['settings']['val_size']:.1f}. s/run: wall seconds of one run.", ""]
    header = ["variant", *[title for _, title in COLUMNS], "s/run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["rate"] is not None:
            continue
        cells = [_cell(row["summary"], key) for key, _ in COLUMNS] + [_cell(row["summary"], "seconds", False)]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    teacher = report.get("teacher")
    if teacher:
        cells = [_cell(teacher["summary"], key) for key, _ in COLUMNS]
        cells.append(_cell(teacher["summary"], "seconds", False))
        label = f"teacher {teacher['model']} ({teacher['steps']} steps, 1 seed)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"## Misalignment sweep: {SWEEP_ATTRIBUTE} omitted or perturbed in the training captions", "",
              "| bias | rate | " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * (2 + len(SWEEP_COLUMNS))]
    baseline = next(row for row in rows if row["name"] == "baseline")
    for bias in ("omit", "perturb"):
        sweep = [(0.0, baseline)] + [(row["rate"], row) for row in rows if row["bias"] == bias]
        for rate, row in sweep:
            cells = " | ".join(_cell(row["summary"], k) for k in SWEEP_COLUMNS)
            lines.append(f"| {bias} | {rate:g} | {cells} |")
    failed = [f"{r['variant']} seed {r['seed']}: {r['error']}" for r in report["runs"] if "error" in r]
    if failed:
        lines += ["", "Failed runs:", *[f"- {f}" for f in failed]]
    return "\n".join(lines) + "\n"


def _reuse_note(report: dict[str, Any]) -> list[str]:
    """A line saying how many runs came from an earlier invocation (their time is not in the total)."""
    reused = sum(1 for r in report["runs"] if r.get("reused"))
    return [f"{reused} of {len(report['runs'])} runs were finished by an earlier invocation; the total time above "
            "does not include them.", ""] if reused else []


def plot(report: dict[str, Any], path: Path) -> None:
    """methods.png: the method variants' main metrics (left) and the misalignment sweep (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["variants"] if row["rate"] is None]
    keys = ["short/i2t_R@1", "detailed/i2t_R@1", "probe/mean", "attribute/colour", "attribute/shape", "attribute/size",
            "attribute/position"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        means = [100 * row["summary"].get(k, {"mean": math.nan})["mean"] for k in keys]
        stds = [100 * row["summary"].get(k, {"std": 0.0})["std"] for k in keys]
        left.bar([x + i * width for x in range(len(keys))], means, width, yerr=stds, capsize=2, label=row["name"])
    left.axhline(50, color="grey", lw=0.8, ls=":")
    ticks = [x + 0.4 - width / 2 for x in range(len(keys))]
    left.set_xticks(ticks, [k.replace("attribute/", "attr ") for k in keys])
    left.set(ylabel="%", title=f"methods, mean ± std over {report['seeds']} seeds (dotted: probe chance)")
    left.legend(fontsize=7, ncol=2)
    baseline = next(row for row in report["variants"] if row["name"] == "baseline")
    for bias, style in (("omit", "-"), ("perturb", "--")):
        sweep = [(0.0, baseline)] + [(row["rate"], row) for row in report["variants"] if row["bias"] == bias]
        for key, colour in (("attribute/colour", "tab:red"), ("zeroshot/colour", "tab:orange"),
                            ("attribute/shape", "tab:grey")):
            rates = [rate for rate, _ in sweep]
            means = [100 * row["summary"][key]["mean"] for _, row in sweep]
            stds = [100 * row["summary"][key]["std"] for _, row in sweep]
            right.errorbar(rates, means, yerr=stds, ls=style, color=colour, marker="o", capsize=2,
                           label=f"{key} ({bias})")
    right.set(xlabel=f"rate of {SWEEP_ATTRIBUTE} omission (solid) / perturbation (dashed)", ylabel="%",
              title="misalignment sweep")
    right.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> dict[str, Any]:
    """What ran the grid (CPU model and cores, load at the start, torch)."""
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    cores = os.cpu_count() or 1
    description = f"{cores}-core CPU ({model})"
    if torch.cuda.is_available():
        description = torch.cuda.get_device_name(0)
    return {"description": description, "cpu": model, "cores": cores, "torch": torch.__version__,
            "load_average_start": list(os.getloadavg())}


def _run_jobs(jobs: list[tuple[dict[str, Any], bool]], workers: int, echo) -> list[dict[str, Any]]:
    """Run the jobs (in `workers` processes); a failed run is recorded with its error, not fatal."""
    def done(index: int, record: dict[str, Any]) -> dict[str, Any]:
        cfg = jobs[index][0]
        name = Path(cfg["output_dir"]).parent.name
        if "error" in record:
            echo(f"  {name} seed {cfg['seed']}: FAILED {record['error']}")
        else:
            echo(f"  {name} seed {cfg['seed']}: {record['seconds']:.0f} s, R@1 i→t "
                 f"{100 * record['metrics']['short/i2t_R@1']:.1f}%, attr colour "
                 f"{100 * record['metrics']['attribute/colour']:.1f}%")
        return record

    if workers <= 1:
        return [done(i, _safe(job)) for i, job in enumerate(jobs)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited threads
    with context.Pool(workers, maxtasksperchild=1) as pool:
        return [done(i, record) for i, record in enumerate(pool.imap(_safe, jobs))]


def _safe(job: tuple[dict[str, Any], bool]) -> dict[str, Any]:
    try:
        return run_one(job)
    except Exception as error:  # one broken run must not lose the grid's other results
        return {"error": f"{type(error).__name__}: {error}"}


def run_grid(preset_name: str, out: Path, work: Path, seeds: Optional[int] = None, jobs: int = 1,
             command: str = "", echo=print) -> dict[str, Any]:
    """Train the teacher, then every (variant, seed); write methods.json/.md/.png to `out`."""
    preset = dict(PRESETS[preset_name])
    seeds = seeds or preset["seeds"]
    start, info = time.perf_counter(), machine()
    echo(f"teacher {preset['teacher']}, {preset['teacher_steps']} steps")
    teacher_cfg = run_config(preset, work, "teacher", 0, {}, model=preset["teacher"], steps=preset["teacher_steps"])
    teacher = _run_jobs([(teacher_cfg.to_dict(), True)], 1, echo)[0]
    if "error" in teacher:
        raise RuntimeError(f"the teacher failed to train: {teacher['error']}")
    checkpoint = str(Path(teacher_cfg.output_dir) / "checkpoint.pt")
    grid = variants(preset["rates"], checkpoint, preset["teacher"])
    planned = [(variant, seed) for seed in range(seeds) for variant in grid]
    echo(f"{len(planned)} student runs ({len(grid)} variants × {seeds} seeds), {jobs} at a time")
    jobs_list = [(run_config(preset, work, v.name, seed, v.overrides).to_dict(), False) for v, seed in planned]
    records = _run_jobs(jobs_list, jobs, echo)
    runs = [{"variant": v.name, "seed": seed, **record} for (v, seed), record in zip(planned, records)]
    rows = []
    for variant in grid:
        ok = [r for r in runs if r["variant"] == variant.name and "error" not in r]
        rows.append({**dataclasses.asdict(variant), "summary": summarise(ok) if ok else {}})
    settings = {k: v for k, v in preset.items() if k not in ("seeds",)}
    report = {
        "preset": preset_name, "command": command, "seeds": seeds, "jobs": jobs, "settings": settings,
        "machine": {**info, "load_average_end": list(os.getloadavg())},
        "minutes": (time.perf_counter() - start) / 60, "variants": rows, "runs": runs,
        "teacher": {"model": preset["teacher"], "steps": preset["teacher_steps"], "summary": summarise([teacher])},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(report, indent=1, default=list))
    (out / "methods.md").write_text(markdown(report))
    plot(report, out / "methods.png")
    echo(f"{report['minutes']:.1f} minutes; wrote {out / 'methods.md'}, methods.json, methods.png")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyclipfast.train experiments",
                                     description="Train every method variant with several seeds; write the table.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                        help="quick: a 2-core CPU in about half an hour; full: one GPU")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (CPU: one thread each)")
    parser.add_argument("--out", default="benchmarks/results/methods", help="where methods.json/.md/.png go")
    parser.add_argument("--work", default="runs/experiments", help="where the runs are trained")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be positive; got {args.seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be positive; got {args.jobs}")
    command = "python -m pyclipfast.train experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    run_grid(args.preset, Path(args.out), Path(args.work) / args.preset, args.seeds, args.jobs, command.strip())
    return 0
