"""Tile-shape sweep for the chunked PyTorch backend (pyclipfast/chunked/_tiles.py).

    python benchmarks/bench_chunked_tiles.py [--n 8192] [--d 256] [--repeats 3]

Times clip_loss fwd+bwd (float32, CPU) for several TILE_ROWS × TILE_COLS and
prints the median of each; the defaults in _tiles.py come from this sweep.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pyclipfast as pcf
from pyclipfast.chunked import _tiles

SHAPES = [(256, 8192), (512, 8192), (512, 2048), (512, 1024), (1024, 1024), (2048, 512), (1024, 2048)]


def time_once(a, b, scale) -> float:
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    start = time.perf_counter()
    pcf.clip_loss(a, b, scale, backend="torch").backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    a = F.normalize(torch.randn(args.n, args.d), dim=-1)
    b = F.normalize(torch.randn(args.n, args.d), dim=-1)
    scale = torch.tensor(14.3, requires_grad=True)
    print(f"clip_loss fwd+bwd, backend=torch, N={args.n}, D={args.d}, fp32, {torch.get_num_threads()} threads")
    print("tile rows x cols   median s   (all runs)")
    for rows, cols in SHAPES:
        _tiles.TILE_ROWS, _tiles.TILE_COLS = rows, cols
        time_once(a, b, scale)  # warm-up
        runs = [time_once(a, b, scale) for _ in range(args.repeats)]
        print(f"{rows:>5} x {cols:<6}     {statistics.median(runs):7.3f}   {' '.join(f'{t:.3f}' for t in runs)}")


if __name__ == "__main__":
    main()
