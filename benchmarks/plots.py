"""PNG plots from a run's JSON: time and peak extra memory against N, log-log.

One figure per (op, dtype): top row time, bottom row memory, one column per D,
one line per implementation (solid: pyclipfast, dashed: peers and baselines;
an implementation keeps its colour across figures). Only cases that ran ("ok")
are drawn; the figure title names the machine and suite so a PNG is never
separated from its source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_record(record: dict, out_dir: Path, stem: str) -> List[Path]:
    """Write ``<stem>-<op>-<dtype>.png`` for every (op, dtype) with results; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({r["impl"] for r in record["results"]})
    colours = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(names)}
    paths = []
    for (op, dtype), rows in _by_op_dtype(record["results"]).items():
        path = out_dir / f"{stem}-{op}-{dtype}.png"
        _figure(record, op, dtype, rows, colours, stem).savefig(path, dpi=110)
        plt.close("all")
        paths.append(path)
    return paths


def _by_op_dtype(results: List[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["dtype"]), []).append(r)
    return groups


def _figure(record: dict, op: str, dtype: str, rows: List[dict], colours: dict, stem: str = ""):
    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(5.5 * len(dims), 7.5), squeeze=False)
    for col, d in enumerate(dims):
        series = _series([r for r in rows if r["d"] == d])
        for impl, points in series.items():
            ns = [r["n"] for r in points]
            style = dict(marker="o", label=impl, color=colours[impl],
                         linestyle="-" if points[0]["kind"] == "pyclipfast" else "--")
            axes[0][col].plot(ns, [r["time"]["median_ms"] for r in points], **style)
            axes[1][col].plot(ns, [r["memory"]["peak_extra_bytes"] / 1e6 for r in points], **style)
        for row, ylabel in enumerate(("fwd+bwd time, median (ms)", "extra peak memory (MB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch)")
            ax.set_ylabel(ylabel if rows[0]["mode"] == "fwd+bwd" or row else "forward time, median (ms)")
            ax.set_title(f"D={d}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    m = record["machine"]
    run = record["suite"] if stem in ("", record["suite"]) else f"{stem}: suite {record['suite']}"
    fig.suptitle(f"{op} · {dtype} · {m['name']} ({run}, {record['started'][:10]})", fontsize=11)
    fig.tight_layout()
    return fig


def _series(rows: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in sorted(rows, key=lambda r: r["n"]):
        out.setdefault(r["impl"], []).append(r)
    return out
