"""Figures derived from the raw measurements, and the JSON and markdown outputs.

Per case (median time t, minimum FLOPs F and bytes B, ceilings measured
in the same run, the better of its start and end: dense GEMM rate R in the
case's dtype, copy bandwidth W):

    TFLOP/s    = F / t                  % GEMM  = (F / t) / R
    GB/s       = B / t                  % copy  = (B / t) / W
    floor      = max(F / R, B / W)      % floor = floor / t   (roofline: 100% is the hardware limit)
    × baseline = t / t_baseline, peak / peak_baseline (same op, dtype and shape)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .registry import Shape

MB = 1e6
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def figures(flops: float, nbytes: float, median_ms: float, gemm_tflops: Optional[float],
            copy_gbps: Optional[float]) -> dict:
    """Throughput and fractions of the measured ceilings for one case (see the module docstring)."""
    seconds = median_ms / 1e3
    out = {"tflops": None, "frac_gemm": None, "gbps": nbytes / seconds / 1e9, "frac_copy": None,
           "floor_ms": None, "frac_floor": None, "bound": None}
    if copy_gbps:
        out["frac_copy"] = out["gbps"] / copy_gbps
    if flops:
        out["tflops"] = flops / seconds / 1e12
        if gemm_tflops:
            out["frac_gemm"] = out["tflops"] / gemm_tflops
    compute_s = flops / (gemm_tflops * 1e12) if flops and gemm_tflops else 0.0
    memory_s = nbytes / (copy_gbps * 1e9) if copy_gbps else 0.0
    if compute_s or memory_s:
        out["floor_ms"] = max(compute_s, memory_s) * 1e3
        out["frac_floor"] = out["floor_ms"] / median_ms
        out["bound"] = "compute" if compute_s >= memory_s else "memory"
    return out


def derive_all(record: dict, ops: Dict[str, object]) -> None:
    """Add cost-model figures and baseline ratios to every result of `record`, in place."""
    ceilings = record["ceilings"]
    for r in record["results"]:
        op = ops[r["op"]]
        shape = Shape(r["n"], r["d"], None if r["m"] == r["n"] else r["m"], r.get("dt"))
        r["flops"] = op.flops(shape)
        r["min_bytes"] = op.min_bytes(shape, ELEMENT_SIZE[r["dtype"]])
        if r["status"] == "ok":
            gemm = ceilings["gemm"].get(r["dtype"], {}).get("tflops")
            r.update(figures(r["flops"], r["min_bytes"], r["time"]["median_ms"], gemm, ceilings["copy"]["gbps"]))
    for r in record["results"]:
        _baseline_ratios(r, record["results"], ops[r["op"]].baseline)


def _baseline_ratios(r: dict, results: List[dict], baselines: Iterable[str]) -> None:
    r["baseline"] = r["time_vs_baseline"] = r["mem_vs_baseline"] = None
    if r["status"] != "ok":
        return
    for name in baselines:
        base = next((b for b in results if b["impl"] == name and b["status"] == "ok" and _same_case(b, r)), None)
        if base is not None:
            r["baseline"] = name
            r["time_vs_baseline"] = r["time"]["median_ms"] / base["time"]["median_ms"]
            peak, base_peak = r["memory"]["peak_extra_bytes"], base["memory"]["peak_extra_bytes"]
            r["mem_vs_baseline"] = peak / base_peak if base_peak else None
            return


def _same_case(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("op", "dtype", "n", "m", "d", "dt"))


# ---------------------------------------------------------------------- files

def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False, default=str) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_markdown(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(record))


def markdown(record: dict) -> str:
    """The whole report: provenance, ceilings, goals, one table per (op, dtype, D), largest batches, skips."""
    parts = [_header(record)]
    if record.get("goals"):
        parts.append(goals_table(record["goals"]))
    for (op, dtype, d), rows in _groups(record["results"]).items():
        parts.append(_case_table(op, dtype, d, rows))
    if record.get("max_batch"):
        parts.append(_max_batch_table(record["max_batch"]))
    if record.get("skipped"):
        parts.append(_skipped_table(record["skipped"]))
    return "\n\n".join(parts) + "\n"


def goal_lines(goals: List[dict]) -> List[str]:
    """One 'PASS/FAIL/N/A goal: measured (target)' line per goal, for the console."""
    word = {True: "PASS", False: "FAIL", None: "N/A "}
    return [f"{word[g['passed']]} {g['goal']}: {g['measured']} (target {g['target']})"
            + (f" [{g['detail']}]" if g.get("detail") else "") for g in goals]


def goals_table(goals: List[dict]) -> str:
    rows = ["## Goals", "", "| goal | what | target | measured | result | detail |", "|---|---|---|---|---|---|"]
    word = {True: "**pass**", False: "**FAIL**", None: "not evaluated"}
    for g in goals:
        rows.append(f"| {g['goal']} | {g.get('description', '')} | {g['target']} | {g['measured']} | "
                    f"{word[g['passed']]} | {g.get('detail', '')} |")
    return "\n".join(rows)


def _header(record: dict) -> str:
    m, v, c = record["machine"], record["versions"], record["ceilings"]
    peers = ", ".join(f"{k} {ver}" if ver else f"{k} not installed" for k, ver in v["peers"].items())
    dirty = _uncommitted(v.get("git_uncommitted") or [])
    if m["device"] == "cuda":
        where = f"{m['name']}, {m['sm_count']} SMs, {m['gpu_memory_bytes'] / 2**30:.0f} GiB (driver {m.get('driver')})"
    else:
        where = f"{m['cpu_model']}, {m['cpu_cores']} cores, torch threads: {record['settings'].get('threads')}"
    load = f"load average {_loads(m['load_average'])} at start, {_loads(record.get('load_average_end'))} at end"
    if was_busy(m, record.get("load_average_end")):
        load += (f" — **the machine was busy with other work during this run** (more runnable tasks than its "
                 f"{m['cpu_cores']} cores): CPU timings carry that load")
    gemm = "; ".join(f"{k} {_num(g['tflops'])} TFLOP/s (S={g['size']})" for k, g in c["gemm"].items())
    lines = [
        f"# pyclipfast benchmarks: suite `{record['suite']}` on {m['name']}"
        + (" (partial: the run did not finish)" if record.get("partial") else ""),
        "",
        f"- Command: `{record['command']}` ({record['started']}, {record.get('elapsed_s', '?')} s)",
        f"- Machine: {where}; {load}" + (f". Note: {record['note']}" if record.get("note") else ""),
        f"- Software: Python {v['python']}, torch {v['torch']}, triton {v['triton']}, pyclipfast {v['pyclipfast']} "
        f"at {v['git_commit'][:12] or 'unknown commit'}{dirty}; peers: {peers}",
        f"- Ceilings measured in this run (best of its start and end): dense GEMM {gemm}; "
        f"copy {_num(c['copy']['gbps'])} GB/s (read + write)"
        + ("; TF32 on" if c.get("tf32") else ""),
        f"- Suite: {record['suite_description']}",
        "- Timed call: forward + gradients of every input that needs one (metrics: forward only). Time: median "
        "(IQR, min–max) of `reps` calls after warm-up, rotating input sets. Memory: peak extra above the inputs "
        "(gradients included). See benchmarks/README.md for the method.",
    ]
    return "\n".join(lines)


def _uncommitted(paths: List[str], shown: int = 6) -> str:
    if not paths:
        return ""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f" + uncommitted changes ({', '.join(paths[:shown])}{more})"


def was_busy(machine: dict, end_load) -> bool:
    """CPU runs only: the 1-minute load average exceeded the core count at the start or the end."""
    if machine["device"] != "cpu":
        return False
    peaks = [machine["load_average"][0]] + ([end_load[0]] if end_load else [])
    return max(peaks) > machine["cpu_cores"]


def _loads(values) -> str:
    return "n/a" if not values else "/".join(f"{x:.2f}" for x in values)


def _groups(results: List[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault((r["op"], r["dtype"], r["d"]), []).append(r)
    return groups


def _case_table(op: str, dtype: str, d: int, rows: List[dict]) -> str:
    baseline = next((r["baseline"] for r in rows if r.get("baseline")), None)
    head = [f"## {op} · {dtype} · D={d}", "",
            f"| impl | N | median ms | IQR ms | min–max ms | reps | TFLOP/s | % GEMM | GB/s | % copy | extra peak MB "
            f"| × time vs {baseline or 'baseline'} | × memory | status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    body = [_case_row(r) for r in sorted(rows, key=lambda r: (r["n"], r["impl"]))]
    return "\n".join(head + body)


def _case_row(r: dict) -> str:
    if r["status"] != "ok":
        peak = ""
        return (f"| {r['impl']} | {r['n']} | | | | | | | | | {peak} | | | {r['status']}: "
                f"{_escape(r.get('message', ''))} |")
    t, mem = r["time"], r["memory"]
    return (f"| {r['impl']} | {r['n']} | {_num(t['median_ms'])} | {_num(t['q3_ms'] - t['q1_ms'])} | "
            f"{_num(t['min_ms'])}–{_num(t['max_ms'])} | {t['reps']} | {_num(r.get('tflops'))} | "
            f"{_pct(r.get('frac_gemm'))} | {_num(r.get('gbps'))} | {_pct(r.get('frac_copy'))} | "
            f"{_num(mem['peak_extra_bytes'] / MB)} | {_num(r.get('time_vs_baseline'))} | "
            f"{_num(r.get('mem_vs_baseline'))} | ok |")


def _max_batch_table(rows: List[dict]) -> str:
    out = ["## Largest batch that fits", "",
           "| op | impl | dtype | D | largest N that ran | smallest N that failed | stopped because "
           "| trials (N: status, s) |",
           "|---|---|---|---:|---:|---:|---|---|"]
    for m in rows:
        trials = ", ".join(f"{t['n']}: {t['status']}" + (f" {t['elapsed_s']:.1f}" if t["elapsed_s"] else "")
                           for t in m["trials"])
        cap = f" (cap {m['cap_bytes'] / 1e9:.0f} GB)" if m.get("cap_bytes") else ""
        failed = _int(m["smallest_failed"]) or "none tried"
        out.append(f"| {m['op']} | {m['impl']} | {m['dtype']} | {m['d']} | {_int(m['largest_ok'])} | "
                   f"{failed}{cap} | {_escape(m['stop_reason'])} | {trials} |")
    return "\n".join(out)


def _skipped_table(rows: List[dict]) -> str:
    out = ["## Skipped", "", "| op | impl | where | reason |", "|---|---|---|---|"]
    for s in rows:
        where = " ".join(f"{k}={s[k]}" for k in ("dtype", "d") if k in s)
        out.append(f"| {s['op']} | {s['impl']} | {where} | {_escape(s['reason'])} |")
    return "\n".join(out)


def _num(x: Optional[float]) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _int(x: Optional[int]) -> str:
    return "" if x is None else f"{x:,}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
