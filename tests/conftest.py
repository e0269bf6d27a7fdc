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


@pytest.fixture
def small_blocks(monkeypatch):
    helpers.apply_small_blocks(monkeypatch)


@pytest.fixture
def blocks(request, monkeypatch):
    """Indirectly parametrised: "default" keeps each backend's blocking, "small" applies the small one."""
    if request.param == "small":
        helpers.apply_small_blocks(monkeypatch)
    return request.param
