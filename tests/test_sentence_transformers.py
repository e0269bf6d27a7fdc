"""pyclipfast.sentence_transformers against sentence-transformers' own losses.

The model is a tiny BERT with random weights built on disk (nothing downloaded, dropout 0), in
float64 so that the fused losses and sentence-transformers' materialised ones agree to rounding;
float32 cases hold the float32 tolerance of tests/helpers.py. The batch has 3 hard negatives
per anchor and
duplicate texts (a positive shared by two anchors, two equal anchors, a hard negative equal to its
own positive). torch.distributed: 2 gloo ranks run the drop-ins with gather_across_devices=True
against sentence-transformers' gathered losses and the single-process global batch; 2 and 4 ranks
run the fused loss on embeddings against the global batch (every direction, hardness modes included).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import random
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyclipfast.sentence_transformers.ranking import fused_ranking_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers is not installed (pip install 'pyclipfast[sentence-transformers]')",
)

N, NEGATIVES, DIM = 6, 3, 24
NAMES = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
         "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")
GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
BOTH = ("query_to_doc", "doc_to_query")
SPAWN_TIMEOUT_S = 300


def _texts(n: int, seed: int) -> list[list[str]]:
    """Anchors, positives and NEGATIVES columns of distinct texts, then duplicates planted."""
    from benchmarks.bench_sentence_transformers import WORDS

    rng = random.Random(seed)
    words = iter(rng.sample(WORDS, len(WORDS)))
    columns = [[f"{next(words)} {rng.choice(WORDS)}" for _ in range(n)] for _ in range(2 + NEGATIVES)]
    columns[1][3] = columns[1][1]          # one document, two anchors
    columns[0][4] = columns[0][0]          # the same anchor twice
    columns[2][2] = columns[1][2]          # a hard negative equal to its own positive
    columns[3][n - 1] = columns[1][0]      # a hard negative equal to another anchor's positive
    return columns


def _classes(name: str):
    import pyclipfast.sentence_transformers as ours
    from sentence_transformers.sentence_transformer import losses as theirs
    return getattr(ours, name), getattr(theirs, name)


def _loss_and_grads(model, loss_fn, features, n: int):
    model.zero_grad(set_to_none=True)
    loss = loss_fn([dict(f) for f in features], torch.zeros(n, dtype=torch.long))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach().double(), grads.double()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: OpenMP threads only contend for the shared cores (15× slower here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory, one_thread):
    from benchmarks.bench_sentence_transformers import tiny_model

    model = tiny_model(str(tmp_path_factory.mktemp("tiny-bert")), hidden=DIM).double()
    features = [model.preprocess(texts) for texts in _texts(N, seed=0)]
    return model, features


# --------------------------------------------------------------------------- one process

CASES = {
    "mnrl-pairs": ("MultipleNegativesRankingLoss", {}, 2),
    "mnrl": ("MultipleNegativesRankingLoss", {}, None),
    "mnrl-dot": ("MultipleNegativesRankingLoss", {"similarity_fct": "dot_score", "scale": 1.0}, None),
    "mnrl-joint": ("MultipleNegativesRankingLoss", {"directions": BOTH}, None),
    "mnrl-per-direction": ("MultipleNegativesRankingLoss", {"directions": BOTH, "partition_mode": "per_direction"},
                           None),
    "mnsrl": ("MultipleNegativesSymmetricRankingLoss", {"scale": 7.0}, None),
    "cmnrl": ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4}, None),
    "cmnrl-joint-dot": ("CachedMultipleNegativesRankingLoss",
                        {"mini_batch_size": 4, "directions": BOTH, "similarity_fct": "dot_score", "scale": 2.0},
                        None),
    "cmnrl-tokens": ("CachedMultipleNegativesRankingLoss", {"mini_batch_num_tokens": 9}, None),
    "cmnsrl": ("CachedMultipleNegativesSymmetricRankingLoss", {"mini_batch_size": 5}, None),
    # Same-type directions (self pairs excluded in the kernels) and hardness (α·stop_grad(sim) in them).
    "mnrl-gte": ("MultipleNegativesRankingLoss", {"directions": GTE}, None),
    "mnrl-gte-pairs": ("MultipleNegativesRankingLoss", {"directions": GTE}, 2),
    "mnrl-gte-dot": ("MultipleNegativesRankingLoss", {"directions": GTE, "similarity_fct": "dot_score", "scale": 1.0},
                     None),
    "mnrl-q2q-pairs": ("MultipleNegativesRankingLoss", {"directions": ("query_to_doc", "query_to_query")}, 2),
    "mnrl-q2q": ("MultipleNegativesRankingLoss", {"directions": ("query_to_doc", "query_to_query")}, None),
    "mnrl-d2d": ("MultipleNegativesRankingLoss", {"directions": ("query_to_doc", "doc_to_doc")}, None),
    "mnrl-d2d-triplets": ("MultipleNegativesRankingLoss", {"directions": ("query_to_doc", "doc_to_doc")}, 3),
    "mnrl-in-batch": ("MultipleNegativesRankingLoss",
                      {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}, None),
    "mnrl-in-batch-pairs": ("MultipleNegativesRankingLoss",
                            {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}, 2),
    "mnrl-hard-negatives": ("MultipleNegativesRankingLoss",
                            {"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, None),
    "mnrl-hard-negatives-pairs": ("MultipleNegativesRankingLoss",
                                  {"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, 2),
    "mnrl-all-negatives": ("MultipleNegativesRankingLoss",
                           {"hardness_mode": "all_negatives", "hardness_strength": 3.0}, None),
    "mnrl-all-negatives-dot": ("MultipleNegativesRankingLoss",
                               {"hardness_mode": "all_negatives", "hardness_strength": 0.5,
                                "similarity_fct": "dot_score", "scale": 1.0}, None),
    "mnrl-hardness-per-direction": ("MultipleNegativesRankingLoss",
                                    {"directions": BOTH, "partition_mode": "per_direction",
                                     "hardness_mode": "all_negatives", "hardness_strength": 4.0}, None),
    "mnrl-gte-in-batch": ("MultipleNegativesRankingLoss",
                          {"directions": GTE, "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}, None),
    "cmnrl-hardness": ("CachedMultipleNegativesRankingLoss",
                       {"mini_batch_size": 4, "hardness_mode": "hard_negatives", "hardness_strength": 5.0}, None),
    "cmnrl-gte": ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4, "directions": GTE}, None),
    "cmnrl-d2d-in-batch": ("CachedMultipleNegativesRankingLoss",
                           {"mini_batch_size": 4, "directions": ("query_to_doc", "doc_to_doc"),
                            "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}, None),
    "cmnrl-q2q-all-negatives-pairs": ("CachedMultipleNegativesRankingLoss",
                                      {"mini_batch_size": 4, "directions": ("query_to_doc", "query_to_query"),
                                       "hardness_mode": "all_negatives", "hardness_strength": 2.0}, 2),
    # A similarity the fused kernels do not compute: sentence-transformers' own computation.
    "mnrl-gte-euclidean": ("MultipleNegativesRankingLoss", {"directions": GTE, "similarity_fct": "euclidean_sim",
                                                            "scale": 1.0}, None),
}
FALLBACK = {"mnrl-gte-euclidean"}


def _kwargs(kwargs: dict) -> dict:
    from sentence_transformers import util
    return {k: getattr(util, v) if k == "similarity_fct" else v for k, v in kwargs.items()}


@contextlib.contextmanager
def _only_fused():
    """sentence-transformers' own loss computations raise inside: what runs is the fused path."""
    from sentence_transformers.sentence_transformer import losses as theirs

    def forbidden(*args, **kwargs):
        raise AssertionError("sentence-transformers' own loss computation ran instead of the fused one")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(theirs.MultipleNegativesRankingLoss, "compute_loss_from_embeddings", forbidden)
        for name in ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"):
            for base in getattr(theirs, name).__mro__:
                if "calculate_loss" in vars(base) and base.__module__.startswith("sentence_transformers"):
                    patch.setattr(base, "calculate_loss", forbidden)
        yield


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_equal_sentence_transformers(model_and_batch, case):
    model, features = model_and_batch
    name, kwargs, columns = CASES[case]
    features = features[:columns]
    ours, theirs = _classes(name)
    loss_fn = ours(model, **_kwargs(kwargs))
    assert loss_fn.fused() == (case not in FALLBACK)
    with _only_fused() if loss_fn.fused() else contextlib.nullcontext():
        value, grads = _loss_and_grads(model, loss_fn, features, N)
    ref_value, ref_grads = _loss_and_grads(model, theirs(model, **_kwargs(kwargs)), features, N)
    assert _rel(value, ref_value) < 1e-10
    assert _rel(grads, ref_grads) < 1e-9


