"""Peak extra memory of one call, on CUDA (allocator statistics) and on the CPU (peak RSS).

"Extra" is what the call needs above its inputs: the peak during one step
minus what was allocated once the inputs existed. It includes the gradients
the step returns (dA, dB: O(N·D)), the same for every implementation.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
the inputs already allocated, in the benchmarking process (the allocator
counts every tensor exactly, so implementations cannot hide each other).

CPU: peak resident set size (VmHWM) above the resident size (VmRSS) measured
right after the inputs were built, glibc's free memory returned with
``malloc_trim`` and VmHWM reset by writing "5" to /proc/self/clear_refs. Each
measurement runs in a fresh subprocess (`ProbeWorker`), so one
implementation's retained memory cannot hide another's allocations, under a
soft RLIMIT_AS of (address space after set-up + cap): an implementation that
needs more than the cap fails its allocation ("over-cap") instead of pushing the
shared machine into swap or the OOM killer.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .cases import CaseSpec, check_finite, input_sets, is_out_of_memory, make_step, short_error

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ProbeResult:
    """Outcome of one memory probe: status "ok", "oom" (CUDA), "over-cap" (CPU cap) or "error"."""

    status: str
    peak_extra_bytes: Optional[int] = None
    inputs_bytes: Optional[int] = None
    elapsed_s: Optional[float] = None
    value: Optional[float] = None
    cap_bytes: Optional[int] = None
    method: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- /proc helpers (Linux)

def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, VmSize), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def collect_garbage() -> None:
    """A full garbage collection, then everything still alive is frozen out of later collections.

    With torch and a peer like open_clip imported, one full collection takes ~0.6 s; after the freeze
    the next one scans only objects created since, so collecting before every case stays cheap. Only
    reference cycles that become garbage after a collection are never reclaimed (a small leak).
    """
    gc.collect()
    gc.freeze()


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the kernel, so they don't sit in the RSS baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class AddressSpaceCap:
    """Context manager: soft RLIMIT_AS = current address space + `cap_bytes` (None: no cap)."""

    def __init__(self, cap_bytes: Optional[int]):
        self.cap_bytes = cap_bytes
        self.saved = resource.getrlimit(resource.RLIMIT_AS)

    def __enter__(self):
        if self.cap_bytes is not None:
            limit = proc_status_bytes("VmSize") + self.cap_bytes
            hard = self.saved[1]
            soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.saved)
        return False


# ---------------------------------------------------------------- probes

class InputsDoNotFit(MemoryError):
    """The case's inputs alone could not be allocated (so the op itself was never run)."""


def _inputs(op, spec: CaseSpec):
    try:
        return input_sets(op, spec, 1)[0]
    except Exception as exc:  # noqa: BLE001
        if is_out_of_memory(exc):
            raise InputsDoNotFit(f"building the inputs: {short_error(exc)}") from None
        raise

def probe(spec: CaseSpec, cap_bytes: Optional[int] = None, step=None) -> ProbeResult:
    """Run one step of `spec` in this process and measure its peak extra memory.

    On the CPU the libraries are first warmed up with a tiny call of the same implementation.
    `step`: the caller's step for this exact case, already run (CUDA: compiled and autotuned, so
    compilation stays out of the measurement); None builds a fresh one (its first call is measured).
    """
    from .registry import get_op

    op = get_op(spec.op)
    warm = step is not None
    try:
        if step is None:
            step = make_step(op, op.impl(spec.impl).make_call(spec.context()))
        if spec.device == "cpu":
            step(input_sets(op, spec.tiny(), 1)[0])
            return _probe_cpu(op, spec, step, cap_bytes)
        return _probe_cuda(op, spec, step, warm)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded status
        return ProbeResult("oom" if is_out_of_memory(exc) else "error", message=short_error(exc))


