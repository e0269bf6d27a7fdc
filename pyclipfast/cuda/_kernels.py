"""The CUDA kernels as Python functions: argument checks, then one call into the C library.

Every check runs here, once, before any launch, on metadata only (no device sync): shapes
and dtypes first and devices last, so that all of them can be exercised without a GPU. The
library (csrc/pyclipfast_c.h) checks nothing. Each function then passes raw pointers, sizes,
strides and scalars with the tensors' device and torch's current stream on it; the library
switches to that device for the launch. Output buffers are allocated by the callers
(pyclipfast/cuda/<loss>.py).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import _library

BLOCK_M = _library.load().pcf_block_m()
BLOCK_N = _library.load().pcf_block_n()
MAX_GRID_Y = 65535
INT32_MAX = 2**31 - 1

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DIAGONAL, IDS, NO_POSITIVES = range(3)  # PosMode
PAIR_RULES = range(4)  # PairRule: none, exclude equal ids, penalise unequal ids, penalise equal ids
DISTILL_STATS, DISTILL_STATS_NO_KD = 8, 3  # DistillStat
DISTILL_VECTORS, DISTILL_VECTORS_NO_KD = 7, 3  # DistillVector

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


# ----------------------------------------------------------------------------- checks


def _tensor(t, name: str) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _feature_dtype(t: Tensor, name: str) -> int:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _check_features(a: Tensor, b: Tensor) -> int:
    """A and B: non-empty (rows, dim) matrices of one supported dtype and one dim; any strides."""
    for t, name in ((a, "a"), (b, "b")):
        _tensor(t, name)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    dtype = _feature_dtype(a, "a")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype} but a has {a.dtype}; they must match")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b has feature dimension {b.shape[1]} but a has {a.shape[1]}; they must match")
    return dtype


def _check_f32(t: OptTensor, name: str, *shape: int) -> None:
    """A contiguous float32 tensor of `shape`; one length: a vector (a device scalar when 1)."""
    if t is None:
        return
    _tensor(t, name)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if len(shape) == 1:
        if t.dim() > 1 or t.numel() != shape[0]:
            raise ValueError(f"{name} must be a vector of {shape[0]} elements, got shape {tuple(t.shape)}")
    elif tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_ids(row_ids: OptTensor, col_ids: OptTensor, n: int, m: int) -> int:
    """Positive-pair ids: both or neither, contiguous int64 of lengths N and M; returns the PosMode."""
    if (row_ids is None) != (col_ids is None):
        given = "row_ids" if row_ids is not None else "col_ids"
        raise ValueError(f"row_ids and col_ids must be given together, got {given} alone")
    if row_ids is None:
        return DIAGONAL
    for t, name, length in ((row_ids, "row_ids", n), (col_ids, "col_ids", m)):
        _tensor(t, name)
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return IDS


def _check_pair_rule(pair_rule: int, penalty: float, row_ids: OptTensor, pos_mode: int,
                     rows_only: Dict[str, OptTensor]) -> int:
    """The InfoNCE pair rule: a PairRule code; with one, ids are required, the sweep is rows only
    (`rows_only` must all be None) and the ids select pairs, not positives. Returns the PosMode."""
    if isinstance(pair_rule, bool) or pair_rule not in PAIR_RULES:
        raise ValueError(f"pair_rule must be one of {list(PAIR_RULES)}, got {pair_rule!r}")
    if not math.isfinite(penalty):
        raise ValueError(f"penalty must be finite, got {penalty}")
    if pair_rule == 0:
        return pos_mode
    if row_ids is None:
        raise ValueError(f"pair_rule={pair_rule} needs row_ids and col_ids")
    given = [name for name, t in rows_only.items() if t is not None]
    if given:
        raise ValueError(f"pair_rule={pair_rule} is rows only: {', '.join(given)} must be None")
    return NO_POSITIVES


def _check_g_out(g_out: OptTensor, a: Tensor, rows: int, cols: int) -> None:
    """The gradient tile buffer: (rows, cols) in the features' dtype, any strides."""
    if g_out is None:
        return
    _tensor(g_out, "g_out")
    if g_out.dtype != a.dtype:
        raise TypeError(f"g_out must have the features' dtype {a.dtype}, got {g_out.dtype}")
    if tuple(g_out.shape) != (rows, cols):
        raise ValueError(f"g_out must have shape ({rows}, {cols}) for the block, got {tuple(g_out.shape)}")