FLOAT32_CASES = {
    "mnrl": ("MultipleNegativesRankingLoss", {}),
    "cmnrl": ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4}),
    "mnrl-gte-in-batch": ("MultipleNegativesRankingLoss",
                          {"directions": GTE, "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}),
    "cmnrl-gte-hard-negatives": ("CachedMultipleNegativesRankingLoss",
                                 {"mini_batch_size": 4, "directions": GTE, "hardness_mode": "hard_negatives",
                                  "hardness_strength": 5.0}),
    "mnrl-q2q-all-negatives": ("MultipleNegativesRankingLoss",
                               {"directions": ("query_to_doc", "query_to_query"), "hardness_mode": "all_negatives",
                                "hardness_strength": 3.0}),
}


@pytest.mark.parametrize("case", list(FLOAT32_CASES))
def test_float32_within_spec_tolerance(model_and_batch, case):
    """float32 against the float64 loss: within 1e-5, and no worse than 2× sentence-transformers'."""
    model, features = model_and_batch
    name, kwargs = FLOAT32_CASES[case]
    ours, theirs = _classes(name)
    ref_value, ref_grads = _loss_and_grads(model, theirs(model, **kwargs), features, N)
    model.float()
    try:
        with _only_fused():
            value, grads = _loss_and_grads(model, ours(model, **kwargs), features, N)
        st_value, st_grads = _loss_and_grads(model, theirs(model, **kwargs), features, N)
    finally:
        model.double()
    assert _rel(value, ref_value) <= max(1e-5, 2 * _rel(st_value, ref_value))
    assert _rel(grads, ref_grads) <= max(1e-5, 2 * _rel(st_grads, ref_grads))


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_single_anchor_query_to_query(model_and_batch, name):
    """One anchor: query_to_query has no other query (every pair excluded, −∞ inside the kernel);
    the loss and gradients stay finite and equal sentence-transformers'."""
    model, features = model_and_batch
    features = [model.preprocess(texts[:1]) for texts in _texts(N, seed=3)]
    kwargs = dict(directions=GTE, hardness_mode="in_batch_negatives", hardness_strength=9.0)
    if name.startswith("Cached"):
        kwargs["mini_batch_size"] = 4
    ours, theirs = _classes(name)
    loss_fn = ours(model, **kwargs)
    with _only_fused():
        value, grads = _loss_and_grads(model, loss_fn, features, 1)
    ref_value, ref_grads = _loss_and_grads(model, theirs(model, **kwargs), features, 1)
    assert torch.isfinite(value) and torch.isfinite(grads).all()
    assert _rel(value, ref_value) < 1e-10
    assert _rel(grads, ref_grads) < 1e-9


# --------------------------------------------------------------------------- duplicates

def _reference_terms(rows, own_rows, cols, scale, row_keys, col_keys, own_col, mode):
    """Materialised: logsumexp_j S_ij − positive term, duplicates as positives or masked out."""
    logits = scale * rows @ cols.T
    same = row_keys[:, None] == col_keys[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(rows.shape[0]), own_col] = True
    assert torch.allclose(logits[own], scale * (rows * own_rows).sum(-1))
    assert same[own].all()
    if mode == "positives":
        return torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~same, float("-inf")), 1)
    logits = logits.masked_fill(same & ~own, float("-inf"))
    return torch.logsumexp(logits, 1) - logits[own]


