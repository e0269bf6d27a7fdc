"""Sweeps a suite: every case is timed and its peak memory measured, in one run.

Per case, on the CPU: the memory probe runs first, in a subprocess under the
memory cap (a case that would not fit is recorded as "over-cap" and never
run in this process), then the timing in this process. On CUDA: the timing
first (its warm-up compiles and autotunes), then the memory probe in this
process; an out-of-memory error is recorded as "oom" and the cache emptied.
A case that fails for any reason is recorded with its error and the sweep goes
on. Within one (op, implementation, dtype, D) series, sizes after one that did
not fit are skipped, as are sizes predicted (from the previous size) to take
longer than the suite's `max_call_s` per call.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import hardware
from .cases import DTYPES, CaseSpec, check_finite, input_sets, is_out_of_memory, make_step, short_error
from .maxbatch import largest_batch
from .memory import ProbeResult, ProbeWorker, probe, release_cuda_memory
from .registry import Context, Op, Shape, discover
from .report import derive_all, was_busy
from .suites import MaxBatchSpec, Suite, Sweep, build_suite
from .timing import time_cpu, time_cuda, time_interleaved_cpu

GB = 10**9
CPU_ROTATION_BYTES = 64 * 2**20  # rotate two input sets on the CPU while they are smaller than this


@dataclass
class RunOptions:
    """Everything a run needs besides the suite definition (see ``python -m benchmarks run --help``)."""

    suite: str = "quick"
    device: str = "cpu"
    only_ops: Optional[Sequence[str]] = None
    only_impls: Optional[Sequence[str]] = None
    ns: Optional[Sequence[int]] = None
    dims: Optional[Sequence[int]] = None
    dtypes: Optional[Sequence[str]] = None
    goals: Optional[Sequence[str]] = None
    mem_isolation: str = "case"
    cpu_mem_cap_bytes: int = 4 * GB
    max_batch: bool = True
    tf32: bool = False
    threads: Optional[int] = None
    timing: Optional[dict] = None  # overrides the suite's timing options (tests use tiny budgets)
    gemm_size: Optional[int] = None
    copy_bytes: Optional[int] = None
    seed: int = 0
    note: str = ""
    command: str = ""
    log: Callable[[str], None] = print
    checkpoint: Optional[Callable[[dict], None]] = None  # called with the raw record after every case


class Runner:
    """Runs one suite on one device and returns the run's record (a JSON-able dict)."""

    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.device = opts.device
        self.suite: Suite = build_suite(opts.suite, opts.device)
        if self.suite.cuda_only and self.device != "cuda":
            raise SystemExit(f"suite {opts.suite!r} runs on CUDA only (got --device {self.device})")
        self.ops: Dict[str, Op] = discover()
        self.results: List[dict] = []
        self.skipped: List[dict] = []
        self.max_batch: List[dict] = []
        self.worker: Optional[ProbeWorker] = None
        self.l2_bytes = 0
        self.header: dict = {}

    # ------------------------------------------------------------------ top level

    def run(self) -> dict:
        """Run the suite; torch's global settings (TF32, threads) are restored afterwards."""
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads(),
                 os.environ.get("OMP_NUM_THREADS"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.opts.tf32
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
            os.environ["OMP_NUM_THREADS"] = str(self.opts.threads)  # for the memory-probe children
        try:
            return self._run()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
            torch.set_num_threads(saved[2])
            if saved[3] is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved[3]

    def _run(self) -> dict:
        started = time.time()
        machine = hardware.machine_info(self.device)
        self.l2_bytes = machine.get("l2_cache_bytes") or 0
        sweeps = self._selected_sweeps()
        dtypes = sorted({dt for s in sweeps for dt in s.dtypes} | {s.dtype for s in self._selected_max_batch()})
        self.opts.log(f"== {self.suite.name} on {machine['name']} ({self.device}); measuring ceilings")
        record = {
            "schema": 1, "suite": self.suite.name, "suite_description": self.suite.description,
            "command": self.opts.command, "note": self.opts.note,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "machine": machine, "versions": hardware.versions(), "settings": self._settings(),
            "ceilings_start": self._ceilings(dtypes),
        }
        self.header = dict(record)
        if self.device == "cpu":
            self.worker = ProbeWorker(self.opts.cpu_mem_cap_bytes, self.opts.mem_isolation)
        try:
            for sweep in sweeps:
                self._sweep(sweep)
            for spec in self._selected_max_batch():
                self._max_batch(spec)
        finally:
            if self.worker is not None:
                self.worker.close()
        self.opts.log("== measuring the ceilings again")
        record["ceilings_end"] = self._ceilings(dtypes)
        record["ceilings"] = hardware.best_ceilings(record["ceilings_start"], record["ceilings_end"])
        record.update(
            ops_run=sorted({r["op"] for r in self.results}), auto_impls=self._auto_impls(dtypes),
            results=self.results, skipped=self.skipped, max_batch=self.max_batch,
            elapsed_s=round(time.time() - started, 1), load_average_end=list(os.getloadavg()),
        )
        record["machine_busy"] = was_busy(machine, record["load_average_end"])
        derive_all(record, self.ops)
        record["goals"] = self._goals(record)
        return record

    def _ceilings(self, dtypes: Sequence[str]) -> dict:
        return hardware.measure_ceilings(self.device, [DTYPES[d] for d in dtypes], gemm_size=self.opts.gemm_size,
                                         copy_bytes=self.opts.copy_bytes)

    def _settings(self) -> dict:
        o = self.opts
        return {"timing": self.suite.timing, "sweep_timing": [s.timing for s in self.suite.sweeps],
                "timing_override": o.timing, "threads": torch.get_num_threads(),
                "max_call_s": self.suite.max_call_s, "seed": o.seed, "tf32": o.tf32,
                "cpu_mem_cap_bytes": o.cpu_mem_cap_bytes if self.device == "cpu" else None,
                "cpu_mem_isolation": o.mem_isolation if self.device == "cpu" else None,
                "only_ops": o.only_ops, "only_impls": o.only_impls, "goals": o.goals,
                "overrides": {"ns": o.ns, "dims": o.dims, "dtypes": o.dtypes}}

    def _selected_sweeps(self) -> List[Sweep]:
        sweeps = self.suite.sweeps
        if self.opts.goals:
            sweeps = [s for s in sweeps if s.label in self.opts.goals]
        o = self.opts
        return [dataclasses.replace(s, ns=o.ns or s.ns, dims=o.dims or s.dims, dtypes=o.dtypes or s.dtypes)
                for s in sweeps]

    def _selected_max_batch(self) -> List[MaxBatchSpec]:
        if not self.opts.max_batch or (self.opts.goals and "max-batch" not in self.opts.goals):
            return []
        return self.suite.max_batch

    def _selected_ops(self, names: Optional[Sequence[str]]) -> List[Op]:
        chosen = [self.ops[k] for k in sorted(self.ops) if names is None or k in names]
        if self.opts.only_ops:
            chosen = [op for op in chosen if op.name in self.opts.only_ops]
        return chosen

    def _selected_impls(self, op: Op, names: Optional[Sequence[str]], dtype: str = "bfloat16"):
        """`names` may say "auto": the implementation backend="auto" picks for `op` and `dtype` here."""
        names = [self._auto_impl(op, dtype) if n == "auto" else n for n in names] if names else None
        impls = [i for i in op.impls if names is None or i.name in names]
        if self.opts.only_impls:
            impls = [i for i in impls if i.name in self.opts.only_impls]
        return impls

    # ------------------------------------------------------------------ sweeps

    def _sweep(self, sweep: Sweep) -> None:
        for op in self._selected_ops(sweep.ops):
            reason = op.skip_reason()
            if reason:
                self._skip(op.name, "*", reason)
                continue
            for dtype in sweep.dtypes:
                for d in sweep.dims:
                    usable = []
                    for impl in self._selected_impls(op, sweep.impls, dtype):
                        ns = [n for n in sweep.ns if impl.name not in sweep.only_at or n in sweep.only_at[impl.name]]
                        if not ns:
                            continue
                        ctx = Context(self.device, DTYPES[dtype], Shape(ns[0], d, dt=sweep.teacher_dim))
                        reason = impl.skip_reason(ctx)
                        if reason:
                            self._skip(op.name, impl.name, reason, dtype=dtype, d=d)
                        elif not (sweep.interleave and self.device == "cpu"):
                            self._series(op, impl, dtype, d, ns, sweep)
                        else:
                            usable.append(impl)
                    if usable:
                        self._interleaved(op, usable, dtype, d, sweep)

    def _series(self, op: Op, impl, dtype: str, d: int, ns: Sequence[int], sweep: Sweep) -> None:
        """One implementation over increasing N at fixed (dtype, D)."""
        previous: Optional[dict] = None
        timing = {**self.suite.timing, **sweep.timing, **(self.opts.timing or {})}
        for n in sorted(ns):
            spec = CaseSpec(op.name, impl.name, self.device, dtype, n, d, dt=sweep.teacher_dim, seed=self.opts.seed)
            if find_duplicate(self.results, spec):
                continue
            skip = self._skip_in_series(op, spec, previous)
            result = self._blank(op, impl, spec) if skip else self._case(op, impl, spec, timing)
            if skip:
                result.update(status="skipped", message=skip)
            self._add(result)
            if result["status"] != "skipped":
                previous = result

    def _interleaved(self, op: Op, impls: list, dtype: str, d: int, sweep: Sweep) -> None:
        """CPU: per N, probe every implementation's memory (subprocess, capped), then time those that
        fit together in rounds (`time_interleaved_cpu`), so their ratio is fair on a shared machine."""
        timing = {**self.suite.timing, **sweep.timing, **(self.opts.timing or {})}
        did_not_fit = {}
        for n in sorted(sweep.ns):
            results, steps, sets = {}, {}, {}
            for impl in impls:
                spec = CaseSpec(op.name, impl.name, self.device, dtype, n, d, dt=sweep.teacher_dim,
                                seed=self.opts.seed)
                results[impl.name] = result = self._blank(op, impl, spec)
                if impl.name in did_not_fit:
                    _failed(result, "skipped", f"N={did_not_fit[impl.name]} already did not fit")
                    continue
                memory = self.worker.probe(spec)
                result.update(memory=memory.to_dict(), value=memory.value)
                if not memory.ok:
                    _failed(result, memory.status, memory.message)
                    did_not_fit.update({impl.name: n} if memory.status in ("oom", "over-cap") else {})
                    continue
                steps[impl.name] = make_step(op, impl.make_call(spec.context()))
                steps[impl.name](input_sets(op, spec.tiny(), 1)[0])
                sets[impl.name] = input_sets(op, spec, self._rotation_count(op, spec))
                result["rotation_sets"] = len(sets[impl.name])
            self._time_together(results, steps, sets, timing)
            for result in results.values():
                self._add(result)

    @staticmethod
    def _time_together(results: Dict[str, dict], steps: dict, sets: dict, timing: dict) -> None:
        if not steps:
            return
        try:
            timings = time_interleaved_cpu(steps, sets, **timing)
        except Exception as exc:  # noqa: BLE001
            for name in steps:
                _failed(results[name], "oom" if is_out_of_memory(exc) else "error", short_error(exc))
            return
        for name, t in timings.items():
            results[name].update(time=t.to_dict(), status="ok")

    def _skip_in_series(self, op: Op, spec: CaseSpec, previous: Optional[dict]) -> Optional[str]:
        if previous is None:
            return None
        if previous["status"] in ("oom", "over-cap"):
            return f"N={previous['n']} already did not fit ({previous['status']})"
        if previous["status"] != "ok":
            return None
        predicted_s = previous["time"]["median_ms"] / 1e3 * _cost(op, spec.shape) / _cost(op, _shape(previous))
        if predicted_s > self.suite.max_call_s:
            return f"predicted {predicted_s:.0f} s per call > the suite's {self.suite.max_call_s:.0f} s limit"
        return None

    def _case(self, op: Op, impl, spec: CaseSpec, timing_opts: dict) -> dict:
        result = self._blank(op, impl, spec)
        if self.device == "cpu":
            memory = self.worker.probe(spec)
            result["memory"] = memory.to_dict()
            if not memory.ok:
                return _failed(result, memory.status, memory.message)
            result["value"] = memory.value
        failure = None
        try:
            step = make_step(op, impl.make_call(spec.context()))
            timing, rotation, value = self._time(op, spec, step, timing_opts)
            result.update(time=timing.to_dict(), rotation_sets=rotation)
            result["value"] = result.get("value") if value is None else value
        except Exception as exc:  # noqa: BLE001 - a failing case is a result, not the end of the run
            failure = ("oom" if is_out_of_memory(exc) else "error", short_error(exc))
        if failure is not None:  # outside the except block, so the failed frames' tensors are gone
            if self.device == "cuda":
                release_cuda_memory()
            return _failed(result, *failure)
        if self.device == "cuda":
            memory = probe(spec, step=step)
            result["memory"] = memory.to_dict()
            if not memory.ok:
                return _failed(result, memory.status, memory.message)
        result["status"] = "ok"
        return result

    def _time(self, op: Op, spec: CaseSpec, step, timing_opts: dict):
        """(Timing, rotation count, output value or None); CPU warm-up is a tiny call of the same step."""
        count = self._rotation_count(op, spec)
        if self.device == "cpu":
            step(input_sets(op, spec.tiny(), 1)[0])
            sets = input_sets(op, spec, count)
            return time_cpu(step, sets, **timing_opts), count, None
        sets = input_sets(op, spec, count)
        value = check_finite(step(sets[0])[0])
        timing = time_cuda(step, sets, **timing_opts)
        del sets
        release_cuda_memory()
        return timing, count, value

    def _rotation_count(self, op: Op, spec: CaseSpec) -> int:
        """How many input sets to rotate through so consecutive calls don't find them in cache."""
        set_bytes = _input_bytes(op, spec)
        if self.device == "cpu":
            return 2 if 2 * set_bytes <= CPU_ROTATION_BYTES else 1
        return int(min(8, max(1, math.ceil(3 * self.l2_bytes / max(set_bytes, 1)))))

    # ------------------------------------------------------------------ largest batch

    def _max_batch(self, spec: MaxBatchSpec) -> None:
        for op in self._selected_ops(spec.ops):
            if op.skip_reason():
                continue
            for impl in self._selected_impls(op, spec.impls, spec.dtype):
                ctx = Context(self.device, DTYPES[spec.dtype], Shape(spec.start, spec.d))
                reason = impl.skip_reason(ctx)
                if reason:
                    self._skip(op.name, impl.name, reason, dtype=spec.dtype, d=spec.d)
                    continue
                self.opts.log(f"-- largest batch: {op.name} {impl.name} {spec.dtype} D={spec.d} from N={spec.start}")
                case = CaseSpec(op.name, impl.name, self.device, spec.dtype, spec.start, spec.d, seed=self.opts.seed)
                found = largest_batch(self._trial(case, spec), lambda n: _cost(op, Shape(n, spec.d)),
                                      start=spec.start, max_n=spec.max_n, trial_budget_s=spec.trial_budget_s,
                                      bisect_steps=spec.bisect_steps)
                entry = {"op": op.name, "impl": impl.name, "dtype": spec.dtype, "d": spec.d,
                         "cap_bytes": spec.cap_bytes if self.device == "cpu" else None, **found.to_dict()}
                self.max_batch.append(entry)
                self.opts.log(f"   largest N = {found.largest_ok} ({found.stop_reason})")
                self._save_checkpoint()

    def _trial(self, case: CaseSpec, spec: MaxBatchSpec) -> Callable[[int], ProbeResult]:
        def run(n: int) -> ProbeResult:
            sized = case.resized(n)
            if self.device == "cpu":
                return self.worker.probe(sized, cap_bytes=spec.cap_bytes or self.opts.cpu_mem_cap_bytes)
            return probe(sized)

        return run

    # ------------------------------------------------------------------ bookkeeping

    def _auto_impls(self, dtypes: Sequence[str]) -> Dict[str, Optional[str]]:
        return {name: self._auto_impl(op, dtypes[0] if dtypes else "float32") for name, op in self.ops.items()}

    def _auto_impl(self, op: Op, dtype: str = "bfloat16") -> Optional[str]:
        """The implementation name ``backend="auto"`` resolves to for `op` on this device."""
        names = {i.name for i in op.impls}
        if "pcf" in names:
            return "pcf"
        from pyclipfast import _dispatch

        try:
            backend = _dispatch.resolve(op.dispatch, "auto", torch.zeros(0, dtype=DTYPES[dtype], device=self.device))
        except (ValueError, TypeError):
            return None
        return f"pcf-{backend}" if f"pcf-{backend}" in names else None

    def _goals(self, record: dict) -> List[dict]:
        out = []
        for goal in self.suite.goals:
            if self.opts.goals and goal.group not in self.opts.goals:
                continue
            try:
                result = goal.check(record)
            except Exception as exc:  # noqa: BLE001
                result = {"goal": goal.name, "passed": None, "measured": "n/a", "target": "",
                          "detail": f"goal check failed: {short_error(exc)}"}
            result["description"] = goal.description
            out.append(result)
        return out

    def _add(self, result: dict) -> None:
        self.results.append(result)
        self.opts.log(_progress(result))
        self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        """Hand the raw record so far (no derived figures) to `opts.checkpoint`: a run killed by a time
        limit still leaves every finished case behind."""
        if self.opts.checkpoint is not None:
            self.opts.checkpoint({**self.header, "partial": True, "results": self.results,
                                  "skipped": self.skipped, "max_batch": self.max_batch})

    def _skip(self, op: str, impl: str, reason: str, **where) -> None:
        entry = {"op": op, "impl": impl, **where, "reason": reason}
        if entry in self.skipped:
            return
        self.skipped.append(entry)
        self.opts.log(f"   skip {op} {impl} {' '.join(f'{k}={v}' for k, v in where.items())}: {reason}")

    def _blank(self, op: Op, impl, spec: CaseSpec) -> dict:
        return {"op": op.name, "impl": impl.name, "kind": impl.kind, "device": self.device, "dtype": spec.dtype,
                "n": spec.n, "m": spec.shape.cols, "d": spec.d, "dt": spec.dt, "mode": op.mode,
                "status": "pending", "message": "", "notes": impl.notes, "time": None, "memory": None,
                "value": None}


# ---------------------------------------------------------------------- helpers

def _failed(result: dict, status: str, message: str) -> dict:
    result.update(status=status, message=message)
    return result


def _cost(op: Op, shape: Shape) -> float:
    """Relative work of a call: FLOPs, or bytes for memory-bound ops."""
    return op.flops(shape) or op.min_bytes(shape, 1)


def _shape(result: dict) -> Shape:
    return Shape(result["n"], result["d"], dt=result.get("dt"))


def _input_bytes(op: Op, spec: CaseSpec) -> int:
    """About the bytes one call touches (inputs read, gradients written), from the cost model."""
    element = torch.empty(0, dtype=DTYPES[spec.dtype]).element_size()
    return int(op.min_bytes(spec.shape, element))


def find_duplicate(results: List[dict], spec: CaseSpec) -> bool:
    """True if this exact case is already in the results (sweeps may overlap)."""
    key = (spec.op, spec.impl, spec.dtype, spec.n, spec.d, spec.dt)
    return any((r["op"], r["impl"], r["dtype"], r["n"], r["d"], r["dt"]) == key for r in results)


def _progress(r: dict) -> str:
    head = f"   {r['op']:<8} {r['impl']:<18} {r['dtype']:<8} N={r['n']:<8} D={r['d']:<5}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['message']}"
    t, mem = r["time"], r["memory"]
    return (f"{head} {t['median_ms']:10.3f} ms (IQR {t['q3_ms'] - t['q1_ms']:.3f}, n={t['reps']})"
            f"  peak +{mem['peak_extra_bytes'] / 1e6:.1f} MB")
