"""What can be benchmarked: ops (a loss or a metric) and their implementations.

An `Op` knows its minimum-work cost model (minimum FLOPs and bytes for one timed call),
how to build random inputs, and which `Impl`s compute it. An `Impl` is one
implementation: a pyclipfast backend, a peer library (open_clip, Inf-CL,
siglip-kernel) or a plain PyTorch baseline. Each op lives in its own module
under ``benchmarks/ops/``, which calls `register`; `discover` imports them all.
Adding a loss to the suite means adding one such module.

Nothing here imports a peer: an `Impl` says which modules it needs, and one
that is not installed is skipped with a note rather than an error.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

# An input set: named tensors; `Inputs.grad_names` lists those that receive gradients.
Tensors = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """Problem size of one case: N images, M texts, feature width D, teacher width Dt (distillation)."""

    n: int
    d: int
    m: Optional[int] = None
    dt: Optional[int] = None

    @property
    def cols(self) -> int:
        return self.n if self.m is None else self.m

    @property
    def teacher_dim(self) -> int:
        return self.d if self.dt is None else self.dt

    def label(self) -> str:
        text = f"N={self.n} D={self.d}"
        if self.m is not None and self.m != self.n:
            text += f" M={self.m}"
        if self.dt is not None:
            text += f" Dt={self.dt}"
        return text


@dataclass
class Inputs:
    """One input set for a case: the tensors and which of them need gradients."""

    tensors: Tensors
    grad_names: Sequence[str]

    def grad_tensors(self) -> List[torch.Tensor]:
        return [self.tensors[k] for k in self.grad_names]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Context:
    """Where a case runs: device type ('cpu' or 'cuda'), dtype, shape."""

    device: str
    dtype: torch.dtype
    shape: Shape


# Builds the call to time from one input set: returns the loss (or a tuple of losses) / the metric.
Call = Callable[[Tensors], object]


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
        name: short unique name within the op ("pcf-torch", "open_clip", "inf-cl", ...).
        kind: "pyclipfast", "peer" or "baseline" (plain PyTorch written for the suite).
        make_call: `(Context) -> Call`; called once per case (it may compile or build a module).
        requires: modules that must be importable (checked without importing them).
        usable: `(Context) -> reason or None`; a reason skips the case with that note.
        notes: a remark printed beside every result of this implementation.
    """

    name: str
    kind: str
    make_call: Callable[[Context], Call]
    requires: Sequence[str] = ()
    usable: Callable[[Context], Optional[str]] = lambda ctx: None
    notes: str = ""

    def skip_reason(self, ctx: Context) -> Optional[str]:
        """Why this implementation cannot run `ctx` here, or None when it can."""
        for module in self.requires:
            if not module_available(module):
                return f"{module} is not installed"
        return self.usable(ctx)


@dataclass
class Op:
    """A benchmarked operation with its minimum-work cost model.

    Attributes:
        name: the loss name ("clip", "siglip", "distill", "cosine", "recall").
        title: a human title for tables and plots.
        api: the pyclipfast attribute it needs; the op is skipped while pyclipfast lacks it.
        flops: `(Shape) -> float`, minimum FLOPs of one timed call.
        min_bytes: `(Shape, element_size) -> float`, bytes one call must move (inputs read once,
            gradients written once).
        make_inputs: `(Context, generator) -> Inputs`.
        mode: "fwd+bwd" (loss and gradients) or "fwd" (a metric).
        baseline: the implementation ratios are taken against (first available of these names).
        impls: the implementations.
        dispatch: the name pyclipfast's backend dispatcher knows the op by (default: `name`).
    """

    name: str
    title: str
    api: str
    flops: Callable[[Shape], float]
    min_bytes: Callable[[Shape, int], float]
    make_inputs: Callable[[Context, torch.Generator], Inputs]
    mode: str = "fwd+bwd"
    baseline: Sequence[str] = ("open_clip", "reference")
    impls: List[Impl] = field(default_factory=list)
    dispatch: Optional[str] = None

    def __post_init__(self):
        self.dispatch = self.dispatch or self.name

    def skip_reason(self) -> Optional[str]:
        """Why this op cannot be benchmarked at all (pyclipfast does not export it yet)."""
        import pyclipfast

        if not hasattr(pyclipfast, self.api):
            return f"pyclipfast.{self.api} does not exist in this checkout"
        return None

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"op {self.name!r} has no implementation {name!r}; "
                       f"known: {', '.join(i.name for i in self.impls)}")


_OPS: Dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add an op to the registry (replacing one of the same name)."""
    _OPS[op.name] = op
    return op


def discover() -> Dict[str, Op]:
    """Import every module of ``benchmarks.ops`` (each registers its op) and return the registry."""
    from . import ops

    for info in pkgutil.iter_modules(ops.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{ops.__name__}.{info.name}")
    return dict(_OPS)


def get_op(name: str) -> Op:
    ops = discover()
    if name not in ops:
        raise KeyError(f"unknown op {name!r}; registered: {', '.join(sorted(ops))}")
    return ops[name]


def module_available(name: str) -> bool:
    """True if `name` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
