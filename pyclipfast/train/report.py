"""The table printed at the end of a run: evaluations before and after training, loss memory, paths."""
from __future__ import annotations

from typing import Optional

from .loop import TrainResult

# (metric, label, chance level as a function of the val size or None when it does not apply)
ROWS: tuple[tuple[str, str], ...] = (
    ("val/i2t_R@1", "recall@1 image→text"),
    ("val/t2i_R@1", "recall@1 text→image"),
    ("val/i2t_R@5", "recall@5 image→text"),
    ("val/t2i_R@5", "recall@5 text→image"),
    ("probe/swap_attributes", "probe: swapped attributes"),
    ("probe/swap_relation", "probe: swapped relation"),
    ("probe/replace_object", "probe: replaced object"),
    ("probe/mean", "probe: mean"),
    ("attribute/colour", "attribute probe: colour"),
    ("attribute/shape", "attribute probe: shape"),
    ("attribute/size", "attribute probe: size"),
    ("attribute/position", "attribute probe: position"),
    ("zeroshot/shape", "zero-shot shape (8 classes)"),
    ("zeroshot/colour", "zero-shot colour (8 classes)"),
    ("zeroshot/colour_shape", "zero-shot colour+shape (64)"),
)
CHANCE: dict[str, float] = {
    "probe/swap_attributes": 0.5, "probe/swap_relation": 0.5, "probe/replace_object": 0.5, "probe/mean": 0.5,
    "attribute/colour": 0.5, "attribute/shape": 0.5, "attribute/size": 0.5, "attribute/position": 0.5,
    "zeroshot/shape": 1 / 8, "zeroshot/colour": 1 / 8, "zeroshot/colour_shape": 1 / 64,
}


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.2f} MB"


def summary_table(result: TrainResult) -> str:
    """Before/after evaluation, chance level, loss memory against open_clip, and where the files are."""
    lines = []
    keys = [(key, label) for key, label in ROWS if key in result.first_eval or key in result.last_eval]
    if keys:
        width = max(len(label) for _, label in keys)
        lines.append(f"{'':{width}}  {'before':>8}  {'after':>8}  {'chance':>8}")
        for key, label in keys:
            chance = CHANCE.get(key)
            if chance is None and key.startswith("val/") and result.config.train_data is None:
                rank = int(key.rsplit("@", 1)[1])
                chance = min(1.0, rank / result.config.val_size)
            lines.append(f"{label:{width}}  {_percent(result.first_eval.get(key)):>8}  "
                         f"{_percent(result.last_eval.get(key)):>8}  {_percent(chance):>8}")
    memory = result.loss_memory
    if memory is not None:
        lines += ["", f"{result.config.loss} loss peak memory, one fwd+bwd, D={memory['dim']}:"]
        for row in memory["rows"]:
            ratio = row["open_clip"] / max(1, row["pyclipfast"])
            lines.append(f"  batch {row['batch']:>6}: pyclipfast {_megabytes(row['pyclipfast']):>10}, "
                         f"open_clip {_megabytes(row['open_clip']):>10}  ({ratio:.1f}x)")
        lines.append(f"  measured as {memory['method']}")
    if result.skipped:
        lines.append(f"skipped {result.skipped} unreadable sample(s)")
    lines += ["", f"trained {result.step} steps in {result.seconds:.0f} s",
              f"metrics:    {result.metrics_path}"]
    if result.plots:
        lines.append("plots:      " + ", ".join(str(p) for p in result.plots))
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}  (resume with --resume)")
    if result.weights is not None:
        lines.append(f"weights:    {result.weights}  (open_clip.create_model(..., pretrained=...) or --pretrained)")
    return "\n".join(lines)
