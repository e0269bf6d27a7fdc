"""The named suites (what to sweep on which device) and the goals some of them check.

    quick           small sizes, every op and implementation; minutes on the CPU
    full            the N × D × dtype grid, plus the largest-batch search for every op
    cpu-acceptance  the CPU acceptance figures (fp32 N=8192 D=256 against open_clip; N=65,536 D=128)
    gpu-goals       the GPU speed and memory goals (CUDA only); `--goals` picks a subset

Every op registered in ``benchmarks/ops`` joins the sweeps whose `ops` is None,
so a new loss needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

GB = 10**9
MB = 10**6
COMPILED = ("open_clip-compile", "torch-compile")


@dataclass
class Sweep:
    """A grid of cases: ops × implementations × dtypes × D × N.

    `only_at` limits some implementations to some N (compiled peers compile once per shape).
    """

    ns: Sequence[int]
    dims: Sequence[int]
    dtypes: Sequence[str]
    ops: Optional[Sequence[str]] = None
    impls: Optional[Sequence[str]] = None
    only_at: Dict[str, Sequence[int]] = field(default_factory=dict)
    teacher_dim: Optional[int] = None
    label: str = ""
    timing: dict = field(default_factory=dict)  # overrides the suite's timing options
    interleave: bool = False  # CPU: time the implementations of each case in rounds (fair ratios under load)


@dataclass
class MaxBatchSpec:
    """Largest-batch searches at one D and dtype (see maxbatch.py)."""

    d: int
    dtype: str
    start: int
    max_n: int
    trial_budget_s: float
    ops: Optional[Sequence[str]] = None
    impls: Optional[Sequence[str]] = None
    cap_bytes: Optional[int] = None  # CPU only: RLIMIT_AS headroom per trial
    bisect_steps: int = 2


@dataclass
class Goal:
    """A pass/fail target computed from a finished run's record."""

    name: str
    description: str
    group: str
    check: Callable[[dict], dict]


@dataclass
class Suite:
    name: str
    description: str
    sweeps: List[Sweep]
    max_batch: List[MaxBatchSpec] = field(default_factory=list)
    goals: List[Goal] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    max_call_s: float = float("inf")  # skip a case whose single call is predicted to exceed this
    cuda_only: bool = False


# ------------------------------------------------------------------------------------ suites

def build_suite(name: str, device: str) -> Suite:
    """The suite `name` for `device` ("cpu" or "cuda")."""
    builders = {"quick": _quick, "full": _full, "cpu-acceptance": _cpu_acceptance, "gpu-goals": _gpu_goals}
    if name not in builders:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(builders)}")
    return builders[name](device)


SUITES = ("quick", "full", "cpu-acceptance", "gpu-goals")


def _quick(device: str) -> Suite:
    if device == "cuda":
        return Suite("quick", "every op and implementation at N ∈ {4k, 16k, 64k}, D=768, bf16",
                     [Sweep([4096, 16384, 65536], [768], ["bfloat16"], only_at={c: [16384] for c in COMPILED})],
                     timing=dict(rep_ms=300.0, budget_s=10.0))
    return Suite("quick", "every op and implementation at N ∈ {512, 1k, 2k}, D=128, fp32; largest InfoNCE "
                 "batch at D=32 under a 1 GB cap (D=32 keeps the chunked trials short; the materialised "
                 "implementations' N×N matrices do not depend on D)",
                 [Sweep([512, 1024, 2048], [128], ["float32"])],
                 max_batch=[MaxBatchSpec(d=32, dtype="float32", start=4096, max_n=2**20, trial_budget_s=20.0,
                                         ops=["clip"], cap_bytes=1 * GB, bisect_steps=1)],
                 timing=dict(budget_s=1.5, min_reps=3), max_call_s=10.0)