def _reference_duplicates_loss(model, features, mode, directions, partition_mode):
    from pyclipfast.sentence_transformers.ranking import text_keys

    keys = [text_keys(f) for f in features]
    emb = [torch.nn.functional.normalize(model(dict(f))["sentence_embedding"], dim=1) for f in features]
    n = emb[0].shape[0]
    terms = _reference_terms(emb[0], emb[1], torch.cat(emb[1:]), 20.0, keys[1], torch.cat(keys[1:]),
                             torch.arange(n), mode)
    if "doc_to_query" in directions:
        reverse = _reference_terms(emb[1], emb[0], emb[0], 20.0, keys[0], keys[0], torch.arange(n), mode)
        terms = torch.logaddexp(terms, reverse) if partition_mode == "joint" else 0.5 * (terms + reverse)
    return terms.mean()


DUPLICATE_CASES = {
    "positives": ("MultipleNegativesRankingLoss", "positives", ("query_to_doc",), "joint"),
    "mask": ("MultipleNegativesRankingLoss", "mask", ("query_to_doc",), "joint"),
    "positives-joint": ("MultipleNegativesRankingLoss", "positives", BOTH, "joint"),
    "mask-per-direction": ("MultipleNegativesSymmetricRankingLoss", "mask", BOTH, "per_direction"),
    "mask-cached": ("CachedMultipleNegativesRankingLoss", "mask", BOTH, "joint"),
    "positives-cached": ("CachedMultipleNegativesSymmetricRankingLoss", "positives", BOTH, "per_direction"),
}


