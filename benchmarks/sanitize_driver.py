"""Run every CUDA and Triton kernel of pyclipfast once on small odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/sanitize_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 99 python benchmarks/sanitize_driver.py --backends cuda

The shapes span several tiles, forward row/column groups and gradient blocks (the block
sizes are shrunk here), with ragged edges, D not a multiple of 16, and misaligned and
strided rows, so an out-of-bounds access or a shared-memory race on any code path is
exercised. Each call runs forward and backward and checks that the results are finite;
one line per call. Exits non-zero if a call raises or returns a non-finite value.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

import pyclipfast as pcf  # noqa: E402
from pyclipfast import _blocks  # noqa: E402
from pyclipfast._dispatch import cuda_extension_available, triton_available  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shrink_blocks() -> None:
    """Several forward groups and gradient blocks at these sizes, on both backends."""
    _blocks.GRAD_BLOCK_ELEMENTS = 128 * 192
    if cuda_extension_available():
        from pyclipfast.cuda import _launch

        _launch.MAX_ROW_GROUPS = 2
        _launch.parallel_target = lambda x: 5
    if triton_available():
        from pyclipfast.triton import _tiles, cosine

        _tiles.MAX_ROW_GROUPS = 2
        _tiles.parallel_target = lambda x: 5
        cosine.MAX_BLOCK_D = 64  # the two-sweep path for D > 64


def features(n: int, d: int, dtype: torch.dtype, layout: str = "contiguous", seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d + 1, device="cuda", generator=g), dim=1)
    if layout == "misaligned":  # rows start 1 element past a 16-byte boundary
        return x.to(dtype)[:, 1:]
    x = x[:, :d].to(dtype)
    if layout == "strided":
        wide = torch.zeros(n, 2 * d, device="cuda", dtype=dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.contiguous()


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> List[torch.Tensor]:
    return [loss, *torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])]


def cases(backend: str, dtype: torch.dtype) -> List[tuple]:
    """(name, thunk) pairs; each thunk runs one loss forward and backward."""
    def leaf(x):
        return x.detach().requires_grad_()

    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-5.0, device="cuda", requires_grad=True)
    a, b = leaf(features(150, 40, dtype, seed=1)), leaf(features(150, 40, dtype, seed=2))
    am, bm = leaf(features(97, 33, dtype, "misaligned", 3)), leaf(features(130, 33, dtype, "misaligned", 4))
    ast, bst = leaf(features(70, 24, dtype, "strided", 5)), leaf(features(70, 24, dtype, "strided", 6))
    ids_a = torch.arange(97, device="cuda") % 50
    ids_b = torch.arange(130, device="cuda") % 50
    wide_p, wide_z = leaf(features(9, 3000, dtype, seed=9)), features(9, 3000, dtype, seed=10)
    ta, tb = features(97, 20, dtype, seed=7), features(130, 20, dtype, seed=8)
    t = torch.tensor(15.0, device="cuda")
    out = [
        ("clip diag", lambda: grads(pcf.clip_loss(a, b, s, backend=backend), a, b, s)),
        ("clip ids misaligned rows-only", lambda: grads(
            pcf.clip_loss(am, bm[:97], s, image_ids=ids_a, text_ids=ids_b[:97], bidirectional=False,
                          backend=backend), am, bm, s)),
        ("clip ids rect", lambda: grads(
            pcf.clip_loss(am, bm, s, image_ids=ids_a, text_ids=ids_b, backend=backend), am, bm, s)),
        ("clip strided scale-only", lambda: grads(
            pcf.clip_loss(ast.detach(), bst.detach(), s, backend=backend), s)),
        ("siglip diag", lambda: grads(pcf.siglip_loss(a, b, s, bias, backend=backend), a, b, s, bias)),
        ("siglip ids misaligned", lambda: grads(
            pcf.siglip_loss(am, bm, s, bias, image_ids=ids_a, text_ids=ids_b, backend=backend), am, bm, s, bias)),
        ("siglip negative-only strided", lambda: grads(
            pcf.siglip_loss(ast, bst[:50], s, None, negative_only=True, backend=backend), ast, bst, s)),
        ("cosine D=20", lambda: grads(pcf.cosine_loss(a[:, :20], b[:, :20], target_grad=True, backend=backend),
                                      a, b)),
        ("cosine D=33 misaligned", lambda: grads(pcf.cosine_loss(am, bm[:97], target_grad=True, backend=backend),
                                                 am, bm)),
        ("cosine D=3000 stop-grad", lambda: grads(pcf.cosine_loss(wide_p, wide_z, backend=backend), wide_p)),
        ("distill margin filter kl ids", lambda: grads(sum(pcf.distill_loss(
            am, bm, ta, tb, s, t, margin=0.3, false_negative_threshold=0.05, image_ids=ids_a, text_ids=ids_b,
            backend=backend)), am, bm, s)),
        ("distill ce kd2", lambda: grads(sum(pcf.distill_loss(
            a[:97], b[:97], ta, tb[:97], s, t, kd="ce", kd_weight=2.0, backend=backend)), a, b, s)),
        ("distill plain kd0", lambda: grads(sum(pcf.distill_loss(
            a, b, a.detach(), b.detach(), s, t, kd_weight=0.0, backend=backend)), a, b, s)),
    ]
    if backend == "triton":
        out.append(("recall@k", lambda: [torch.tensor(list(pcf.recall_at_k(
            am.detach(), bm.detach(), (1, 5), query_ids=ids_a, gallery_ids=ids_b, backend="triton").values()))]))
    return out


def run(backend: str, dtype_name: str, tf32: bool) -> int:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    failures = 0
    for name, thunk in cases(backend, DTYPES[dtype_name]):
        label = f"{backend:<6} {dtype_name:<8}{' tf32' if tf32 else '     '} {name}"
        t0 = time.perf_counter()
        try:
            values = thunk()
            torch.cuda.synchronize()
            bad = [i for i, v in enumerate(values) if not torch.isfinite(v.detach()).all()]
            status = "ok" if not bad else f"NON-FINITE output(s) {bad}"
            failures += bool(bad)
        except Exception:  # report and go on: one failure must not hide the others
            status = "RAISED\n" + traceback.format_exc()
            failures += 1
        print(f"{label:<60} {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton", help="comma-separated: cuda, triton")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, float16, bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 2
    available = {"cuda": cuda_extension_available(), "triton": triton_available()}
    shrink_blocks()
    failures = 0
    for backend in args.backends.split(","):
        if not available.get(backend):
            print(f"{backend}: not available here (CUDA kernel library not built / triton missing)", flush=True)
            failures += 1
            continue
        for dtype_name in args.dtypes.split(","):
            failures += run(backend, dtype_name, tf32=False)
        if "float32" in args.dtypes.split(","):
            failures += run(backend, "float32", tf32=True)  # the TF32 tensor-core paths
    print(f"sanitize_driver: {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
