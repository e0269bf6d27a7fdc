"""Gradient caching equals the unchunked step, replays dropout, and bounds memory by the chunk."""
import math

import open_clip
import pytest
import torch
from torch import nn

import pyclipfast
from pyclipfast.train.gradcache import RngState, embed_in_chunks, grad_cache_step
from pyclipfast.train.memory import PeakTensorMemory


TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip(loss: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    extra = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if loss == "siglip" else {}
    return open_clip.model.CLIP(**TINY, **extra).to(dtype)


def batch(n_images: int, n_texts: int, dtype=torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 16, 16, generator=generator, dtype=dtype)
    tokens = torch.randint(1, 100, (n_texts, 8), generator=generator)
    return images, tokens


def encoders(model):
    return [lambda x: model.encode_image(x, normalize=True), lambda t: model.encode_text(t, normalize=True)]


def make_loss(model, loss: str, image_ids=None, text_ids=None):
    def loss_fn(image_features, text_features):
        scale = model.logit_scale.exp()
        if loss == "clip":
            return pyclipfast.clip_loss(image_features, text_features, scale, image_ids=image_ids, text_ids=text_ids)
        return pyclipfast.siglip_loss(image_features, text_features, scale, model.logit_bias,
                                      image_ids=image_ids, text_ids=text_ids)
    return loss_fn


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def plain_step(model, inputs, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*(encode(x) for encode, x in zip(encoders(model), inputs)))
    loss.backward()
    return loss.detach(), gradients(model)


def cached_step(model, inputs, loss_fn, chunk_size):
    model.zero_grad(set_to_none=True)
    loss, _ = grad_cache_step(encoders(model), inputs, loss_fn, chunk_size)
    return loss, gradients(model)


def assert_same_gradients(expected: dict, actual: dict, rtol: float):
    assert expected.keys() == actual.keys()
    for name in expected:
        error = (actual[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-30)
        assert error <= rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_chunked_step_equals_unchunked_step_float64(loss, chunk_size):
    model = tiny_clip(loss)
    inputs = batch(11, 11)  # 11 = not a multiple of any chunk size: a short last chunk
    expected_loss, expected = plain_step(model, inputs, make_loss(model, loss))
    actual_loss, actual = cached_step(model, inputs, make_loss(model, loss), chunk_size)
    assert len(expected) == sum(1 for p in model.parameters())  # every parameter got a gradient
    assert torch.allclose(actual_loss, expected_loss, rtol=1e-12, atol=0)
    assert_same_gradients(expected, actual, rtol=1e-10)


def test_chunked_step_float32_within_rounding():
    model = tiny_clip("clip", dtype=torch.float32)
    inputs = batch(32, 32, dtype=torch.float32)
    _, expected = plain_step(model, inputs, make_loss(model, "clip"))
    _, actual = cached_step(model, inputs, make_loss(model, "clip"), 5)
    assert_same_gradients(expected, actual, rtol=1e-5)


def test_multi_positive_texts_chunked_separately():
    """Two captions per image (more texts than images), positives by id."""
    model = tiny_clip("clip")
    images, tokens = batch(6, 12)
    image_ids, text_ids = torch.arange(6), torch.arange(6).repeat_interleave(2)
    loss_fn = make_loss(model, "clip", image_ids, text_ids)
    _, expected = plain_step(model, (images, tokens), loss_fn)
    _, actual = cached_step(model, (images, tokens), loss_fn, 4)
    assert_same_gradients(expected, actual, rtol=1e-10)


class DropoutTower(nn.Module):
    def __init__(self, width: int = 12, p: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 32), nn.Dropout(p), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


def test_dropout_is_replayed_with_the_same_rng_state():
    """The recomputed forward must draw the same dropout masks as the first one.

    Reference: the same chunks, in the same order, with autograd in one graph. Without the
    RNG replay the second pass draws new masks and the gradients differ.
    """
    torch.manual_seed(0)
    towers = [DropoutTower().double(), DropoutTower().double()]
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    inputs = [torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64)]
    loss_fn = lambda a, b: pyclipfast.clip_loss(a, b, scale)  # noqa: E731
    params = [p for t in towers for p in t.parameters()] + [scale]

    torch.manual_seed(123)
    features = [torch.cat([tower(x[i:i + 4]) for i in range(0, 10, 4)]) for tower, x in zip(towers, inputs)]
    loss_fn(*features).backward()
    expected = [p.grad.clone() for p in params]
    state_after_reference = torch.get_rng_state()

    for p in params:
        p.grad = None
    torch.manual_seed(123)
    grad_cache_step(towers, inputs, loss_fn, chunk_size=4)
    for e, p in zip(expected, params):
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.get_rng_state(), state_after_reference)  # the replay leaves the RNG where it was


def test_rng_state_replay_restores_the_generator():
    state = RngState()
    first = torch.rand(3)
    with state.replay():
        again = torch.rand(3)
    after = torch.rand(3)
    assert torch.equal(first, again)
    assert not torch.equal(after, first)


def test_memory_grows_with_the_chunk_not_the_batch():
    """Peak tensor memory of a step: 4x the batch in the same chunks costs a small part of what it costs unchunked."""
    model = tiny_clip("clip", dtype=torch.float32)

    def peak(n: int, chunk_size):
        inputs = batch(n, n, dtype=torch.float32)
        model.zero_grad(set_to_none=True)
        meter = PeakTensorMemory()
        with meter:
            grad_cache_step(encoders(model), inputs, make_loss(model, "clip"), chunk_size)
        return meter.peak

    chunked_small, chunked_large = peak(64, 16), peak(256, 16)
    plain_small, plain_large = peak(64, None), peak(256, None)
    assert chunked_large < plain_large / 4
    # What is left growing with the batch is O(B·D) embeddings and the loss's own working set.
    assert chunked_large - chunked_small < 0.25 * (plain_large - plain_small)


def test_bad_arguments():
    model = tiny_clip("clip")
    inputs = batch(4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(encoders(model), inputs, make_loss(model, "clip"), 0)
    with pytest.raises(ValueError, match="encoders"):
        grad_cache_step(encoders(model)[:1], inputs, make_loss(model, "clip"), 2)
    with pytest.raises(ValueError, match="scalar"):
        grad_cache_step(encoders(model), inputs, lambda a, b: a.sum(0), 2)


def test_embed_in_chunks_matches_one_pass():
    model = tiny_clip("clip")
    images, _ = batch(7, 7)
    chunked, states = embed_in_chunks(lambda x: model.encode_image(x, normalize=True), images, 3)
    assert len(states) == 3 and not chunked.requires_grad
    with torch.no_grad():
        assert torch.allclose(chunked, model.encode_image(images, normalize=True), rtol=1e-12, atol=1e-14)
