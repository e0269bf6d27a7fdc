"""Every Triton kernel the library launches also compiles for an H100 (sm_90).

The CPU tests run the kernels through Triton's interpreter, which accepts code
the GPU compiler rejects. Here the public ops run once each (interpreted, with
the GPU tile configurations), every launch is recorded (kernel, argument
dtypes, constexprs, warps, stages; fp16 launches become bf16 ones), and
a separate process compiles each distinct launch for sm_90 with Triton's own
code generator and ptxas; the small blocking of the GPU tests (16×16×16 tiles)
is recorded too. Needs no GPU; skipped only when running on a GPU
machine, where the real tests compile the kernels anyway.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import pyclipfast as pcf
from pyclipfast.clip import PAIR_RULES, clip_row_lse
from helpers import HAS_CUDA, apply_small_blocks, features

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled by the GPU tests themselves")

TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


class LaunchRecorder:
    """Wraps InterpretedFunction.run to note every launch as a compile record."""

    def __init__(self):
        self.records = {}

    def __call__(self, original):
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.add(self, args, kwargs)
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    def add(self, fn, args, kwargs) -> None:
        params = inspect.signature(fn.fn).parameters
        names = list(params)
        bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in params})
        constexprs = {k: v for k, v in bound.items() if params[k].annotation is not inspect.Parameter.empty
                      and "constexpr" in str(params[k].annotation)}
        types = {k: _type_of(v) for k, v in bound.items() if k not in constexprs}
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        # fp16 launches are compiled as bf16: the same code path, and the dtype the interpreter can't run.
        types = {k: "*bf16" if t == "*fp16" else t for k, t in types.items()}
        dtypes = sorted({t for t in types.values() if t.startswith(("*f", "*b"))})
        label = f"{fn.fn.__module__}.{fn.fn.__name__} {'/'.join(dtypes)} " + " ".join(
            f"{k}={v}" for k, v in sorted(constexprs.items()))
        self.records[label] = dict(module=fn.fn.__module__, name=fn.fn.__name__, types=types,
                                   constexprs=constexprs, options=options, label=label)


def _exercise_every_op() -> None:
    """One forward + backward of each public op, over the kernels' constexpr branches."""
    for dtype in (torch.float32, torch.float16):
        a, b = features(40, 24, dtype=dtype), features(40, 24, dtype=dtype)
        ta, tb = features(40, 16, dtype=dtype), features(40, 16, dtype=dtype)
        ids = torch.arange(40) // 2
        for kw in ({}, {"image_ids": ids, "text_ids": ids}):
            for bidirectional in (True, False):
                x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
                pcf.clip_loss(x, y, torch.tensor(10.0, requires_grad=True), backend="triton",
                              bidirectional=bidirectional, **kw).backward()
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            pcf.siglip_loss(x, y, torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True),
                            backend="triton", **kw).backward()
        for rule in PAIR_RULES:
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            clip_row_lse(x, y, torch.tensor(10.0, requires_grad=True), ids, ids, rule=rule, penalty=3.0,
                         backend="triton").sum().backward()
        with torch.no_grad():
            pcf.siglip_loss(a, b, 10.0, None, negative_only=True, backend="triton")
        for margin, threshold, kd_weight in ((0.0, None, 1.0), (0.2, 0.5, 2.0), (0.1, None, 0.0)):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            ce, kd = pcf.distill_loss(x, y, ta, tb, torch.tensor(10.0, requires_grad=True), 20.0, margin=margin,
                                      false_negative_threshold=threshold, kd_weight=kd_weight, backend="triton")
            (ce + kd).backward()
        for d in (24, 9000):  # one D block in registers, and the two-sweep loop
            p, z = features(8, d, dtype=dtype).requires_grad_(), features(8, d, dtype=dtype).requires_grad_()
            pcf.cosine_loss(p, z, target_grad=True, backend="triton").backward()
        pcf.recall_at_k(a, b, backend="triton")
        pcf.recall_at_k(a, b, query_ids=ids, gallery_ids=ids, backend="triton")


def _exercise_small_blocks() -> None:
    """The 16×16×16 tiles of the GPU tests' small blocking (helpers.apply_small_blocks), in the
    InfoNCE kernels (one dot per tile) and the distillation ones (two dots live at once)."""
    a, b = features(40, 24, dtype=torch.float16), features(40, 24, dtype=torch.float16)
    ta, tb = features(40, 16, dtype=torch.float16), features(40, 16, dtype=torch.float16)
    ids = torch.arange(40) // 2
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    pcf.clip_loss(x, y, 10.0, image_ids=ids, text_ids=ids, backend="triton").backward()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    sum(pcf.distill_loss(x, y, ta, tb, 10.0, 20.0, margin=0.2, false_negative_threshold=0.5,
                         backend="triton")).backward()


def test_every_launched_kernel_compiles_for_sm90(tmp_path, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    import pyclipfast.triton._tiles as tiles

    recorder = LaunchRecorder()
    monkeypatch.setattr(InterpretedFunction, "run", recorder(InterpretedFunction.run))
    monkeypatch.setattr(tiles, "triton_interpreting", lambda: False)  # record the GPU tile configurations
    _exercise_every_op()
    with pytest.MonkeyPatch.context() as small:
        apply_small_blocks(small)
        _exercise_small_blocks()
    assert len(recorder.records) >= 10, f"too few launches recorded: {list(recorder.records)}"
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(recorder.records.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    proc = subprocess.run([sys.executable, script, str(path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, f"sm_90 compilation failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
