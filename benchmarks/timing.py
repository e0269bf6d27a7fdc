"""Wall-clock timing of one benchmarked call, on the CPU and on CUDA.

Both timers rotate through several input sets (so a small problem is not timed
out of a warm cache) and report the median with the spread of the samples.

CPU: `time.perf_counter` around each call. The caller warms the libraries up
with a small call first; the first full-size call is then discarded as a
warm-up unless it is long (≥ `long_call_s`), in which case it is kept as a
sample (page faults of fresh allocations are paid on every CPU call anyway).
Samples are taken until `budget_s` is spent, at least `min_reps`.

Interleaved (CPU): several implementations of one case timed in rounds, one
call of each per round, the order rotating, so a load change on a shared
machine hits all of them alike and their ratio stays fair.

CUDA: one call to compile/autotune, a few to estimate the cost, warm-up calls
for `warmup_ms`, then `rep_ms` worth of calls each bracketed by CUDA events
(the launch of call k+1 overlaps nothing: events are recorded on the stream).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np


@dataclass
class Timing:
    """Summary of the samples of one case, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    reps: int
    warmup_calls: int
    method: str

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], warmup_calls: int, method: str) -> "Timing":
        x = np.asarray(samples_ms, dtype=np.float64)
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(x.min()), float(x.max()), len(x), warmup_calls, method)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        return asdict(self)


def time_cpu(step: Callable[[object], object], input_sets: Sequence[object], *, budget_s: float = 3.0,
             min_reps: int = 3, max_reps: int = 25, long_call_s: float = 5.0) -> Timing:
    """Median wall time of `step(inputs)` on the CPU, rotating over `input_sets`."""
    t0 = time.perf_counter()
    step(input_sets[0])
    first_ms = (time.perf_counter() - t0) * 1e3
    samples: List[float] = []
    warmup = 1
    if first_ms >= long_call_s * 1e3:
        samples.append(first_ms)
        warmup = 0
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        inputs = input_sets[len(samples) % len(input_sets)]
        t0 = time.perf_counter()
        step(inputs)
        samples.append((time.perf_counter() - t0) * 1e3)
    method = "perf_counter, first full-size call " + ("kept (long call)" if warmup == 0 else "discarded")
    return Timing.from_samples(samples, warmup, method)


def time_interleaved_cpu(steps: Dict[str, Callable[[object], object]], input_sets: Dict[str, Sequence[object]], *,
                         budget_s: float = 3.0, min_reps: int = 3, max_reps: int = 25,
                         long_call_s: float = 5.0) -> Dict[str, Timing]:
    """`time_cpu` for several implementations at once, in rounds (one call of each per round)."""
    names = list(steps)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    kept = {}
    for name in names:  # first full-size call: discarded unless long, as in time_cpu
        ms = _call_ms(steps[name], input_sets[name][0])
        kept[name] = ms >= long_call_s * 1e3
        if kept[name]:
            samples[name].append(ms)
    start, rounds = time.perf_counter(), 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for k in range(len(names)):
            name = names[(rounds + k) % len(names)]
            if len(samples[name]) < max_reps:
                sets = input_sets[name]
                samples[name].append(_call_ms(steps[name], sets[len(samples[name]) % len(sets)]))
        rounds += 1
    others = ", ".join(names)
    return {name: Timing.from_samples(samples[name], 0 if kept[name] else 1,
                                      f"perf_counter, interleaved round-robin with {others}; first full-size call "
                                      + ("kept (long call)" if kept[name] else "discarded"))
            for name in names}


def _call_ms(step, inputs) -> float:
    t0 = time.perf_counter()
    step(inputs)
    return (time.perf_counter() - t0) * 1e3


def time_cuda(step: Callable[[object], object], input_sets: Sequence[object], *, warmup_ms: float = 100.0,
              rep_ms: float = 500.0, min_reps: int = 10, max_reps: int = 500, budget_s: float = 30.0) -> Timing:
    """Median device time of `step(inputs)` with CUDA events, rotating over `input_sets`."""
    import torch

    step(input_sets[0])  # compile / autotune / allocator growth
    torch.cuda.synchronize()
    estimate_ms = _event_times(step, input_sets, 3)
    per_call = max(float(np.median(estimate_ms)), 1e-3)
    warmup = max(1, int(warmup_ms / per_call))
    reps = int(min(max(rep_ms / per_call, min_reps), max_reps, max(3, budget_s * 1e3 / per_call)))
    for k in range(min(warmup, max_reps)):
        step(input_sets[k % len(input_sets)])
    samples = _event_times(step, input_sets, reps)
    return Timing.from_samples(samples, 4 + min(warmup, max_reps), "CUDA events per call")


def _event_times(step, input_sets, count: int) -> List[float]:
    import torch

    pairs = []
    for k in range(count):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(input_sets[k % len(input_sets)])
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]
