"""The fused part of every loss as a torch.library operator, one set per backend.

    pyclipfast::clip_forward_<backend>     (A, B, s, ids)        -> row_lse, col_lse, row_pos, col_pos, row_dot, col_dot
    pyclipfast::clip_backward_<backend>    (..., upstream grads) -> dA, dB, ds
    pyclipfast::clip_pairs_forward_<backend>  (A, B, s, ids, rule, α) -> row_lse (rows only, a pair rule)
    pyclipfast::clip_pairs_backward_<backend> (..., upstream grad)     -> dA, dB, ds
    pyclipfast::siglip_<backend>           (A, B, s, b, ids)     -> loss, dA, dB, ds, db
    pyclipfast::distill_forward_<backend>  (A, B, s, Tᵃ, Tᵇ, t)  -> the ten statistics of pyclipfast/distill.py
    pyclipfast::distill_backward_<backend> (..., upstream grads) -> dA, dB, ds
    pyclipfast::cosine_<backend>           (p, z)                -> loss, dp, dz
    pyclipfast::retrieval_count_<backend>  (Q, G, ids)           -> rank

<backend> is "torch" (chunked PyTorch), "triton" or "cuda". The Triton ops are
``torch.library.triton_op``s whose kernels launch through ``wrap_triton``, so
torch.compile's Inductor sees the kernels; the others are ``custom_op``s with a
fake (meta) implementation. Every forward op has its autograd registered
(``register_autograd``), so compile, export and ``torch.library.opcheck`` see a
proper operator; the loss functions call it through an autograd.Function with
the same setup_context and backward (``ops(...)["function"]``), which torch.func
transforms also accept. SigLIP and cosine produce their gradients in the same
sweep as the loss, for the inputs the caller says need them (``need_*``): the
loss functions decide that from ``torch.is_grad_enabled()`` and
``requires_grad``, so under ``torch.no_grad()`` nothing is computed or kept.

Operators return tensors only: an output a configuration does not produce
(column statistics of a rows-only sweep, the KD statistics without KD, a
gradient nobody needs) is an empty (0,) tensor. The backward ops are first
order: differentiating them again raises a RuntimeError.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._dispatch import implementation, triton_interpreting

FIRST_ORDER_ONLY = (
    "pyclipfast's losses support first-order gradients only: double backward (create_graph=True "
    "followed by a second backward through the gradient, torch.func.hessian, ...) is not implemented"
)
# Statistic names of the distillation forward op, in output order (pyclipfast/distill.py).
DISTILL_STATS = ("row_lse", "col_lse", "row_pos", "col_pos", "student_row_lse", "student_col_lse",
                 "row_cross", "col_cross", "teacher_row_lse", "teacher_col_lse")
DISTILL_KD_STATS = frozenset(DISTILL_STATS[4:])
DISTILL_LSE = ("row_lse", "col_lse", "student_row_lse", "student_col_lse", "teacher_row_lse", "teacher_col_lse")
DISTILL_GRAD = DISTILL_STATS[:8]

_registered: Dict[Tuple[str, str], Dict[str, Callable]] = {}


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ops(loss: str, backend: str) -> Dict[str, Callable]:
    """The registered operators of `loss` for a concrete backend ("torch", "triton", "cuda"),
    registering them on first use (importing the backend's module)."""
    key = (loss, backend)
    if key not in _registered:
        _registered[key] = {k: op if k == "function" else op._opoverload
                            for k, op in _REGISTER[loss](backend).items()}
    return _registered[key]


def _define(name: str, backend: str, fn: Callable, fake: Callable) -> Callable:
    """A custom op running `fn`; a triton_op on a GPU (the Triton interpreter cannot run on
    fake tensors, so there the explicit fake implementation stands in)."""
    qualname = f"pyclipfast::{name}_{backend}"
    if backend == "triton" and not triton_interpreting():
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op


def _function(name: str, op: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function over `op` with the op's own setup_context and backward: what the
    loss functions call, because torch.func transforms need a Function with setup_context
    (they do not see an operator's registered autograd); compile and export see the same
    formula either way."""
    overload = op._opoverload

    def forward(*args):
        out = overload(*args)
        return tuple(out) if isinstance(out, list) else out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


def run(fused: Dict[str, Callable], *args) -> Tuple[Tensor, ...]:
    """Call a loss's fused forward: through its autograd.Function when a gradient can flow,
    straight to the operator otherwise (no_grad, inputs without requires_grad)."""
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in args):
        return fused["function"].apply(*args)
    return tuple(fused["forward"](*args))


def distinct(row_ids: Optional[Tensor], col_ids: Optional[Tensor]) -> Optional[Tensor]:
    """col_ids, copied when it is the very tensor row_ids (an operator input may appear once)."""
    return col_ids.clone() if col_ids is not None and col_ids is row_ids else col_ids


def _first_order_only(ctx, *grads):
    raise RuntimeError(FIRST_ORDER_ONLY)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """t, or the empty placeholder of an output this configuration does not produce."""
    return like.new_empty((0,), dtype=compute_dtype(like)) if t is None else t


def _vec(like: Tensor, length, present: bool = True) -> Tensor:
    """Fake output: a compute-dtype vector of `length`, or the empty placeholder."""
    return like.new_empty((length,) if present else (0,), dtype=compute_dtype(like))


def _grad_like(x: Tensor, present: bool) -> Tensor:
    return x.new_empty(x.shape if present else (0,), dtype=x.dtype if present else compute_dtype(x))


def _scalar(like: Tensor, present: bool = True) -> Tensor:
    return like.new_empty(() if present else (0,), dtype=compute_dtype(like))


def _scale_grad(dscale: Tensor, scale: Tensor) -> Tensor:
    return dscale.to(scale.dtype).reshape(scale.shape)


def _no_autocast(x: Tensor):
    return torch.autocast(x.device.type, enabled=False)


# ---------------------------------------------------------------- first-order guard

class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a computed gradient that refuses to be differentiated again."""

    @staticmethod
    def forward(grad, *sources):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(FIRST_ORDER_ONLY)


def _first_order(results: Sequence[Optional[Tensor]], sources: Sequence) -> tuple:
    """The gradients a backward formula returns. They are computed without a graph; under
    create_graph (torch.autograd.grad(..., create_graph=True), torch.func) each is tied to the
    tensors it depends on by a node that raises if a second backward reaches it."""
    if not torch.is_grad_enabled():
        return tuple(results)
    tensors = [x for x in sources if isinstance(x, Tensor) and x.requires_grad]
    if not tensors:
        return tuple(results)
    return tuple(r if r is None else _FirstOrderOnly.apply(r, *tensors) for r in results)


def _times(grad: Tensor, g: Tensor, need: bool) -> Optional[Tensor]:
    return grad * g.to(grad.dtype) if need else None


# ---------------------------------------------------------------- InfoNCE

def _register_clip(backend: str) -> Dict[str, Callable]:
    impl = implementation("clip", backend)

    def forward(a: Tensor, b: Tensor, scale: Tensor, row_ids: Optional[Tensor], col_ids: Optional[Tensor],
                bidirectional: bool, dots: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _no_autocast(a):
            stats = impl.clip_forward(a, b, scale, row_ids, col_ids, bidirectional, dots)
        return tuple(_or_empty(x, a) for x in stats)

    def forward_fake(a, b, scale, row_ids, col_ids, bidirectional, dots=False):
        n, m = a.shape[0], b.shape[0]
        return (_vec(a, n), _vec(a, m, bidirectional), _vec(a, n), _vec(a, m, bidirectional), _vec(a, n, dots),
                _vec(a, m, bidirectional and dots))

    def backward(a: Tensor, b: Tensor, scale: Tensor, row_ids: Optional[Tensor], col_ids: Optional[Tensor],
                 row_lse: Tensor, col_lse: Optional[Tensor], g_row: Optional[Tensor], g_col: Optional[Tensor],
                 g_row_pos: Optional[Tensor], g_col_pos: Optional[Tensor], need_a: bool, need_b: bool,
                 need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(a):
            da, db, dscale = impl.clip_backward(a, b, scale, row_ids, col_ids, row_lse, col_lse, g_row, g_col,
                                                g_row_pos, g_col_pos, need_a=need_a, need_b=need_b,
                                                need_scale=need_scale)
        return _or_empty(da, a), _or_empty(db, a), _or_empty(dscale, a)

    def backward_fake(a, b, scale, row_ids, col_ids, row_lse, col_lse, g_row, g_col, g_row_pos, g_col_pos,
                      need_a, need_b, need_scale):
        return _grad_like(a, need_a), _grad_like(b, need_b), _scalar(a, need_scale)

    fwd = _define("clip_forward", backend, forward, forward_fake)
    bwd = _define("clip_backward", backend, backward, backward_fake)
    bwd.register_autograd(_first_order_only)
    bwd_op = bwd._opoverload

    def setup_context(ctx, inputs, output):
        a, b, scale, row_ids, col_ids, bidirectional = inputs[:6]
        ctx.bidirectional, ctx.n_inputs = bidirectional, len(inputs)
        ctx.save_for_backward(a, b, scale, row_ids, col_ids, output[0], output[1] if bidirectional else None)

    def grads(ctx, g_row, g_col, g_row_pos, g_col_pos, g_row_dot=None, g_col_dot=None):
        # row_dot and col_dot feed scale gradients formed by the caller (pyclipfast/distributed.py):
        # they carry no gradient of their own, and their upstream gradients are ignored.
        a, b, scale, row_ids, col_ids, row_lse, col_lse = ctx.saved_tensors
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        if not ctx.bidirectional:
            g_col = g_col_pos = None
        with torch.no_grad():
            da, db, dscale = bwd_op(a, b, scale, row_ids, col_ids, row_lse, col_lse, g_row, g_col, g_row_pos,
                                    g_col_pos, need_a, need_b, need_scale)
        da, db, dscale = _first_order((da if need_a else None, db if need_b else None,
                                       _scale_grad(dscale, scale) if need_scale else None),
                                      (a, b, scale, g_row, g_col, g_row_pos, g_col_pos))
        return (da, db, dscale) + (None,) * (ctx.n_inputs - 3)

    fwd.register_autograd(grads, setup_context=setup_context)
    return {"forward": fwd, "backward": bwd, "function": _function("ClipStats", fwd, setup_context, grads)}


# ---------------------------------------------------------------- InfoNCE rows with a pair rule

def _register_clip_pairs(backend: str) -> Dict[str, Callable]:
    """Rows-only log-sum-exp under a pair rule (pyclipfast/clip.py `clip_row_lse`): the InfoNCE
    kernels with `rule` (PAIR_RULES) and `penalty` set, the ids selecting pairs instead of positives."""
    impl = implementation("clip", backend)

    def forward(a: Tensor, b: Tensor, scale: Tensor, row_ids: Tensor, col_ids: Tensor, rule: int,
                penalty: float) -> Tensor:
        with _no_autocast(a):
            row_lse, _, poison, _ = impl.clip_forward(a, b, scale, row_ids, col_ids, False, rule=rule, penalty=penalty)
        return row_lse + poison  # poison: 0, or NaN where a kept pair's score is not finite

    def forward_fake(a, b, scale, row_ids, col_ids, rule, penalty):
        return _vec(a, a.shape[0])

    def backward(a: Tensor, b: Tensor, scale: Tensor, row_ids: Tensor, col_ids: Tensor, rule: int, penalty: float,
                 row_lse: Tensor, g_row: Tensor, need_a: bool, need_b: bool,
                 need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(a):
            da, db, dscale = impl.clip_backward(a, b, scale, row_ids, col_ids, row_lse, None, g_row, None, None, None,
                                                need_a=need_a, need_b=need_b, need_scale=need_scale, rule=rule,
                                                penalty=penalty)
        return _or_empty(da, a), _or_empty(db, a), _or_empty(dscale, a)

    def backward_fake(a, b, scale, row_ids, col_ids, rule, penalty, row_lse, g_row, need_a, need_b, need_scale):
        return _grad_like(a, need_a), _grad_like(b, need_b), _scalar(a, need_scale)

    fwd = _define("clip_pairs_forward", backend, forward, forward_fake)
    bwd = _define("clip_pairs_backward", backend, backward, backward_fake)
    bwd.register_autograd(_first_order_only)
    bwd_op = bwd._opoverload

    def setup_context(ctx, inputs, output):
        a, b, scale, row_ids, col_ids, rule, penalty = inputs
        ctx.rule, ctx.penalty = rule, penalty
        ctx.save_for_backward(a, b, scale, row_ids, col_ids, output)

    def grads(ctx, g_row):
        a, b, scale, row_ids, col_ids, row_lse = ctx.saved_tensors
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        with torch.no_grad():
            da, db, dscale = bwd_op(a, b, scale, row_ids, col_ids, ctx.rule, ctx.penalty, row_lse, g_row, need_a,
                                    need_b, need_scale)
        da, db, dscale = _first_order((da if need_a else None, db if need_b else None,
                                       _scale_grad(dscale, scale) if need_scale else None), (a, b, scale, g_row))
        return da, db, dscale, None, None, None, None

    fwd.register_autograd(grads, setup_context=setup_context)
    return {"forward": fwd, "backward": bwd, "function": _function("ClipPairStats", fwd, setup_context, grads)}


# ---------------------------------------------------------------- SigLIP

def _register_siglip(backend: str) -> Dict[str, Callable]:
    impl = implementation("siglip", backend)

    def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], row_ids: Optional[Tensor],
                col_ids: Optional[Tensor], negative_only: bool, need_a: bool, need_b: bool, need_scale: bool,
                need_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = a.shape[0]
        with _no_autocast(a):
            loss_sum, da, db, dscale, dbias = impl.siglip_forward(
                a, b, scale, bias, row_ids, col_ids, negative_only, grad_scale=1.0 / n, need_a=need_a,
                need_b=need_b, need_scale=need_scale, need_bias=need_bias and bias is not None)
        return (loss_sum / n, _or_empty(da, a), _or_empty(db, a), _or_empty(dscale, a), _or_empty(dbias, a))

    def forward_fake(a, b, scale, bias, row_ids, col_ids, negative_only, need_a, need_b, need_scale, need_bias):
        return (_scalar(a), _grad_like(a, need_a), _grad_like(b, need_b), _scalar(a, need_scale),
                _scalar(a, need_bias and bias is not None))

    op = _define("siglip", backend, forward, forward_fake)

    def setup_context(ctx, inputs, output):
        scale, bias = inputs[2], inputs[3]
        ctx.save_for_backward(scale, bias, *output[1:])
        ctx.need = inputs[7:11]
        ctx.set_materialize_grads(False)  # the gradient outputs get none: no zero tensors of their shapes

    def grads(ctx, g, *unused):
        if g is None:
            return (None,) * 11
        scale, bias, da, db, dscale, dbias = ctx.saved_tensors
        need_a, need_b, need_scale, need_bias = (computed and wanted for computed, wanted in
                                                 zip(ctx.need, ctx.needs_input_grad[:4]))
        with torch.no_grad():
            result = (_times(da, g, need_a), _times(db, g, need_b),
                      _scale_grad(dscale * g, scale) if need_scale else None,
                      _scale_grad(dbias * g, bias) if need_bias and bias is not None else None)
        return _first_order(result, (da, db, scale, bias, g)) + (None,) * 7

    op.register_autograd(grads, setup_context=setup_context)
    return {"forward": op, "function": _function("SigLip", op, setup_context, grads)}


# ---------------------------------------------------------------- distillation

def _distill_options(margin: float, threshold: Optional[float], kd: Optional[str]):
    from .distill import DistillOptions

    return DistillOptions(margin, threshold, kd)


def _register_distill(backend: str) -> Dict[str, Callable]:
    impl = implementation("distill", backend)

    def forward(a: Tensor, b: Tensor, scale: Tensor, ta: Tensor, tb: Tensor, teacher_scale: Tensor,
                row_ids: Optional[Tensor], col_ids: Optional[Tensor], margin: float, threshold: Optional[float],
                kd: Optional[str]) -> List[Tensor]:
        with _no_autocast(a):
            stats = impl.distill_forward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids,
                                         _distill_options(margin, threshold, kd))
        return [_or_empty(stats.get(k), a) for k in DISTILL_STATS]

    def forward_fake(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, margin, threshold, kd):
        n, m = a.shape[0], b.shape[0]
        return [_vec(a, n if k.startswith(("row", "student_row", "teacher_row")) else m,
                     kd is not None or k not in DISTILL_KD_STATS) for k in DISTILL_STATS]

    def backward(a: Tensor, b: Tensor, scale: Tensor, ta: Tensor, tb: Tensor, teacher_scale: Tensor,
                 row_ids: Optional[Tensor], col_ids: Optional[Tensor], margin: float, threshold: Optional[float],
                 kd: Optional[str], lse: List[Optional[Tensor]], grads: List[Optional[Tensor]], need_a: bool,
                 need_b: bool, need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(a):
            da, db, dscale = impl.distill_backward(
                a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, _distill_options(margin, threshold, kd),
                dict(zip(DISTILL_LSE, lse)), dict(zip(DISTILL_GRAD, grads)),
                need_a=need_a, need_b=need_b, need_scale=need_scale)
        return _or_empty(da, a), _or_empty(db, a), _or_empty(dscale, a)

    def backward_fake(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, margin, threshold, kd, lse, grads,
                      need_a, need_b, need_scale):
        return _grad_like(a, need_a), _grad_like(b, need_b), _scalar(a, need_scale)

    fwd = _define("distill_forward", backend, forward, forward_fake)
    bwd = _define("distill_backward", backend, backward, backward_fake)
    bwd.register_autograd(_first_order_only)
    bwd_op = bwd._opoverload

    def setup_context(ctx, inputs, output):
        a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, margin, threshold, kd = inputs
        ctx.options = margin, threshold, kd
        stats = dict(zip(DISTILL_STATS, output))
        ctx.save_for_backward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids,
                              *(stats[k] if kd is not None or k not in DISTILL_KD_STATS else None
                                for k in DISTILL_LSE))

    def grads(ctx, *upstream):
        if len(upstream) == 1:  # the op's registered autograd passes the Tensor[] output's gradients as a list
            upstream = upstream[0]
        a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, *lse = ctx.saved_tensors
        kd = ctx.options[2]
        g = [None if (kd is None and k in DISTILL_KD_STATS) else x for k, x in zip(DISTILL_GRAD, upstream)]
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        with torch.no_grad():
            da, db, dscale = bwd_op(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, *ctx.options, lse, g,
                                    need_a, need_b, need_scale)
        return _first_order((da if need_a else None, db if need_b else None,
                             _scale_grad(dscale, scale) if need_scale else None), (a, b, scale, *g)) + (None,) * 8

    fwd.register_autograd(grads, setup_context=setup_context)
    return {"forward": fwd, "backward": bwd, "function": _function("DistillStats", fwd, setup_context, grads)}


# ---------------------------------------------------------------- cosine

def _register_cosine(backend: str) -> Dict[str, Callable]:
    impl = implementation("cosine", backend)

    def forward(online: Tensor, target: Tensor, need_online: bool, need_target: bool) -> Tuple[Tensor, Tensor, Tensor]:
        n = online.shape[0]
        with _no_autocast(online):
            cos, d_online, d_target = impl.cosine_forward(online, target, grad_scale=-2.0 / n,
                                                          need_online=need_online, need_target=need_target)
        return 2 - 2 * cos.mean(), _or_empty(d_online, online), _or_empty(d_target, online)

    def forward_fake(online, target, need_online, need_target):
        return _scalar(online), _grad_like(online, need_online), _grad_like(target, need_target)

    op = _define("cosine", backend, forward, forward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.need = inputs[2:4]

    def grads(ctx, g, *unused):
        d_online, d_target = ctx.saved_tensors
        need_online, need_target = (c and w for c, w in zip(ctx.need, ctx.needs_input_grad[:2]))
        with torch.no_grad():
            result = _times(d_online, g, need_online), _times(d_target, g, need_target)
        return _first_order(result, (d_online, d_target, g)) + (None, None)

    op.register_autograd(grads, setup_context=setup_context)
    return {"forward": op, "function": _function("Cosine", op, setup_context, grads)}


# ---------------------------------------------------------------- retrieval (no gradients)

def _register_retrieval(backend: str) -> Dict[str, Callable]:
    impl = implementation("retrieval", backend)

    def count(queries: Tensor, gallery: Tensor, query_ids: Optional[Tensor], gallery_ids: Optional[Tensor]) -> Tensor:
        return impl.count_above(queries, gallery, query_ids, gallery_ids)

    def count_fake(queries, gallery, query_ids, gallery_ids):
        return queries.new_empty((queries.shape[0],), dtype=torch.int64)

    return {"count": _define("retrieval_count", backend, count, count_fake)}


_REGISTER = {"clip": _register_clip, "siglip": _register_siglip, "distill": _register_distill,
             "cosine": _register_cosine, "retrieval": _register_retrieval, "clip_pairs": _register_clip_pairs}


def registered() -> Sequence[Tuple[str, str]]:
    """The (loss, backend) pairs registered so far."""
    return tuple(_registered)
