"""cosine_loss: every backend against F.cosine_similarity in float64."""
import pytest
import torch

import pyclipfast as pcf
from helpers import (
    DEVICE, TOLERANCE, as_reference, assert_close_to_reference, backend_dtype_params, block_params, fast_backends,
    features, fresh_seed, leaves,
)
from pyclipfast.chunked import cosine as chunked_cosine
from pyclipfast.triton import cosine as triton_cosine


@pytest.fixture(autouse=True)
def cosine_blocks(monkeypatch):
    """Several row chunks on the torch backend; D > 64 takes Triton's two-sweep loop over D."""
    monkeypatch.setattr(chunked_cosine, "CHUNK_ROWS", 16)
    monkeypatch.setattr(triton_cosine, "MAX_BLOCK_D", 64)


# id, N, D, feature options, scale of the online features
CASES = [
    ("N1-D8", 1, 8, {}, 1.0),
    ("N37-D20", 37, 20, {}, 1.0),
    ("N70-D300-two-sweep", 70, 300, {}, 1.0),
    ("N33-D24-strided", 33, 24, {"layout": "strided"}, 1.0),
    ("N40-D48-colmajor", 40, 48, {"layout": "colmajor"}, 1.0),
    ("N50-D10-large-norms", 50, 10, {"normalize": False}, 100.0),
    ("N30-D16-duplicate-rows", 30, 16, {"duplicate_rows": True}, 1.0),
]


def run(backend, p, z, target_grad):
    p, z = leaves(p, z)
    loss = pcf.cosine_loss(p, z, target_grad=target_grad, backend=backend)
    return [loss, *torch.autograd.grad(loss, (p, z) if target_grad else (p,))]


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("target_grad", [False, True], ids=["stop-grad", "target-grad"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, case, target_grad, blocks):
    check_against_reference(backend, dtype, case, target_grad)


SMALL_BLOCK_CASES = [c for c in CASES if c[0] in ("N37-D20", "N40-D48-colmajor")]


@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=[c[0] for c in SMALL_BLOCK_CASES])
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_float64_reference(backend, case, small_blocks):
    """5-row chunks, 16-wide Triton rows: the two-sweep loop over D with a ragged last block."""
    check_against_reference(backend, torch.float32, case, target_grad=True)


def check_against_reference(backend, dtype, case, target_grad):
    _, n, d, opts, magnitude = case
    seed = fresh_seed()
    p = features(n, d, dtype=dtype, seed=seed, **opts) * magnitude
    z = features(n, d, dtype=dtype, seed=seed + 1, **opts)
    out = run(backend, p, z, target_grad)
    ref = run("reference", *as_reference(p, z), target_grad)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype and g.shape == (n, d) for g in out[1:])
    assert_close_to_reference(out, ref, dtype, ["loss", "d_online", "d_target"][:len(ref)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_vectors_are_clamped_like_cosine_similarity(backend):
    p, z = features(12, 80, seed=1), features(12, 80, seed=2)
    p[3], z[5], p[7] = 0.0, 0.0, 1e-9 * p[7]  # zero and sub-eps rows
    z[9] = p[9]  # cos = 1: zero gradient
    out = run(backend, p, z, target_grad=True)
    ref = run("reference", *as_reference(p, z), target_grad=True)
    assert_close_to_reference(out, ref, torch.float32, ["loss", "d_online", "d_target"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_target_is_a_stop_gradient_by_default(backend):
    p, z = leaves(features(10, 6, seed=3), features(10, 6, seed=4))
    pcf.cosine_loss(p, z, backend=backend).backward()
    assert z.grad is None and p.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_without_gradients(backend):
    p, z = features(10, 6, seed=5), features(10, 6, seed=6)
    loss = pcf.cosine_loss(p, z, backend=backend)
    ref = pcf.cosine_loss(p.double().cpu(), z.double().cpu(), backend="reference")
    assert not loss.requires_grad
    assert abs(float(loss) - float(ref)) <= TOLERANCE[torch.float32] * abs(float(ref))


def test_value_is_two_minus_two_cos():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], device=DEVICE)
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0]], device=DEVICE)
    assert float(pcf.cosine_loss(p, z, backend="torch")) == pytest.approx(1.0)  # (0 + 2) / 2