def _check_block(row0: int, row1: int, col0: int, col1: int, n: int, m: int) -> int:
    """The block [row0, row1) × [col0, col1) of the N × M score matrix; returns its tile count."""
    if not 0 <= row0 < row1 <= n:
        raise ValueError(f"rows [row0, row1) = [{row0}, {row1}) must be a non-empty range within [0, {n})")
    if not 0 <= col0 < col1 <= m:
        raise ValueError(f"columns [col0, col1) = [{col0}, {col1}) must be a non-empty range within [0, {m})")
    tiles = math.ceil((row1 - row0) / BLOCK_M) * math.ceil((col1 - col0) / BLOCK_N)
    if tiles > INT32_MAX:
        raise ValueError(f"the block has {tiles} tiles, more than one launch takes ({INT32_MAX}); split it")
    return tiles


def _check_groups(side: str, groups: int, per_group: int, blocks: int, max_groups: int) -> None:
    """The forward grid: `groups` programs of `per_group` blocks each must cover all `blocks`."""
    if not 1 <= groups <= max_groups:
        raise ValueError(f"{side}_groups must be in [1, {max_groups}], got {groups}")
    if not (1 <= per_group <= INT32_MAX and groups * per_group >= blocks):
        raise ValueError(f"{side}_groups × {side}_blocks_per_group = {groups} × {per_group} must cover the "
                         f"{blocks} {side} blocks")


def _launch_place(first: Tuple[str, Tensor], others: Dict[str, OptTensor]) -> Tuple[int, int]:
    """(device index, stream handle): the first tensor must be on a CUDA device and every other given
    one on the same device. Recording (no launch) also takes CPU tensors: device -1, stream 0."""
    name, x = first
    if x.device.type != "cuda" and not _library.recording_calls():
        raise ValueError(f"{name} must be a CUDA tensor, got device {x.device}")
    for other, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{other} is on {t.device} but {name} is on {x.device}; every tensor must be on "
                             f"{name}'s CUDA device")
    if x.device.type != "cuda":
        return -1, 0
    return x.device.index, torch.cuda.current_stream(x.device).cuda_stream


def _ptr(t: OptTensor) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _score(a: Tensor, b: Tensor, scale: Tensor, dtype: int, tf32: bool, pos_mode: int, row_ids: OptTensor,
           col_ids: OptTensor) -> Dict:
    return dict(dtype=dtype, a=a.data_ptr(), b=b.data_ptr(), n_rows=a.shape[0], n_cols=b.shape[0], dim=a.shape[1],
                stride_am=a.stride(0), stride_ak=a.stride(1), stride_bn=b.stride(0), stride_bk=b.stride(1),
                tf32=int(bool(tf32) and a.dtype == torch.float32), scale=scale.data_ptr(), pos_mode=pos_mode,
                row_ids=_ptr(row_ids), col_ids=_ptr(col_ids))


def _g_out(g_out: OptTensor) -> Dict:
    return dict(g_out=_ptr(g_out), stride_gm=g_out.stride(0) if g_out is not None else 0,
                stride_gn=g_out.stride(1) if g_out is not None else 0)


def _block(row0: int, row1: int, col0: int, col1: int) -> Dict:
    return dict(row0=row0, row1=row1, col0=col0, col1=col1)


def _groups(row_groups: int, col_groups: int, row_blocks_per_group: int, col_blocks_per_group: int) -> Dict:
    return dict(row_groups=row_groups, col_groups=col_groups, row_blocks_per_group=row_blocks_per_group,
                col_blocks_per_group=col_blocks_per_group)


def _run(fn: str, first: Tuple[str, Tensor], tensors: Dict[str, OptTensor], fields: Dict) -> None:
    device, stream = _launch_place(first, tensors)
    _library.call(fn, dict(fields, device=device, stream=stream))