def _full(device: str) -> Suite:
    if device == "cuda":
        grid = [4096, 8192, 16384, 32768, 65536, 131072]
        return Suite(
            "full", "N sweep at D=768 (bf16, fp32), D sweep at N=32k (bf16), largest batch at D=768",
            [Sweep(grid, [768], ["bfloat16"], only_at={c: [16384, 65536] for c in COMPILED}, label="N sweep"),
             Sweep([32768], [256, 512, 1024], ["bfloat16"], only_at={c: [] for c in COMPILED}, label="D sweep"),
             Sweep([8192, 32768, 65536], [768], ["float32"], only_at={c: [] for c in COMPILED}, label="fp32")],
            max_batch=[MaxBatchSpec(d=768, dtype="bfloat16", start=65536, max_n=2**24, trial_budget_s=60.0,
                                    impls=["pcf-triton", "pcf-cuda", "open_clip", "reference"])],
            timing=dict(rep_ms=300.0, budget_s=10.0), max_call_s=20.0)
    return Suite("full", "N ∈ {1k … 16k} × D ∈ {128, 256, 512}, fp32; largest batch at D=256 under a 4 GB cap",
                 [Sweep([1024, 2048, 4096, 8192, 16384], [128, 256, 512], ["float32"])],
                 max_batch=[MaxBatchSpec(d=256, dtype="float32", start=4096, max_n=2**22, trial_budget_s=60.0,
                                         cap_bytes=4 * GB)],
                 timing=dict(budget_s=5.0, min_reps=3), max_call_s=60.0)


def _cpu_acceptance(device: str) -> Suite:
    return Suite(
        "cpu-acceptance", "CPU goals: fp32 fwd+bwd N=8192 D=256 pcf-torch vs open_clip; N=65,536 D=128 completes",
        [Sweep([8192], [256], ["float32"], ops=["clip"], impls=["pcf-torch", "open_clip"], label="N=8192 D=256",
               interleave=True),
         Sweep([65536], [128], ["float32"], ops=["clip"], impls=["pcf-torch", "open_clip"], label="N=65,536 D=128",
               timing=dict(budget_s=0.0, min_reps=3))],
        goals=_cpu_goals(), timing=dict(budget_s=20.0, min_reps=5, max_reps=9))


def _gpu_goals(device: str) -> Suite:
    compiled_at = {c: [32768, 65536] for c in COMPILED}
    return Suite(
        "gpu-goals", "the GPU goals at D=768, bf16",
        [Sweep([32768], [768], ["bfloat16"], ops=["clip"], only_at=compiled_at, label="speed"),
         Sweep([65536], [768], ["bfloat16"], ops=["siglip"], only_at=compiled_at, label="speed"),
         Sweep([65536], [768], ["bfloat16"], impls=["pcf-triton", "pcf-cuda"], label="memory")],
        max_batch=[MaxBatchSpec(d=768, dtype="bfloat16", start=2**22, max_n=2**24, trial_budget_s=420.0,
                                ops=["clip", "siglip"], impls=["auto"], bisect_steps=1)],
        goals=_gpu_goal_list(), timing=dict(rep_ms=500.0, budget_s=15.0), cuda_only=True)


# ------------------------------------------------------------------------------------ goal helpers

def find(record: dict, op: str, impl: str, n: int, d: int, dtype: str) -> Optional[dict]:
    """The result of one case in a record, or None if it was not run."""
    for r in record["results"]:
        if (r["op"], r["impl"], r["n"], r["d"], r["dtype"]) == (op, impl, n, d, dtype):
            return r
    return None


def goal_result(name: str, description: str, passed: Optional[bool], measured: str, target: str,
                detail: str = "") -> dict:
    """passed=None: the goal could not be evaluated (a case is missing or failed); `detail` says why."""
    return {"goal": name, "description": description, "passed": passed, "measured": measured,
            "target": target, "detail": detail}


def _ok(r: Optional[dict]) -> bool:
    return r is not None and r["status"] == "ok"


def _why(r: Optional[dict], label: str) -> str:
    if r is None:
        return f"{label} was not run"
    return f"{label}: {r['status']} {r.get('message', '')}".strip()


def _ms(r: dict) -> float:
    return r["time"]["median_ms"]


