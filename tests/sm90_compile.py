"""Compile recorded Triton kernel launches for an H100 (sm_90) without a GPU.

    python tests/sm90_compile.py LAUNCHES.json

Each record names a kernel (module, name), its argument types and constexpr
values and the launch options, as captured from interpreted launches by
tests/test_triton_sm90_compile.py. This process must run WITHOUT
TRITON_INTERPRET so `@triton.jit` yields real JIT functions; Triton's own
code generator and bundled ptxas then compile each one for the target. The
interpreter accepts kernels the GPU compiler rejects (tl.dot shapes, plain-int
globals, dtype mixes), so this is the GPU compile check CI can run.
Prints one line per record and exits 1 if any failed.
"""
import importlib
import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_record(rec: dict) -> None:
    kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
    signature, constexprs = {}, {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = rec["constexprs"][param.name]
        else:
            signature[param.name] = rec["types"][param.name]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(src, target=TARGET, options=rec["options"])


def main(path: str) -> int:
    records = json.load(open(path))
    failed = 0
    for rec in records:
        start = time.perf_counter()
        try:
            compile_record(rec)
            print(f"ok    {rec['label']} ({time.perf_counter() - start:.1f}s)", flush=True)
        except Exception as exc:  # report every failure, then fail the run
            failed += 1
            print(f"FAIL  {rec['label']}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