@pytest.mark.parametrize("case", list(DUPLICATE_CASES))
def test_duplicates_as_positives_or_masked(model_and_batch, case):
    model, features = model_and_batch
    name, mode, directions, partition_mode = DUPLICATE_CASES[case]
    ours, _ = _classes(name)
    kwargs = {} if "Symmetric" in name else {"directions": directions}
    if name.startswith("Cached"):
        kwargs["mini_batch_size"] = 4
    value, grads = _loss_and_grads(model, ours(model, duplicates=mode, **kwargs), features, N)
    model.zero_grad(set_to_none=True)
    ref = _reference_duplicates_loss(model, features, mode, directions, partition_mode)
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert _rel(value, ref.detach()) < 1e-10
    assert _rel(grads, ref_grads) < 1e-9
    default, _ = _loss_and_grads(model, ours(model, **kwargs), features, N)
    assert abs(float(value - default)) > 1e-3        # the planted duplicates change the loss


@pytest.mark.parametrize("mode", ["positives", "mask"])
def test_duplicates_without_duplicates_is_the_default_loss(model_and_batch, mode):
    model, _ = model_and_batch
    features = [model.preprocess(texts[:2]) for texts in _texts(N, seed=1)]   # rows 0, 1: no duplicates planted
    ours, _ = _classes("MultipleNegativesRankingLoss")
    value, grads = _loss_and_grads(model, ours(model, duplicates=mode, directions=BOTH), features, 2)
    ref_value, ref_grads = _loss_and_grads(model, ours(model, directions=BOTH), features, 2)
    assert _rel(value, ref_value) < 1e-12 and _rel(grads, ref_grads) < 1e-10


# --------------------------------------------------------------------------- the drop-in surface

@pytest.mark.parametrize("name", NAMES)
def test_same_constructor_arguments_and_config(model_and_batch, name):
    model, _ = model_and_batch
    ours, theirs = _classes(name)
    params = dict(inspect.signature(ours.__init__).parameters)
    assert params.pop("duplicates").default is None
    ref_params = inspect.signature(theirs.__init__).parameters
    assert [(p.name, p.default) for p in params.values()] == [(p.name, p.default) for p in ref_params.values()]
    assert isinstance(ours(model), theirs)
    assert ours(model, scale=3.0).get_config_dict() == theirs(model, scale=3.0).get_config_dict()
    assert ours(model, duplicates="mask").get_config_dict()["duplicates"] == "mask"


