"""Test set-up shared by every test file.

- Without a CUDA device, Triton kernels run on the CPU interpreter
  (TRITON_INTERPRET=1 must be set before triton is imported).
- The chunked backend's tiles are shrunk so small test shapes still span many
  tiles (ragged last tiles included).
- Fresh float allocations are filled with NaN, so a kernel that leaves part of
  an output unwritten fails loudly instead of passing on lucky zeros.
- `blocks` (indirect parametrisation, "default" or "small") shrinks every
  backend's blocking so tiny shapes cross every boundary (see `small_blocks`).
- Tests marked `gpu` are skipped without a CUDA device.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import helpers  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(autouse=True)
def _record_seeds():
    helpers.SEEDS.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that drew fresh random inputs names their seeds."""
    report = (yield).get_result()
    if report.failed and helpers.SEEDS:
        report.sections.append(("random inputs", "seeds (helpers.fresh_seed): " + ", ".join(map(str, helpers.SEEDS))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def small_chunked_tiles(monkeypatch):
    from pyclipfast.chunked import _tiles

    monkeypatch.setattr(_tiles, "TILE_ROWS", 32)
    monkeypatch.setattr(_tiles, "TILE_COLS", 48)


_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _nan_filled(t):
    if t.is_floating_point() and t.numel():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_filled_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_filled(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(_real_empty_like(*a, **k)))


# The small blocking: 16×16×16 Triton tiles, up to 64 forward row groups and 16 programs' worth
# of column groups, gradient blocks of 3 tiles with at most 2 tiles along the columns (the
# grid.y cap), 8×12 chunked tiles, 5-row cosine chunks.
SMALL_TILE = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
SMALL_GRAD_BLOCK_ELEMENTS = 3 * 16 * 16


def apply_small_blocks(monkeypatch):
    """Many row groups (the column partials merged across groups), many gradient blocks (block
    offsets into G, ids and statistics) and tiny, ragged tiles on every backend."""
    from pyclipfast import _blocks
    from pyclipfast.chunked import _tiles as chunked_tiles
    from pyclipfast.chunked import cosine as chunked_cosine

    monkeypatch.setattr(chunked_tiles, "TILE_ROWS", 8)
    monkeypatch.setattr(chunked_tiles, "TILE_COLS", 12)
    monkeypatch.setattr(chunked_cosine, "CHUNK_ROWS", 5)
    monkeypatch.setattr(_blocks, "GRAD_BLOCK_ELEMENTS", SMALL_GRAD_BLOCK_ELEMENTS)
    monkeypatch.setattr(_blocks, "INTERPRET_GRAD_BLOCK_ELEMENTS", SMALL_GRAD_BLOCK_ELEMENTS)
    monkeypatch.setattr(_blocks, "MAX_GRID_Y", 2)
    from pyclipfast._dispatch import triton_available

    if not triton_available():
        return
    from pyclipfast.triton import _tiles as triton_tiles
    from pyclipfast.triton import clip, cosine, distill, retrieval, siglip

    small = triton_tiles.TileConfig(**SMALL_TILE)
    for module in (clip, siglip, distill, retrieval):
        monkeypatch.setattr(module, "tile_config", lambda x: small)
    monkeypatch.setattr(triton_tiles, "MAX_ROW_GROUPS", 64)
    monkeypatch.setattr(triton_tiles, "INTERPRET_MAX_ROW_GROUPS", 64)
    monkeypatch.setattr(triton_tiles, "parallel_target", lambda x: 16)
    monkeypatch.setattr(retrieval, "parallel_target", lambda x: 16)
    monkeypatch.setattr(cosine, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(cosine, "BLOCK_ELEMENTS", 64)


@pytest.fixture
def small_blocks(monkeypatch):
    apply_small_blocks(monkeypatch)


@pytest.fixture
def blocks(request, monkeypatch):
    """Indirectly parametrised: "default" keeps each backend's blocking, "small" applies the small one."""
    if request.param == "small":
        apply_small_blocks(monkeypatch)
    return request.param
