"""Fixtures shared by the trainer tests."""
import pytest
import torch

from pyclipfast.chunked import _tiles

# The chunked backend's real tile shape, read before the root conftest shrinks it for the loss tests.
REAL_TILE_SHAPE = (_tiles.TILE_ROWS, _tiles.TILE_COLS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models on a shared 2-core machine: one thread avoids OpenMP waits on descheduled workers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def real_tiles(monkeypatch):
    """The trainer runs the losses as users get them (tiny tiles make the batch-8192 memory comparison crawl)."""
    monkeypatch.setattr(_tiles, "TILE_ROWS", REAL_TILE_SHAPE[0])
    monkeypatch.setattr(_tiles, "TILE_COLS", REAL_TILE_SHAPE[1])
