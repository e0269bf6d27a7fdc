"""Metrics as JSON lines, and PNG plots of them.

metrics.jsonl holds one JSON object per line: {"kind": "train", "step", "epoch", "loss", "lr",
"logit_scale", "samples_per_s", ...} every --log-every steps and {"kind": "eval", "step",
"val/i2t_R@1", ...} at each evaluation. A resumed run first drops the records written after its
checkpoint (they belong to the interrupted future it replays), so the file always reads as one
uninterrupted run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from .checkpoint import atomic_write

# Fields that measure the machine, not the training trajectory (they differ between identical runs).
TIMING_FIELDS = ("samples_per_s", "seconds")


def read_metrics(path: os.PathLike | str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


class MetricsLog:
    """Appends records to `path`; with `resume_step`, keeps only the records up to that step first."""

    def __init__(self, path: os.PathLike | str, resume_step: Optional[int] = None) -> None:
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda file: file.write(text.encode("utf-8")))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def _series(records: Iterable[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(records: list[dict[str, Any]], out_dir: os.PathLike | str) -> list[Path]:
    """Write loss.png (training loss and logit scale) and metrics.png (evaluation) to `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    steps, loss = _series(records, "train", "loss")
    if steps:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot(steps, loss)
        left.set(xlabel="step", ylabel="loss", title="training loss")
        scale_steps, scale = _series(records, "train", "logit_scale")
        right.plot(scale_steps, scale, color="tab:orange")
        right.set(xlabel="step", ylabel="exp(logit_scale)", title="logit scale")
        figure.tight_layout()
        figure.savefig(out_dir / "loss.png", dpi=100)
        plt.close(figure)
        written.append(out_dir / "loss.png")
    keys = sorted({k for r in records if r.get("kind") == "eval" for k in r if "/" in k})
    groups = [(title, [k for k in keys if k.startswith(prefix)])
              for title, prefix in (("retrieval recall", "val/"), ("compositional probe", "probe/"),
                                    ("attribute probe", "attribute/"), ("zero-shot accuracy", "zeroshot/"))]
    groups = [(title, group) for title, group in groups if group]
    if groups:
        figure, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
        for axis, (title, group) in zip(axes[0], groups):
            for key in group:
                xs, ys = _series(records, "eval", key)
                axis.plot(xs, ys, marker="o", label=key.split("/", 1)[1])
            axis.set(xlabel="step", title=title, ylim=(0, 1.02))
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out_dir / "metrics.png", dpi=100)
        plt.close(figure)
        written.append(out_dir / "metrics.png")
    return written


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without machine-dependent timing fields (to compare two runs' trajectories)."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
