"""Gradient caching: a contrastive step on a batch far larger than its activations allow.

GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"). The loss couples every pair of the batch, but the encoders do not: with
E = f(X) the embeddings of the whole batch,

    ∂L/∂θ = Σ_chunks (∂E_c/∂θ)ᵀ · ∂L/∂E_c

so the step splits in three:

    1. embed     E_c = f(X_c) for every chunk, without autograd (only E is kept: O(B·D));
    2. loss      L(E) on the full batch with E as leaves → the cached gradient ∂L/∂E
                 (and the gradient of anything else L depends on, e.g. the logit scale);
    3. backward  for every chunk, E_c = f(X_c) again, with autograd, then backward(E_c, ∂L/∂E_c).

Peak activation memory is that of one chunk; the batch size only costs O(B·D) for E and its
gradient (the fused pyclipfast losses never store the B×B logits). The price is one extra
forward pass. Step 3 must recompute exactly the E_c of step 1, so each chunk re-runs under the
RNG state it first ran with (dropout, patch dropout, drop path). BatchNorm running statistics
see every chunk twice; ViT/transformer towers (LayerNorm) are unaffected.

    loss, _ = grad_cache_step(
        encoders=[lambda x: model.encode_image(x, normalize=True),
                  lambda t: model.encode_text(t, normalize=True)],
        inputs=[images, tokens],
        loss_fn=lambda img, txt: pyclipfast.clip_loss(img, txt, model.logit_scale.exp()),
        chunk_size=256,
    )
    optimizer.step()
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Union

import torch

Encoder = Callable[[Any], torch.Tensor]
LossOutput = Union[torch.Tensor, tuple[torch.Tensor, Any]]


class RngState:
    """The CPU generator state and the states of the given CUDA devices, to replay a forward pass."""

    def __init__(self, cuda_devices: Sequence[int] = ()) -> None:
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state; the generators are restored afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _cuda_devices(inputs: Any) -> list[int]:
    """Indices of the CUDA devices holding `inputs` (a tensor, or anything else: none)."""
    if isinstance(inputs, torch.Tensor) and inputs.is_cuda:
        return [inputs.device.index if inputs.device.index is not None else torch.cuda.current_device()]
    return []


def _chunks(inputs: Any, chunk_size: int) -> list[Any]:
    """`inputs` split along its first dimension into slices of at most `chunk_size`."""
    return [inputs[start:start + chunk_size] for start in range(0, len(inputs), chunk_size)]


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def embed_in_chunks(encode: Encoder, inputs: Any, chunk_size: int) -> tuple[torch.Tensor, list[RngState]]:
    """Step 1: the embeddings of all of `inputs`, chunk by chunk, without autograd.

    Returns (embeddings (B, D) detached, the RNG state each chunk started from).
    """
    _check_chunk_size(chunk_size)
    devices = _cuda_devices(inputs)
    states, outputs = [], []
    with torch.no_grad():
        for chunk in _chunks(inputs, chunk_size):
            states.append(RngState(devices))
            outputs.append(encode(chunk))
    return torch.cat(outputs), states


def backward_in_chunks(encode: Encoder, inputs: Any, chunk_size: int, grad: torch.Tensor,
                       states: Sequence[RngState]) -> None:
    """Step 3: re-run each chunk with autograd under its recorded RNG state and back-propagate `grad`'s slice.

    An encoder whose output needs no gradient (no trainable parameter) stops after the first chunk.
    """
    _check_chunk_size(chunk_size)
    chunks = _chunks(inputs, chunk_size)
    if len(chunks) != len(states):
        raise ValueError(f"got {len(states)} RNG states for {len(chunks)} chunks")
    for chunk, state, chunk_grad in zip(chunks, states, grad.split(chunk_size)):
        if not _chunk_backward(encode, chunk, state, chunk_grad):
            return


def _chunk_backward(encode: Encoder, chunk: Any, state: RngState, grad: torch.Tensor) -> bool:
    """Re-run one chunk under its RNG state and back-propagate `grad`; False when the output needs no gradient."""
    with state.replay():
        embeddings = encode(chunk)
    if not embeddings.requires_grad:  # a frozen tower (e.g. LiT's locked image tower): nothing to train
        return False
    embeddings.backward(grad.to(embeddings.dtype))
    return True


def _split_loss(output: LossOutput) -> tuple[torch.Tensor, Any]:
    """(scalar loss, auxiliary output) from what a loss function returned."""
    loss, aux = output if isinstance(output, tuple) else (output, None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor (or a (scalar, aux) tuple), got {type(loss).__name__}"
                         f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}")
    return loss, aux


def grad_cache_step(encoders: Sequence[Encoder], inputs: Sequence[Any],
                    loss_fn: Callable[..., LossOutput], chunk_size: int | None, *,
                    joint: Callable[[Sequence[Any]], Sequence[torch.Tensor]] | None = None,
                    no_sync: Callable[[], ContextManager[Any]] | None = None,
                    trainable: Sequence[bool] | None = None) -> tuple[torch.Tensor, Any]:
    """Accumulate into `.grad` the gradient of loss_fn(*(encoders[k](inputs[k]))) in chunks.

    Args:
        encoders: one callable per tower, mapping a slice of its inputs to embeddings (b, D).
        inputs: one batch per tower (tensors or anything sliceable along the batch), e.g.
            [images (N, 3, H, W), tokens (M, L)]; the towers may have different batch sizes.
        loss_fn: maps the full-batch embeddings, one argument per tower, to a scalar loss, or to
            (loss, aux) where aux is returned untouched (e.g. the loss terms, for logging).
            Parameters it uses directly (the logit scale) get their gradient from it.
        chunk_size: the most inputs of one tower encoded at once. None, or a size that holds
            every tower's batch in one chunk, runs a plain forward/backward (no second pass).
        joint: for the plain step, encode every tower in one call (one forward of a
            DistributedDataParallel module per backward) instead of one call per encoder.
        no_sync: a context manager factory (DistributedDataParallel.no_sync) under which every
            backward pass but the last runs, so gradients are synchronised once, overlapping the
            last chunk's backward.
        trainable: per tower, whether it has parameters to train (default: all); frozen towers are
            embedded but not re-run.

    Returns:
        (the loss, detached, aux). Gradients equal those of the unchunked step (the same
        function, up to floating-point summation order) and are *added* to `.grad`, like
        ``loss.backward()``: zero them before the step.
    """
    if len(encoders) != len(inputs):
        raise ValueError(f"got {len(encoders)} encoders for {len(inputs)} inputs")
    trainable = [True] * len(encoders) if trainable is None else list(trainable)
    if chunk_size is None or all(len(x) <= chunk_size for x in inputs):
        features = joint(inputs) if joint is not None else [encode(x) for encode, x in zip(encoders, inputs)]
        loss, aux = _split_loss(loss_fn(*features))
        loss.backward()
        return loss.detach(), aux
    cached = [embed_in_chunks(encode, x, chunk_size) for encode, x in zip(encoders, inputs)]
    leaves = [embeddings.requires_grad_() for embeddings, _ in cached]
    jobs = []  # (encoder, chunk, RNG state, gradient slice) of every chunk to re-run
    with (no_sync or nullcontext)():
        loss, aux = _split_loss(loss_fn(*leaves))
        loss.backward()
        for encode, x, leaf, (_, states), train in zip(encoders, inputs, leaves, cached, trainable):
            if train:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                jobs += zip([encode] * len(states), _chunks(x, chunk_size), states, grad.split(chunk_size))
        for job in jobs[:-1]:
            _chunk_backward(*job)
    if jobs:
        _chunk_backward(*jobs[-1])  # outside no_sync: this backward synchronises the gradients
    return loss.detach(), aux
