"""One benchmark case: (op, implementation, device, dtype, shape) turned into a callable step.

The step is what every measurement runs: the op's forward and, for losses, the
gradients w.r.t. the inputs that need them (``torch.autograd.grad``, so nothing
accumulates in ``.grad`` between calls).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .registry import Context, Inputs, Op, Shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TINY_N = 64  # warm-up size: loads libraries and lazy state without touching the real allocation pattern


@dataclass(frozen=True)
class CaseSpec:
    """A serialisable description of one case (sent to memory-probe subprocesses as JSON)."""

    op: str
    impl: str
    device: str
    dtype: str
    n: int
    d: int
    m: Optional[int] = None
    dt: Optional[int] = None
    seed: int = 0

    @property
    def shape(self) -> Shape:
        return Shape(self.n, self.d, self.m, self.dt)

    def context(self) -> Context:
        return Context(self.device, DTYPES[self.dtype], self.shape)

    def resized(self, n: int) -> "CaseSpec":
        """The same case at batch size n (M follows N when the case is square)."""
        return CaseSpec(self.op, self.impl, self.device, self.dtype, n, self.d,
                        None if self.m is None else n, self.dt, self.seed)

    def tiny(self) -> "CaseSpec":
        return self.resized(min(self.n, TINY_N))

    def to_dict(self) -> dict:
        return asdict(self)


Step = Callable[[Inputs], Tuple[object, object]]


def make_step(op: Op, call: Callable) -> Step:
    """fwd+bwd: (outputs, gradients of their sum); fwd: (outputs, None) under no_grad."""
    if op.mode == "fwd":
        def forward(inputs: Inputs):
            with torch.no_grad():
                return call(inputs.tensors), None
        return forward

    def forward_backward(inputs: Inputs):
        out = call(inputs.tensors)
        loss = sum(out) if isinstance(out, (tuple, list)) else out
        return out, torch.autograd.grad(loss, inputs.grad_tensors())

    return forward_backward


def value_of(out) -> float:
    """A scalar summary of an op's output, for checking implementations agree (syncs the device):
    the loss (the sum of the losses for a tuple), or the first metric of a dict."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return float(sum(_scalar(o) for o in out))
    return _scalar(out)


def _scalar(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def check_finite(out) -> float:
    """The output's value; raises if it is not finite (a broken run must not be reported as fast)."""
    value = value_of(out)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite output {value}")
    return value


def input_sets(op: Op, spec: CaseSpec, count: int) -> List[Inputs]:
    """`count` independent input sets; the first is drawn from `spec.seed`, so every implementation
    of a case sees the same first input set."""
    ctx = spec.context()
    sets = []
    for k in range(count):
        gen = torch.Generator(device=spec.device).manual_seed(spec.seed + k)
        sets.append(op.make_inputs(ctx, gen))
    return sets


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: CUDA OOM, the CPU allocator hitting RLIMIT_AS, MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def short_error(exc: BaseException) -> str:
    """First line of an exception, prefixed by its type, at most 300 characters."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}"[:300]