# ----------------------------------------------------------------------------- kernels


def clip_forward(a: Tensor, b: Tensor, scale: Tensor, row_ids: OptTensor, col_ids: OptTensor, row_max: Tensor,
                 row_sum: Tensor, row_pos: Tensor, col_max: OptTensor, col_sum: OptTensor, col_pos: OptTensor,
                 row_groups: int, col_groups: int, row_blocks_per_group: int, col_blocks_per_group: int,
                 tf32: bool, pair_rule: int = 0, penalty: float = 0.0, row_dot: OptTensor = None,
                 col_dot: OptTensor = None) -> None:
    """InfoNCE forward sweep: per-group (max, sum-exp, positive sum) of rows and columns of S = s·A·Bᵀ;
    with a pair rule rows only, row_pos then only carries NaN for a non-finite score; with row_dot
    (and col_dot when bidirectional) also the per-group Σ exp(S − max)·S (never with a pair rule)."""
    dtype = _check_features(a, b)
    n, m = a.shape[0], b.shape[0]
    _check_f32(_tensor(scale, "scale"), "scale", 1)
    pos_mode = _check_ids(row_ids, col_ids, n, m)
    pos_mode = _check_pair_rule(pair_rule, penalty, row_ids, pos_mode, dict(col_max=col_max))
    _check_groups("row", row_groups, row_blocks_per_group, math.ceil(n / BLOCK_M), INT32_MAX)
    _check_groups("col", col_groups, col_blocks_per_group, math.ceil(m / BLOCK_N), MAX_GRID_Y)
    for t, name in ((row_max, "row_max"), (row_sum, "row_sum"), (row_pos, "row_pos")):
        _check_f32(_tensor(t, name), name, col_groups, n)
    if not (col_max is None) == (col_sum is None) == (col_pos is None):
        raise ValueError("col_max, col_sum and col_pos must be given together (or none, for rows only)")
    for t, name in ((col_max, "col_max"), (col_sum, "col_sum"), (col_pos, "col_pos")):
        _check_f32(t, name, row_groups, m)
    if pair_rule and row_dot is not None:
        raise ValueError("row_dot/col_dot cannot be computed with a pair_rule (the dots are for the plain sweep)")
    if col_dot is not None and row_dot is None:
        raise ValueError("col_dot needs row_dot (the dots are computed for rows and columns together)")
    if row_dot is not None and (col_dot is None) != (col_max is None):
        raise ValueError("col_dot must be given exactly when the columns are (col_max, col_sum, col_pos)")
    _check_f32(row_dot, "row_dot", col_groups, n)
    _check_f32(col_dot, "col_dot", row_groups, m)
    outputs = dict(row_max=row_max, row_sum=row_sum, row_pos=row_pos, col_max=col_max, col_sum=col_sum,
                   col_pos=col_pos, row_dot=row_dot, col_dot=col_dot)
    _run("clip_forward", ("a", a), dict(b=b, scale=scale, row_ids=row_ids, col_ids=col_ids, **outputs),
         dict(_score(a, b, scale, dtype, tf32, pos_mode, row_ids, col_ids),
              **{k: _ptr(v) for k, v in outputs.items()},
              **_groups(row_groups, col_groups, row_blocks_per_group, col_blocks_per_group),
              pair_rule=pair_rule, penalty=float(penalty)))