def _peak(r: dict) -> int:
    return r["memory"]["peak_extra_bytes"]


# ------------------------------------------------------------------------------------ CPU goals

def _cpu_goals() -> List[Goal]:
    return [
        Goal("cpu-time", "fp32 fwd+bwd N=8192 D=256: pcf-torch time ≤ 0.5× open_clip ClipLoss", "acceptance",
             _ratio_goal("time", 0.5)),
        Goal("cpu-memory", "fp32 fwd+bwd N=8192 D=256: pcf-torch extra peak memory ≤ 5% of open_clip's",
             "acceptance", _ratio_goal("memory", 0.05)),
        Goal("cpu-65k", "fp32 fwd+bwd N=65,536 D=128 completes with pcf-torch (open_clip cannot)", "acceptance",
             _completes_65k),
    ]


def _ratio_goal(kind: str, limit: float) -> Callable[[dict], dict]:
    def check(record: dict) -> dict:
        name = f"cpu-{kind}"
        mine, theirs = (find(record, "clip", impl, 8192, 256, "float32") for impl in ("pcf-torch", "open_clip"))
        if not (_ok(mine) and _ok(theirs)):
            why = _why(mine, "pcf-torch") + "; " + _why(theirs, "open_clip")
            return goal_result(name, "", None, "n/a", f"≤ {limit}×", why)
        if kind == "time":
            ratio = _ms(mine) / _ms(theirs)
            measured = f"{ratio:.3f}× ({_ms(mine) / 1e3:.2f} s vs {_ms(theirs) / 1e3:.2f} s, medians)"
        else:
            ratio = _peak(mine) / _peak(theirs)
            measured = f"{ratio:.3f}× ({_peak(mine) / MB:.1f} MB vs {_peak(theirs) / MB:.0f} MB extra peak RSS)"
        return goal_result(name, "", ratio <= limit, measured, f"≤ {limit}×")

    return check


def _completes_65k(record: dict) -> dict:
    mine = find(record, "clip", "pcf-torch", 65536, 128, "float32")
    theirs = find(record, "clip", "open_clip", 65536, 128, "float32")
    if mine is None:
        return goal_result("cpu-65k", "", None, "n/a", "completes", "pcf-torch at N=65,536 D=128 was not run")
    if not _ok(mine):
        return goal_result("cpu-65k", "", False, "did not complete", "completes", _why(mine, "pcf-torch"))
    other = "open_clip: not run" if theirs is None else f"open_clip: {theirs['status']} {theirs.get('message', '')}"
    measured = (f"completed in {_ms(mine) / 1e3:.1f} s (median of {mine['time']['reps']}), "
                f"{_peak(mine) / MB:.0f} MB extra peak RSS")
    return goal_result("cpu-65k", "", True, measured, "completes", other.strip())


# ------------------------------------------------------------------------------------ GPU goals

def _gpu_goal_list() -> List[Goal]:
    goals = [
        Goal("clip-vs-open_clip", "InfoNCE N=32,768 D=768 bf16: pyclipfast ≤ 0.4× open_clip's time", "speed",
             _speed_ratio("clip", 32768, "open_clip", 0.4)),
        Goal("clip-vs-inf-cl", "InfoNCE N=32,768 D=768 bf16: pyclipfast ≤ 0.2× Inf-CL's time", "speed",
             _speed_ratio("clip", 32768, "inf-cl", 0.2)),
        Goal("clip-gemm-fraction", "InfoNCE N=32,768 D=768 bf16: ≥ 55% of the dense bf16 GEMM rate at 8·N²·D",
             "speed", _gemm_fraction),
        Goal("siglip-65k", "SigLIP N=65,536 D=768 bf16: ≤ 35 ms fwd+bwd", "speed", _siglip_time),
        Goal("memory-65k", "every loss at N=65,536 D=768 bf16: extra peak memory ≤ 1 GB", "memory", _memory_65k),
        Goal("max-batch-4M", "largest loss batch at D=768 bf16 on this GPU ≥ 4M (4,194,304 tried first)",
             "max-batch", _max_batch_4m),
    ]
    return goals


