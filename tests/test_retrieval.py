"""recall_at_k: every backend against the materialised float64 definition."""
import numpy as np
import pytest
import torch
from open_clip_train.train import get_clip_metrics

import pyclipfast as pcf
from helpers import DEVICE, backend_dtype_params, block_params, fast_backends, features, fresh_seed


def _pair(nq, ng, d, dtype, seed, noise=1.0, **opts):
    """Queries and a gallery whose item j is a noisy copy of query j mod nq (so recall is neither 0 nor 1)."""
    q = features(nq, d, dtype=torch.float64, seed=seed, **opts)
    g = features(ng, d, dtype=torch.float64, seed=seed + 1) * noise + q.repeat(ng // nq + 1, 1)[:ng]
    return q.to(dtype), g.to(dtype)


def _caption_ids(n_images, per_image, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_images).repeat_interleave(per_image)
    return torch.arange(n_images, device=DEVICE), ids[torch.randperm(len(ids), generator=g)].to(DEVICE)


def _ks(ng):
    return (1, 2, 5, 10, ng + 3)


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("shape", [(1, 8), (37, 20), (70, 9)], ids=["N1", "N37", "N70"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_default_ids_match_reference(backend, dtype, shape, blocks):
    n, d = shape
    q, g = _pair(n, n, d, dtype, fresh_seed(), layout="strided")
    out = pcf.recall_at_k(q, g, _ks(n), backend=backend)
    assert out == pcf.recall_at_k(q.double().cpu(), g.double().cpu(), _ks(n), backend="reference")
    assert list(out) == [f"R@{k}" for k in _ks(n)]


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("direction", ["image-to-text", "text-to-image"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_ids_match_reference(backend, dtype, direction, blocks):
    seed = fresh_seed()
    image_ids, text_ids = _caption_ids(23, 5, seed)  # 5 captions per image: 115 texts
    images = features(23, 12, dtype=torch.float64, seed=seed)
    texts = features(115, 12, dtype=torch.float64, seed=seed + 1) * 2.0 + images[text_ids.cpu()]
    q, g, qid, gid = images, texts, image_ids, text_ids
    if direction == "text-to-image":
        q, g, qid, gid = texts, images, text_ids, image_ids
    out = pcf.recall_at_k(q.to(dtype), g.to(dtype), _ks(len(g)), query_ids=qid, gallery_ids=gid, backend=backend)
    ref = pcf.recall_at_k(q.to(dtype).double(), g.to(dtype).double(), _ks(len(g)), query_ids=qid.cpu(),
                          gallery_ids=gid.cpu(), backend="reference")
    assert out == ref
    assert 0 < out["R@1"] < 1


@pytest.mark.parametrize("with_ids", [False, True], ids=["diagonal", "captions"])
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_reference(backend, with_ids, small_blocks):
    """16×16 tiles, 8×12 chunks: the best-positive sweep over the diagonal tiles only (or all
    tiles with ids) and the counts summed over many gallery groups."""
    seed = fresh_seed()
    if with_ids:
        qid, gid = _caption_ids(23, 3, seed)
        q = features(23, 12, dtype=torch.float64, seed=seed)
        g = features(69, 12, dtype=torch.float64, seed=seed + 1) * 2.0 + q[gid.cpu()]
        ids = dict(query_ids=qid, gallery_ids=gid)
    else:
        q, g = _pair(70, 70, 9, torch.float64, seed)
        ids = {}
    ks = _ks(len(g))
    out = pcf.recall_at_k(q.float().to(DEVICE), g.float().to(DEVICE), ks, backend=backend, **ids)
    ref = pcf.recall_at_k(q.float().double(), g.float().double(), ks, backend="reference",
                          **{k: v.cpu() for k, v in ids.items()})
    assert out == ref


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_known_ranks_and_ties(backend):
    """Query 0's positive scores 0.5 with 1.0 and 0.9 above it; query 1's ties with a negative (rank 0)."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    g = torch.tensor([[0.5, 0.0], [0.0, 0.7], [1.0, 0.0], [0.9, 0.7], [0.2, 0.0]], device=DEVICE)
    ids = dict(query_ids=torch.tensor([0, 1], device=DEVICE), gallery_ids=torch.tensor([0, 1, 2, 3, 0], device=DEVICE))
    assert pcf.recall_at_k(q, g, (1, 2, 3), **ids, backend=backend) == {"R@1": 0.5, "R@2": 0.5, "R@3": 1.0}


def test_matches_open_clip_retrieval_metrics():
    images, texts = _pair(60, 60, 16, torch.float32, 7, noise=1.5)
    theirs = get_clip_metrics(images, texts, 1.0)
    for name, (q, g) in {"image_to_text": (images, texts), "text_to_image": (texts, images)}.items():
        ours = pcf.recall_at_k(q, g, backend="torch")
        for k in (1, 5, 10):
            assert ours[f"R@{k}"] == pytest.approx(float(np.asarray(theirs[f"{name}_R@{k}"])))


def test_no_gradients_flow():
    q, g = (x.requires_grad_() for x in _pair(8, 8, 4, torch.float32, 3))
    out = pcf.recall_at_k(q, g, backend="torch")
    assert all(isinstance(v, float) for v in out.values()) and q.grad is None