def clip_grad(a: Tensor, b: Tensor, scale: Tensor, row_ids: OptTensor, col_ids: OptTensor, row_lse: OptTensor,
              col_lse: OptTensor, g_row: OptTensor, g_col: OptTensor, g_row_pos: OptTensor, g_col_pos: OptTensor,
              inv_norm: Tensor, g_out: OptTensor, dscale_part: Tensor, row0: int, row1: int, col0: int, col1: int,
              tf32: bool, pair_rule: int = 0, penalty: float = 0.0) -> None:
    """InfoNCE gradient tiles G·inv_norm of one block of S and their dscale partials (with a pair
    rule: from row_lse and g_row only)."""
    dtype = _check_features(a, b)
    n, m = a.shape[0], b.shape[0]
    _check_f32(_tensor(scale, "scale"), "scale", 1)
    pos_mode = _check_ids(row_ids, col_ids, n, m)
    pos_mode = _check_pair_rule(pair_rule, penalty, row_ids, pos_mode,
                                dict(col_lse=col_lse, g_col=g_col, g_row_pos=g_row_pos, g_col_pos=g_col_pos))
    if g_row is not None and row_lse is None:
        raise ValueError("g_row needs row_lse")
    if g_col is not None and col_lse is None:
        raise ValueError("g_col needs col_lse")
    vectors = dict(row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col, g_row_pos=g_row_pos,
                   g_col_pos=g_col_pos)
    for name, t in vectors.items():
        _check_f32(t, name, n if name.startswith(("row", "g_row")) else m)
    _check_f32(_tensor(inv_norm, "inv_norm"), "inv_norm", 1)
    tiles = _check_block(row0, row1, col0, col1, n, m)
    _check_g_out(g_out, a, row1 - row0, col1 - col0)
    _check_f32(_tensor(dscale_part, "dscale_part"), "dscale_part", tiles)
    _run("clip_grad", ("a", a), dict(b=b, scale=scale, row_ids=row_ids, col_ids=col_ids, **vectors,
                                     inv_norm=inv_norm, g_out=g_out, dscale_part=dscale_part),
         dict(_score(a, b, scale, dtype, tf32, pos_mode, row_ids, col_ids), **{k: _ptr(v) for k, v in vectors.items()},
              inv_norm=inv_norm.data_ptr(), **_g_out(g_out), dscale_part=dscale_part.data_ptr(),
              **_block(row0, row1, col0, col1), pair_rule=pair_rule, penalty=float(penalty)))


def siglip(a: Tensor, b: Tensor, scale: Tensor, bias: OptTensor, row_ids: OptTensor, col_ids: OptTensor,
           negative_only: bool, g_out: OptTensor, loss_part: Tensor, dscale_part: Tensor, dbias_part: Tensor,
           row0: int, row1: int, col0: int, col1: int, tf32: bool) -> None:
    """SigLIP loss/dscale/dbias partials and the gradient tile G of one block of S."""
    dtype = _check_features(a, b)
    n, m = a.shape[0], b.shape[0]
    _check_f32(_tensor(scale, "scale"), "scale", 1)
    _check_f32(bias, "bias", 1)
    pos_mode = _check_ids(row_ids, col_ids, n, m)
    tiles = _check_block(row0, row1, col0, col1, n, m)
    _check_g_out(g_out, a, row1 - row0, col1 - col0)
    parts = dict(loss_part=loss_part, dscale_part=dscale_part, dbias_part=dbias_part)
    for name, t in parts.items():
        _check_f32(_tensor(t, name), name, tiles)
    _run("siglip", ("a", a), dict(b=b, scale=scale, bias=bias, row_ids=row_ids, col_ids=col_ids, g_out=g_out, **parts),
         dict(_score(a, b, scale, dtype, tf32, NO_POSITIVES if negative_only else pos_mode, row_ids, col_ids),
              bias=_ptr(bias), **_g_out(g_out), **{k: v.data_ptr() for k, v in parts.items()},
              **_block(row0, row1, col0, col1)))


def _distill_options(margin: float, threshold: Optional[float], kd: int, angle_eps: float) -> Dict:
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if kd not in (0, 1, 2):
        raise ValueError(f"kd must be 0 (off), 1 (kl) or 2 (ce), got {kd}")
    if not 0 < angle_eps < 0.5:
        raise ValueError(f"angle_eps must be in (0, 0.5), got {angle_eps}")
    return dict(margin=float(margin), filter=int(threshold is not None),
                threshold=float(threshold) if threshold is not None else 0.0, kd=kd, angle_eps=float(angle_eps))