def auto_impl(record: dict, op: str) -> Optional[str]:
    """The implementation ``backend="auto"`` picks on this device for `op`, as recorded by the run."""
    return record.get("auto_impls", {}).get(op)


def _speed_ratio(op: str, n: int, peer: str, limit: float) -> Callable[[dict], dict]:
    def check(record: dict) -> dict:
        name = f"{op}-vs-{peer}"
        impl = auto_impl(record, op)
        mine, theirs = find(record, op, impl, n, 768, "bfloat16"), find(record, op, peer, n, 768, "bfloat16")
        if not (_ok(mine) and _ok(theirs)):
            why = _why(mine, impl or "auto") + "; " + _why(theirs, peer)
            return goal_result(name, "", None, "n/a", f"≤ {limit}×", why)
        ratio = _ms(mine) / _ms(theirs)
        return goal_result(name, "", ratio <= limit, f"{ratio:.3f}× ({_ms(mine):.2f} ms vs {_ms(theirs):.2f} ms)",
                           f"≤ {limit}×", f"pyclipfast backend: {impl}")

    return check


def _gemm_fraction(record: dict) -> dict:
    impl = auto_impl(record, "clip")
    r = find(record, "clip", impl, 32768, 768, "bfloat16")
    if not _ok(r):
        return goal_result("clip-gemm-fraction", "", None, "n/a", "≥ 0.55", _why(r, impl or "auto"))
    frac = r["frac_gemm"]
    gemm = record["ceilings"]["gemm"]["bfloat16"]["tflops"]
    return goal_result("clip-gemm-fraction", "", frac >= 0.55, f"{frac:.3f} ({r['tflops']:.0f} of {gemm:.0f} TFLOP/s)",
                       "≥ 0.55", f"pyclipfast backend: {impl}")


def _siglip_time(record: dict) -> dict:
    impl = auto_impl(record, "siglip")
    r = find(record, "siglip", impl, 65536, 768, "bfloat16")
    if not _ok(r):
        return goal_result("siglip-65k", "", None, "n/a", "≤ 35 ms", _why(r, impl or "auto"))
    peer = find(record, "siglip", "siglip-kernel", 65536, 768, "bfloat16")
    detail = f"pyclipfast backend: {impl}" + (f"; siglip-kernel {_ms(peer):.2f} ms" if _ok(peer) else "")
    return goal_result("siglip-65k", "", _ms(r) <= 35.0, f"{_ms(r):.2f} ms", "≤ 35 ms", detail)


def _memory_65k(record: dict) -> dict:
    measured, failures, missing = [], [], []
    for op in record.get("ops_run", []):
        impl = auto_impl(record, op)
        r = find(record, op, impl, 65536, 768, "bfloat16")
        if not _ok(r):
            missing.append(_why(r, f"{op}/{impl}"))
            continue
        peak = _peak(r)
        measured.append(f"{op} {peak / MB:.0f} MB")
        if peak > 1 * GB:
            failures.append(op)
    passed = None if missing and not failures else not failures
    return goal_result("memory-65k", "", passed, ", ".join(measured) or "n/a", "≤ 1000 MB each",
                       "; ".join(missing + [f"over: {', '.join(failures)}"] * bool(failures)))


def _max_batch_4m(record: dict) -> dict:
    rows = [m for m in record.get("max_batch", []) if m["d"] == 768 and m["dtype"] == "bfloat16"
            and m["impl"].startswith("pcf") and m["op"] in ("clip", "siglip")]
    if not rows:
        return goal_result("max-batch-4M", "", None, "n/a", "≥ 4,000,000", "no largest-batch search was run")
    parts = [f"{m['op']}/{m['impl']}: {m['largest_ok'] or 0:,} ({m['stop_reason']})" for m in rows]
    passed = all((m["largest_ok"] or 0) >= 4_000_000 for m in rows)
    return goal_result("max-batch-4M", "", passed, "; ".join(parts), "≥ 4,000,000 each")
