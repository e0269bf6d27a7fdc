"""Test set-up shared by every test file.

- Without a CUDA device, Triton kernels run on the CPU interpreter
  (TRITON_INTERPRET=1 must be set before triton is imported).
- The chunked backend's tiles are shrunk so small test shapes still span many
  tiles (ragged last tiles included).
- Fresh float allocations are filled with NaN, so a kernel that leaves part of
  an output unwritten fails loudly instead of passing on lucky zeros.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