def _distill_teacher(ta: OptTensor, tb: OptTensor, teacher_scale: OptTensor, a: Tensor, b: Tensor,
                     options: Dict) -> Dict:
    """The teacher (ta N × Dt, tb M × Dt in a's dtype, its scale), needed for a margin, a filter or kd;
    the teacher's kernel fields (all null when no option reads it)."""
    if not (ta is None) == (tb is None) == (teacher_scale is None):
        raise ValueError("ta, tb and teacher_scale must be given together or not at all")
    needed = options["margin"] > 0 or options["filter"] or options["kd"] != 0
    if ta is None and needed:
        raise ValueError("ta, tb and teacher_scale (the teacher) are needed for a margin, a filter or kd")
    if ta is not None:
        for t, name, rows in ((ta, "ta", a.shape[0]), (tb, "tb", b.shape[0])):
            _tensor(t, name)
            if t.dim() != 2 or t.shape[0] != rows or t.shape[1] == 0:
                raise ValueError(f"{name} must have shape ({rows}, teacher_dim), got {tuple(t.shape)}")
            if t.dtype != a.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but a has {a.dtype}; they must match")
        if tb.shape[1] != ta.shape[1]:
            raise ValueError(f"tb has feature dimension {tb.shape[1]} but ta has {ta.shape[1]}; they must match")
        _check_f32(teacher_scale, "teacher_scale", 1)
    if ta is None or not needed:
        return dict(ta=None, tb=None, teacher_dim=0, stride_tam=0, stride_tak=0, stride_tbn=0, stride_tbk=0,
                    teacher_scale=None)
    return dict(ta=ta.data_ptr(), tb=tb.data_ptr(), teacher_dim=ta.shape[1], stride_tam=ta.stride(0),
                stride_tak=ta.stride(1), stride_tbn=tb.stride(0), stride_tbk=tb.stride(1),
                teacher_scale=teacher_scale.data_ptr())


def _distill_fields(a: Tensor, b: Tensor, scale: Tensor, ta: OptTensor, tb: OptTensor,
                    teacher_scale: OptTensor, row_ids: OptTensor, col_ids: OptTensor, margin: float,
                    threshold: Optional[float], kd: int, angle_eps: float, tf32: bool) -> Dict:
    """The kernel fields both distillation launchers share: scores, ids, teacher and options (checked)."""
    dtype = _check_features(a, b)
    _check_f32(_tensor(scale, "scale"), "scale", 1)
    options = _distill_options(margin, threshold, kd, angle_eps)
    teacher = _distill_teacher(ta, tb, teacher_scale, a, b, options)
    pos_mode = _check_ids(row_ids, col_ids, a.shape[0], b.shape[0])
    return dict(_score(a, b, scale, dtype, tf32, pos_mode, row_ids, col_ids), **teacher, **options)


def distill_forward(a: Tensor, b: Tensor, scale: Tensor, ta: OptTensor, tb: OptTensor, teacher_scale: OptTensor,
                    row_ids: OptTensor, col_ids: OptTensor, row_part: Tensor, col_part: Tensor, row_groups: int,
                    col_groups: int, row_blocks_per_group: int, col_blocks_per_group: int, margin: float,
                    threshold: Optional[float], kd: int, angle_eps: float, tf32: bool) -> None:
    """Distillation forward sweep: per-group statistics of Z, U and V along rows and columns."""
    fields = _distill_fields(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, margin, threshold, kd,
                             angle_eps, tf32)
    n, m = a.shape[0], b.shape[0]
    _check_groups("row", row_groups, row_blocks_per_group, math.ceil(n / BLOCK_M), INT32_MAX)
    _check_groups("col", col_groups, col_blocks_per_group, math.ceil(m / BLOCK_N), MAX_GRID_Y)
    stats = DISTILL_STATS if kd else DISTILL_STATS_NO_KD
    _check_f32(_tensor(row_part, "row_part"), "row_part", stats, col_groups, n)
    _check_f32(_tensor(col_part, "col_part"), "col_part", stats, row_groups, m)
    _run("distill_forward", ("a", a),
         dict(b=b, scale=scale, ta=ta, tb=tb, teacher_scale=teacher_scale, row_ids=row_ids, col_ids=col_ids,
              row_part=row_part, col_part=col_part),
         dict(fields,
              row_part=row_part.data_ptr(), col_part=col_part.data_ptr(),
              **_groups(row_groups, col_groups, row_blocks_per_group, col_blocks_per_group)))


