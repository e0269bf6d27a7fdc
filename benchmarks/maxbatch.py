"""The largest batch N that fits, per implementation, at a given D and dtype.

Search: double N from `start` while a trial fits; after the first failure,
bisect between the last N that fitted and the first that did not (`bisect_steps`
times, at a granularity of `granule`). If the first trial already fails, halve
until one fits. Each trial runs one forward+backward (the memory probe), so a
trial is also a correctness check at that size.

A trial costs time proportional to the op's work, which grows as N² for the
contrastive losses: before each trial the time is predicted from the last
successful one, and the search stops ("time budget") rather than start a
trial predicted to exceed `trial_budget_s`. The result then says "fits at
least N", never more than was run. Memory is bounded by the device (CUDA: a
real out-of-memory) or by the probe's cap (CPU: RLIMIT_AS, see memory.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

from .memory import ProbeResult

Probe = Callable[[int], ProbeResult]


@dataclass
class Trial:
    n: int
    status: str
    elapsed_s: Optional[float]
    peak_extra_bytes: Optional[int]
    message: str = ""


@dataclass
class MaxBatch:
    """Outcome of a search: the largest N that ran, the smallest that did not, and why it stopped."""

    largest_ok: Optional[int]
    smallest_failed: Optional[int]
    stop_reason: str
    trials: List[Trial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def largest_batch(probe: Probe, cost: Callable[[int], float], *, start: int, max_n: int,
                  trial_budget_s: float, bisect_steps: int = 2, granule: int = 256,
                  min_n: int = 256) -> MaxBatch:
    """Search the largest N for which `probe(N)` succeeds.

    Args:
        probe: runs one trial at N and returns its `ProbeResult`.
        cost: relative work at N (FLOPs or bytes), used to predict a trial's time.
        start, max_n, min_n: the first N tried and the bounds of the search.
        trial_budget_s: no trial predicted to take longer than this is started.
        bisect_steps, granule: refinement after the first failure.
    """
    trials: List[Trial] = []
    ok: Optional[Trial] = None
    failed: Optional[int] = None

    def run(n: int) -> Optional[str]:
        """Run a trial unless its predicted time is over budget; the stop reason, if any."""
        nonlocal ok, failed
        if ok is not None and ok.elapsed_s is not None:
            predicted = ok.elapsed_s * cost(n) / cost(ok.n)
            if predicted > trial_budget_s:
                return f"time budget: N={n} predicted {predicted:.0f} s > {trial_budget_s:.0f} s per trial"
        r = probe(n)
        trials.append(Trial(n, r.status, r.elapsed_s, r.peak_extra_bytes, r.message))
        if r.ok:
            ok = trials[-1] if ok is None or n > ok.n else ok
            return None
        failed = n if failed is None else min(failed, n)
        return None if r.status in ("oom", "over-cap") else f"error at N={n}: {r.message}"

    reason = run(start)
    n = start
    while reason is None and ok is None and n // 2 >= min_n:  # first trial failed: halve
        n //= 2
        reason = run(n)
    while reason is None and failed is None:  # double while it fits
        if n * 2 > max_n:
            reason = f"reached the search bound max_n={max_n}"
            break
        n *= 2
        reason = run(n)
    steps = 0
    while reason is None and ok is not None and failed is not None and steps < bisect_steps:
        mid = (ok.n + failed) // 2 // granule * granule
        if mid <= ok.n:
            break
        reason = run(mid)
        steps += 1
    if reason is None:
        reason = ("memory: the next size did not fit" if failed is not None and ok is not None
                  else "nothing fitted" if ok is None else "done")
    return MaxBatch(None if ok is None else ok.n, failed, reason, trials)
