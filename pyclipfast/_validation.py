"""Argument checks shared by every loss.

Metadata checks (shape, rank, dtype, device, options) always run and cost no
device sync. Data checks (non-finite values, scale <= 0, rows without a
positive) run by default on CPU tensors and, because each one is a host sync,
on GPU tensors only when validation is on (`set_validation(True)` or
``PYCLIPFAST_VALIDATE=1``); `set_validation(False)` turns them off for CPU
tensors too. Inside a graph torch.compile is tracing they never run (they would
break the graph): a non-finite input then propagates to a NaN loss.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ScaleLike = Union[torch.Tensor, float, int]

_validation_on: Optional[bool] = None


def set_validation(enabled: bool) -> None:
    """Switch the data checks on (CPU and GPU tensors) or off (CPU tensors too).

    Without a call, they run on CPU tensors and, with ``PYCLIPFAST_VALIDATE=1``, on GPU tensors.
    Never inside a torch.compile'd graph."""
    global _validation_on
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _validation_on = enabled


def validation_enabled() -> bool:
    """Whether data checks run on GPU tensors (set_validation, else PYCLIPFAST_VALIDATE)."""
    if _validation_on is not None:
        return _validation_on
    return os.environ.get("PYCLIPFAST_VALIDATE", "0").strip().lower() in ("1", "true", "yes", "on")


def data_checks_on(t: torch.Tensor) -> bool:
    """True when data checks (which sync with the device) should run for tensors like `t`:
    never while torch.compile traces a graph; else as `set_validation` says, by default on CPU."""
    if torch.compiler.is_compiling():
        return False
    if _validation_on is not None:
        return _validation_on
    return t.device.type == "cpu" or validation_enabled()


def check_option(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_features(name: str, x, *, like: Optional[torch.Tensor] = None, like_name: str = "") -> None:
    """A (rows, D) floating tensor, non-empty, matching `like` in dtype, device and D."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)})")
    if like is not None:
        if x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {like_name} has {like.dtype}; they must match")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}; they must match")
        if x.shape[1] != like.shape[1]:
            raise ValueError(
                f"{name} has feature dimension {x.shape[1]} but {like_name} has {like.shape[1]}; they must match"
            )


def check_finite(name: str, x: torch.Tensor) -> None:
    if data_checks_on(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def as_scale(name: str, value: ScaleLike, like: torch.Tensor, *, positive: bool = True) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device; Python numbers are wrapped (no gradient).

    A number becomes a device fill (torch.full), not a host-to-device copy, so the call stays
    free of host syncs and capturable in a CUDA graph."""
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, float, int)):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        t = value.reshape(())
    else:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        t = torch.full((), float(value), dtype=dtype, device=like.device)
    if data_checks_on(t):
        v = float(t.detach())
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {v}")
        if positive and v <= 0:
            raise ValueError(f"{name} must be > 0 (it is the already exponentiated scale), got {v}")
    return t


def check_ids(
    image_ids, text_ids, image_features: torch.Tensor, text_features: torch.Tensor,
    *, names: tuple = ("image_ids", "text_ids"), require_square: bool = True,
):
    """Validate the optional positive-pair ids; both or neither must be given."""
    n, m = image_features.shape[0], text_features.shape[0]
    if (image_ids is None) != (text_ids is None):
        given, missing = (names[0], names[1]) if text_ids is None else (names[1], names[0])
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    if image_ids is None:
        if require_square and n != m:
            raise ValueError(
                f"image batch has {n} rows and text batch {m}; without {names[0]}/{names[1]} the "
                "positives are the diagonal, which needs equal batch sizes"
            )
        return None, None
    for name, ids, rows in ((names[0], image_ids, n), (names[1], text_ids, m)):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows},), got {tuple(ids.shape)}")
        if ids.device != image_features.device:
            raise ValueError(f"{name} is on {ids.device} but the features are on {image_features.device}")
    # contiguous int64 for every backend: the kernels index ids as flat arrays
    return image_ids.long().contiguous(), text_ids.long().contiguous()


def positive_counts(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """For each row id, how many col ids equal it (O((N+M) log M), no N×M matrix)."""
    sorted_cols, _ = torch.sort(col_ids)
    lo = torch.searchsorted(sorted_cols, row_ids, right=False)
    hi = torch.searchsorted(sorted_cols, row_ids, right=True)
    return hi - lo


def check_has_positive(counts: torch.Tensor, what: str) -> None:
    """Raise naming the first row/column with no positive (data check)."""
    if data_checks_on(counts):
        missing = (counts == 0).nonzero()
        if missing.numel():
            idx = int(missing[0, 0])
            raise ValueError(
                f"{what} {idx} has no positive (no matching id on the other side); "
                f"{missing.numel()} such {what}s in total"
            )