def test_bad_arguments_name_the_argument(model_and_batch):
    from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from pyclipfast.sentence_transformers.ranking import text_keys

    model, _ = model_and_batch
    with pytest.raises(ValueError, match="duplicates"):
        MultipleNegativesRankingLoss(model, duplicates="drop")
    with pytest.raises(ValueError, match="duplicates"):
        CachedMultipleNegativesRankingLoss(model, duplicates=True)
    with pytest.raises(ValueError, match="duplicates='mask' works with"):
        MultipleNegativesRankingLoss(model, directions=GTE, duplicates="mask")
    with pytest.raises(ValueError, match="duplicates='positives' works with"):
        CachedMultipleNegativesRankingLoss(model, hardness_mode="all_negatives", hardness_strength=1.0,
                                           duplicates="positives")
    with pytest.raises(ValueError, match="duplicates='mask' works with"):
        fused_ranking_loss([torch.zeros(2, 3)] * 2, scale=20.0, normalize=True, doc_to_query=False, joint=True,
                           gather=False, doc_to_doc=True, duplicates="mask", keys=[torch.zeros(2)] * 2)
    with pytest.raises(ValueError, match="joint"):
        fused_ranking_loss([torch.zeros(2, 3)] * 2, scale=20.0, normalize=True, doc_to_query=False, joint=False,
                           gather=False, query_to_query=True)
    with pytest.raises(ValueError, match="hardness must be None or one of"):
        fused_ranking_loss([torch.zeros(2, 3)] * 2, scale=20.0, normalize=True, doc_to_query=False, joint=True,
                           gather=False, hardness="in_batch", hardness_strength=1.0)
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        MultipleNegativesRankingLoss(model, scale=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        text_keys({"pixel_values": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="at least 2"):
        fused_ranking_loss([torch.zeros(2, 3)], scale=20.0, normalize=True, doc_to_query=False, joint=True,
                           gather=False)


def test_cached_loss_bounds_memory_by_the_embeddings(model_and_batch):
    """The loss stage of the cached loss is one fused call: no (n, K·n) tensor is ever allocated."""
    model, features = model_and_batch
    from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss

    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, directions=BOTH)
    reps = [[model(dict(f))["sentence_embedding"].detach().requires_grad_()] for f in features]
    largest = []

    def record(tensor):
        largest.append(tensor.numel())
        return tensor

    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    record(t)
            return out

    with Sizes():
        loss_fn.calculate_loss(reps, with_backward=True)
    # The chunked backend's tiles are 32×48 in the tests: the biggest intermediate is a tile or an
    # embedding matrix, never the N×(K+1)·N similarity block when that is larger than both.
    assert max(largest) <= max(32 * 48, (NEGATIVES + 1) * N * DIM)


# --------------------------------------------------------------------------- torch.distributed

CORE_CASES = {
    "q2d": dict(doc_to_query=False, joint=True),
    "joint": dict(doc_to_query=True, joint=True),
    "per-direction": dict(doc_to_query=True, joint=False),
    "mask": dict(doc_to_query=True, joint=True, duplicates="mask"),
    "positives": dict(doc_to_query=False, joint=True, duplicates="positives"),
    "gte": dict(doc_to_query=True, joint=True, query_to_query=True, doc_to_doc=True),
    "gte-in-batch": dict(doc_to_query=True, joint=True, query_to_query=True, doc_to_doc=True,
                         hardness="in_batch_negatives", hardness_strength=9.0),
    "d2d-hard-negatives": dict(doc_to_query=False, joint=True, doc_to_doc=True, hardness="hard_negatives",
                               hardness_strength=5.0),
    "all-negatives-per-direction": dict(doc_to_query=True, joint=False, hardness="all_negatives",
                                        hardness_strength=3.0),
}
CORE_ROWS = 3
# The drop-ins on the model with gather_across_devices=True, on 2 ranks.
MODEL_CASES = [
    ("MultipleNegativesRankingLoss", {}),
    ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4, "directions": BOTH}),
    ("MultipleNegativesRankingLoss", {"directions": GTE, "hardness_mode": "in_batch_negatives",
                                      "hardness_strength": 9.0}),
    ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4, "directions": GTE,
                                            "hardness_mode": "hard_negatives", "hardness_strength": 5.0}),
]


def _directions(core_case: dict) -> tuple:
    flags = {"doc_to_query": "doc_to_query", "query_to_query": "query_to_query", "doc_to_doc": "doc_to_doc"}
    return ("query_to_doc",) + tuple(d for flag, d in flags.items() if core_case.get(flag))


def _core_batch(world: int):
    """Global float64 embeddings and text keys; duplicates are planted across ranks (equal rows, equal keys)."""
    g = torch.Generator().manual_seed(1234 + world)
    total = world * CORE_ROWS
    emb = [torch.randn(total, 8, generator=g, dtype=torch.float64) for _ in range(2 + NEGATIVES)]
    keys = [torch.arange(total) + 1000 * c for c in range(2 + NEGATIVES)]
    for (c, i), (c0, i0) in [((1, total - 1), (1, 0)), ((0, total - 2), (0, 1)), ((2, 1), (1, 1))]:
        emb[c][i], keys[c][i] = emb[c0][i0], keys[c0][i0]
    return emb, keys