def distill_grad(a: Tensor, b: Tensor, scale: Tensor, ta: OptTensor, tb: OptTensor, teacher_scale: OptTensor,
                 row_ids: OptTensor, col_ids: OptTensor, row_vec: Tensor, col_vec: Tensor, inv_norm: Tensor,
                 g_out: OptTensor, dscale_part: Tensor, row0: int, row1: int, col0: int, col1: int, margin: float,
                 threshold: Optional[float], kd: int, angle_eps: float, tf32: bool) -> None:
    """Distillation gradient tiles H·inv_norm of one block and their dscale partials."""
    fields = _distill_fields(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, margin, threshold, kd,
                             angle_eps, tf32)
    n, m = a.shape[0], b.shape[0]
    vectors = DISTILL_VECTORS if kd else DISTILL_VECTORS_NO_KD
    _check_f32(_tensor(row_vec, "row_vec"), "row_vec", vectors, n)
    _check_f32(_tensor(col_vec, "col_vec"), "col_vec", vectors, m)
    _check_f32(_tensor(inv_norm, "inv_norm"), "inv_norm", 1)
    tiles = _check_block(row0, row1, col0, col1, n, m)
    _check_g_out(g_out, a, row1 - row0, col1 - col0)
    _check_f32(_tensor(dscale_part, "dscale_part"), "dscale_part", tiles)
    _run("distill_grad", ("a", a),
         dict(b=b, scale=scale, ta=ta, tb=tb, teacher_scale=teacher_scale, row_ids=row_ids, col_ids=col_ids,
              row_vec=row_vec, col_vec=col_vec, inv_norm=inv_norm, g_out=g_out, dscale_part=dscale_part),
         dict(fields,
              row_vec=row_vec.data_ptr(), col_vec=col_vec.data_ptr(), inv_norm=inv_norm.data_ptr(),
              **_g_out(g_out), dscale_part=dscale_part.data_ptr(), **_block(row0, row1, col0, col1)))


def _check_grad_out(g: OptTensor, name: str, like: Tensor) -> None:
    """A gradient buffer of the cosine loss: contiguous, the features' shape and dtype."""
    if g is None:
        return
    _tensor(g, name)
    if g.dtype != like.dtype:
        raise TypeError(f"{name} must have the features' dtype {like.dtype}, got {g.dtype}")
    if g.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(g.shape)}")
    if not g.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def cosine(online: Tensor, target: Tensor, cos: Tensor, d_online: OptTensor, d_target: OptTensor,
           grad_scale: float, eps: float) -> None:
    """Cosine loss rows: cos_i and the gradients of grad_scale·Σ cos_i in one pass."""
    _tensor(online, "online")
    if online.dim() != 2 or online.numel() == 0:
        raise ValueError(f"online must be a non-empty 2-D (rows, dim) tensor, got shape {tuple(online.shape)}")
    dtype = _feature_dtype(online, "online")
    n, d = online.shape
    _tensor(target, "target")
    if target.dtype != online.dtype:
        raise TypeError(f"target has dtype {target.dtype} but online has {online.dtype}; they must match")
    if target.shape != online.shape:
        raise ValueError(f"target must have shape ({n}, {d}) like online, got {tuple(target.shape)}")
    _check_f32(_tensor(cos, "cos"), "cos", n)
    _check_grad_out(d_online, "d_online", online)
    _check_grad_out(d_target, "d_target", online)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _run("cosine", ("online", online), dict(target=target, cos=cos, d_online=d_online, d_target=d_target),
         dict(dtype=dtype, online=online.data_ptr(), target=target.data_ptr(), n_rows=n, dim=d,
              stride_pm=online.stride(0), stride_pk=online.stride(1), stride_zm=target.stride(0),
              stride_zk=target.stride(1), cos=cos.data_ptr(), d_online=_ptr(d_online), d_target=_ptr(d_target),
              grad_scale=float(grad_scale), eps=float(eps)))