def _probe_cpu(op, spec: CaseSpec, step, cap_bytes: Optional[int]) -> ProbeResult:
    method = "peak RSS (VmHWM) above RSS after inputs, fresh-process isolation set by the caller"
    inputs = None
    try:
        with AddressSpaceCap(cap_bytes):
            inputs = _inputs(op, spec)
            collect_garbage()
            malloc_trim()
            base = proc_status_bytes("VmRSS")
            reset_peak_rss()
            t0 = time.perf_counter()
            out, grads = step(inputs)
            elapsed = time.perf_counter() - t0
            peak = proc_status_bytes("VmHWM") - base
            value = check_finite(out)
            del out, grads
    except Exception as exc:  # noqa: BLE001
        status = "over-cap" if (is_out_of_memory(exc) and cap_bytes is not None) else (
            "oom" if is_out_of_memory(exc) else "error")
        return ProbeResult(status, cap_bytes=cap_bytes, method=method, message=short_error(exc))
    return ProbeResult("ok", peak, inputs.nbytes(), elapsed, value, cap_bytes, method)


def _probe_cuda(op, spec: CaseSpec, step, warm: bool) -> ProbeResult:
    method = "torch.cuda.max_memory_allocated above allocated after inputs" + ("" if warm else ", first call")
    try:
        result = _measure_cuda(op, spec, step, method)
    except Exception as exc:  # noqa: BLE001 - the frame holding the tensors is gone once this block ends
        result = ProbeResult("oom" if is_out_of_memory(exc) else "error", method=method, message=short_error(exc))
    release_cuda_memory()
    return result


def _measure_cuda(op, spec: CaseSpec, step, method: str) -> ProbeResult:
    import torch

    inputs = _inputs(op, spec)
    torch.cuda.synchronize()
    collect_garbage()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out, _ = step(inputs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    return ProbeResult("ok", peak, inputs.nbytes(), elapsed, check_finite(out), None, method)


def release_cuda_memory() -> None:
    """Drop cached blocks after a case (or an OOM), so the next case starts from an empty cache."""
    import torch

    collect_garbage()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- subprocess driver (CPU)

class ProbeWorker:
    """Runs CPU memory probes in a child process (``python -m benchmarks.memprobe``).

    isolation="case": a fresh child for every probe (the default: nothing one implementation
    allocated or retained can hide another's peak). isolation="batch": one child serves every
    probe in turn (faster; each probe still starts from a trimmed heap and a reset VmHWM).
    A child that dies or times out fails its probe; the next probe starts a new child.
    """

    def __init__(self, cap_bytes: Optional[int], isolation: str = "case", timeout_s: float = 3600.0):
        if isolation not in ("case", "batch"):
            raise ValueError(f"isolation must be 'case' or 'batch', got {isolation!r}")
        self.cap_bytes, self.isolation, self.timeout_s = cap_bytes, isolation, timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.stderr = None

    def probe(self, spec: CaseSpec, cap_bytes: Optional[int] = -1) -> ProbeResult:
        """Probe `spec` in the child; `cap_bytes` overrides the worker's cap (-1: keep it)."""
        cap = self.cap_bytes if cap_bytes == -1 else cap_bytes
        if self.proc is None:
            self._start()
        line = ""
        try:
            self.proc.stdin.write(json.dumps({"cap_bytes": cap, "case": spec.to_dict()}) + "\n")
            self.proc.stdin.flush()
            line = self._readline()
            result = ProbeResult(**json.loads(line)) if line else self._died(cap)
        except (BrokenPipeError, OSError):
            result = self._died(cap)
        if self.isolation == "case" or not line:
            self.close()
        return result

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memprobe"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO_ROOT, env=env)

    def _readline(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return ""
        return self.proc.stdout.readline()

    def _died(self, cap: Optional[int]) -> ProbeResult:
        code = self.proc.poll() if self.proc is not None else None
        tail = ""
        if self.stderr is not None:
            self.stderr.seek(0)
            tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
        return ProbeResult("error", cap_bytes=cap,
                           message=f"memory-probe process ended (exit {code}) during this case: {tail}"[:300])