def _worker(rank: int, world: int, rendezvous: str, out_dir: str, with_model: bool) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if with_model:  # before the process group: transformers saves files only on rank 0 under torch.distributed
        from benchmarks.bench_sentence_transformers import tiny_model

        model = tiny_model(os.path.join(out_dir, f"model{rank}"), hidden=DIM).double()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    emb, keys = _core_batch(world)
    rows = slice(rank * CORE_ROWS, (rank + 1) * CORE_ROWS)
    for name, kwargs in CORE_CASES.items():
        local = [e[rows].clone().requires_grad_() for e in emb]
        loss = fused_ranking_loss(local, scale=20.0, normalize=True, gather=True,
                                  keys=[k[rows] for k in keys], **kwargs)
        loss.backward()
        results[f"core/{name}"] = (loss.detach(), [x.grad for x in local])
    if with_model:
        features = [model.preprocess(texts[rank * N:(rank + 1) * N]) for texts in _texts(world * N, seed=2)]
        for c, (name, kwargs) in enumerate(MODEL_CASES):
            for side, cls in zip(("ours", "theirs"), _classes(name)):
                loss_fn = cls(model, gather_across_devices=True, **kwargs)
                with _only_fused() if side == "ours" else contextlib.nullcontext():
                    results[f"model/{c}/{side}"] = _loss_and_grads(model, loss_fn, features, N)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(world: int, out_dir: str, with_model: bool) -> list[dict]:
    context = mp.start_processes(_worker, args=(world, os.path.join(out_dir, "rendezvous"), out_dir, with_model),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    except mp.ProcessRaisedException as error:
        pytest.fail(f"a rank raised:\n{error}")
    except mp.ProcessExitedException as error:
        pytest.fail(f"a rank died: {error}\n{traceback.format_exc()}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_fused_loss_equals_the_global_batch(tmp_path, world):
    """Hard negatives and cross-rank duplicates: Σ_r ℓ_r / W = L and rank r's gradients = W·∂L/∂E_r."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Theirs

    per_rank = _spawn(world, str(tmp_path), with_model=world == 2)
    emb, keys = _core_batch(world)
    for name, kwargs in CORE_CASES.items():
        leaves = [e.clone().requires_grad_() for e in emb]
        duplicates = kwargs.get("duplicates")
        if duplicates is None:
            partition = "joint" if kwargs["joint"] else "per_direction"
            ref = Theirs(None, directions=_directions(kwargs), partition_mode=partition,
                         hardness_mode=kwargs.get("hardness"), hardness_strength=kwargs.get("hardness_strength", 0.0),
                         ).compute_loss_from_embeddings(leaves, None)
        else:
            normed = [torch.nn.functional.normalize(x, dim=1) for x in leaves]
            total = world * CORE_ROWS
            ref = _reference_terms(normed[0], normed[1], torch.cat(normed[1:]), 20.0, keys[1], torch.cat(keys[1:]),
                                   torch.arange(total), duplicates)
            if kwargs["doc_to_query"]:
                reverse = _reference_terms(normed[1], normed[0], normed[0], 20.0, keys[0], keys[0],
                                           torch.arange(total), duplicates)
                ref = torch.logaddexp(ref, reverse)
            ref = ref.mean()
        ref.backward()
        mean_loss = sum(r[f"core/{name}"][0] for r in per_rank) / world
        assert abs(float(mean_loss - ref)) < 1e-12 * max(1.0, abs(float(ref))), name
        for c, leaf in enumerate(leaves):
            got = torch.cat([r[f"core/{name}"][1][c] for r in per_rank])
            assert _rel(got, world * leaf.grad) < 1e-10, (name, c)
    if world != 2:
        return
    from benchmarks.bench_sentence_transformers import tiny_model

    model = tiny_model(str(tmp_path / "model"), hidden=DIM).double()
    features = [model.preprocess(texts) for texts in _texts(world * N, seed=2)]
    for c, (name, kwargs) in enumerate(MODEL_CASES):
        case = (name, kwargs)
        for r in per_rank:      # each rank: the drop-in equals sentence-transformers' gathered loss
            value, grads = r[f"model/{c}/ours"]
            ref_value, ref_grads = r[f"model/{c}/theirs"]
            assert _rel(value, ref_value) < 1e-10 and _rel(grads, ref_grads) < 1e-9, case
        # the ranks together: the single-process loss of the global batch, DDP's averaged gradient
        value, grads = _loss_and_grads(model, _classes(name)[0](model, **kwargs), features, world * N)
        assert _rel(sum(r[f"model/{c}/ours"][0] for r in per_rank) / world, value) < 1e-10, case
        assert _rel(sum(r[f"model/{c}/ours"][1] for r in per_rank) / world, grads) < 1e-9, case
