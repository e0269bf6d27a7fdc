"""The CUDA C++ backend: libpyclipfast_cuda.so (csrc/, a C interface) and its launchers (pyclipfast/cuda/).

- Built whenever it can be: with nvcc and ninja present, a missing library FAILS here, so a
  kernel that does not compile fails CI. The library depends on no torch, c10, Python or pybind11.
- Python checks every argument before any launch, shapes and dtypes first and devices last,
  so every check runs on the CPU.
- The Python -> C marshalling runs on the CPU too: in record mode the library fills each
  kernel's parameter struct without launching and hands it back, compared here field by field
  with the tensors Python passed, for every launcher and dtype.
- On a GPU: each loss against the float64 reference in float32/float16/bfloat16
  (and TF32), with odd shapes, several forward groups and gradient blocks,
  misaligned and strided features, run-to-run determinism and offsets past 2^31.
  (tests/test_{clip,siglip,cosine,distill}.py hold backend="cuda" to the reference too.)
"""
import ctypes
import importlib
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyclipfast as pcf
from helpers import (
    DEVICE, HAS_CUDA, TOLERANCE, as_reference, assert_close_to_reference, features, fresh_seed, leaves, rel_err,
)
from pyclipfast._dispatch import cuda_extension_available, cuda_library_error

needs_gpu = pytest.mark.skipif(not (HAS_CUDA and cuda_extension_available()),
                               reason="needs a CUDA device and the built library libpyclipfast_cuda.so")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(*parts):
    """A file of the source tree, or skip (an installed copy of the tests has no csrc/ or benchmarks/)."""
    path = os.path.join(ROOT, *parts)
    if not os.path.exists(path):
        pytest.skip(f"no {os.path.join(*parts)} here (the tests run outside a source checkout)")
    return path


def _builder():
    spec = importlib.util.spec_from_file_location("pyclipfast_csrc_build", _source("csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def C():
    """The checked Python surface of the kernels (pyclipfast/cuda/_kernels.py)."""
    if not cuda_extension_available():
        pytest.skip(cuda_library_error())
    from pyclipfast.cuda import _kernels
    return _kernels


@pytest.fixture
def library():
    if not cuda_extension_available():
        pytest.skip(cuda_library_error())
    from pyclipfast.cuda import _library
    return _library


# ----------------------------------------------------------------------------- the build


def test_library_is_built_when_nvcc_and_ninja_are_present():
    _source("csrc", "build.py")
    if os.environ.get("PYCLIPFAST_BUILD_CUDA", "auto").strip() == "0":
        pytest.skip("PYCLIPFAST_BUILD_CUDA=0 switches the CUDA build off")
    reason = _builder().why_not_buildable()
    if reason:
        pytest.skip(reason)
    if not cuda_extension_available():
        pytest.fail(f"nvcc and ninja are present but the CUDA kernel library does not load: {cuda_library_error()}")
    for loss in ("clip", "siglip", "cosine", "distill"):
        importlib.import_module(f"pyclipfast.cuda.{loss}")


def test_build_says_why_it_cannot_build(monkeypatch, tmp_path):
    build = _builder()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("nvcc") else real_access(p, mode))
    assert build.why_not_buildable().startswith("no CUDA toolkit found")


def test_build_architectures():
    build = _builder()
    assert build.parse_archs("8.0;9.0") == build.parse_archs("sm_90, 80") == ["80", "90"]
    assert build.gencode_flags(["80", "90"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                 "-gencode=arch=compute_90,code=sm_90",
                                                 "-gencode=arch=compute_90,code=compute_90"]
    for bad in ("", "ninety"):
        with pytest.raises(ValueError, match="PYCLIPFAST_CUDA_ARCHS"):
            build.parse_archs(bad)


def test_library_depends_on_no_torch_and_no_python(library):
    """readelf -d: the library needs only the C/C++ runtime (cudart is linked in statically)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf here")
    dynamic = subprocess.run([readelf, "-d", library.library_path()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    for lib in needed:
        assert not lib.startswith(("libtorch", "libc10", "libpython", "libcudart", "libcuda.")), needed
        assert "pybind11" not in lib and "python" not in lib, needed


def test_library_c_interface_version_and_tile(library):
    lib = library.load()
    assert lib.pcf_abi_version() == library.ABI_VERSION
    assert (lib.pcf_block_m(), lib.pcf_block_n()) == (64, 64)


def test_missing_library_raises_import_error_saying_how_to_build(monkeypatch, tmp_path):
    # A fresh copy of the loader module: importing pyclipfast.cuda itself needs the library.
    path = os.path.join(os.path.dirname(pcf.__file__), "cuda", "_library.py")
    spec = importlib.util.spec_from_file_location("pyclipfast_library_probe", path)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    monkeypatch.setenv("PYCLIPFAST_CUDA_LIBRARY", str(tmp_path / "libpyclipfast_cuda.so"))
    with pytest.raises(ImportError, match="is not built; build it with `python csrc/build.py`"):
        loader.load()
    loader.load.cache_clear()
    (tmp_path / "libpyclipfast_cuda.so").write_bytes(b"not an ELF file")
    with pytest.raises(ImportError, match="does not load"):
        loader.load()


def test_library_reports_a_failed_launch_with_its_message(C):
    """No GPU here (or a bad dtype code): the C side returns an error code and says why."""
    from pyclipfast.cuda import _library

    fields = {name: 0 for name, _ in _library.SIGNATURES["cosine"]}
    fields.update(dtype=7, grad_scale=1.0, eps=1e-8)
    with pytest.raises(RuntimeError, match="cosine: unknown dtype code 7"):
        _library.call("cosine", fields)


def test_gpu_check_plan_fits_one_command():
    """benchmarks/gpu_check.sh --dry-run: the three stages in order, within the ~9-minute budget."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(["bash", _source("benchmarks", "gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 0, out.stderr
    plan = out.stdout
    assert plan.index("  tests ") < plan.index("  goals ") < plan.index("  sanitize ")
    total = next(line for line in plan.splitlines() if line.strip().startswith("total"))
    assert "fits" in total and "DOES NOT FIT" not in total, total
    assert int(total.split()[1]) <= 540, total
    assert "InfoNCE fwd+bwd  N =  32768, D = 768:   6.60 TFLOP ->   8.35 ms" in plan, plan


LAUNCHERS = [("clip", ["clip_forward", "clip_backward"]), ("siglip", ["siglip_forward"]),
             ("cosine", ["cosine_forward"]), ("distill", ["distill_forward", "distill_backward"])]


@pytest.mark.parametrize("loss,functions", LAUNCHERS, ids=[x[0] for x in LAUNCHERS])
def test_launchers_take_the_triton_backends_arguments(C, loss, functions):
    """The autograd Functions call either backend the same way."""
    pytest.importorskip("triton")
    cuda, triton = (importlib.import_module(f"pyclipfast.{folder}.{loss}") for folder in ("cuda", "triton"))
    for fn in functions:
        expected = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(triton, fn)).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cuda, fn)).parameters.values()]
        assert got == expected, fn


def test_backend_cuda_rejects_cpu_tensors():
    a = features(4, 8, device="cpu")
    with pytest.raises(ValueError, match="backend='cuda'"):
        pcf.clip_loss(a, a, 10.0, backend="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_backend_cuda_without_a_gpu_says_so():
    a = features(4, 8, device="cpu")
    with pytest.raises(ValueError, match="backend='cuda' needs a CUDA GPU and none is present"):
        pcf.clip_loss(a, a, 10.0, backend="cuda")


# ----------------------------------------------------------------------------- argument checks (CPU)

N, M, D = 70, 7, 12  # two row blocks of 64, one column block


def _valid(fn):
    """Arguments every check accepts (CPU tensors: only the device check is left to fail)."""
    f = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    common = dict(a=torch.randn(N, D), b=torch.randn(M, D), scale=torch.ones(1), row_ids=None, col_ids=None,
                  tf32=False)
    block = dict(row0=0, row1=N, col0=0, col1=M)
    if fn == "clip_forward":
        return dict(common, row_max=f(1, N), row_sum=f(1, N), row_pos=f(1, N), col_max=f(2, M), col_sum=f(2, M),
                    col_pos=f(2, M), row_groups=2, col_groups=1, row_blocks_per_group=1, col_blocks_per_group=1)
    if fn == "clip_grad":
        return dict(common, row_lse=f(N), col_lse=f(M), g_row=f(N), g_col=f(M), g_row_pos=f(N), g_col_pos=None,
                    inv_norm=torch.ones(1), g_out=f(N, M), dscale_part=f(2), **block)
    if fn == "siglip":
        return dict(common, bias=torch.zeros(1), negative_only=False, g_out=f(N, M), loss_part=f(2),
                    dscale_part=f(2), dbias_part=f(2), **block)
    options = dict(ta=None, tb=None, teacher_scale=None, margin=0.0, threshold=None, kd=0, angle_eps=1e-6)
    if fn == "distill_forward":
        return dict(common, **options, row_part=f(3, 1, N), col_part=f(3, 2, M), row_groups=2, col_groups=1,
                    row_blocks_per_group=1, col_blocks_per_group=1)
    if fn == "distill_grad":
        return dict(common, **options, row_vec=f(3, N), col_vec=f(3, M), inv_norm=torch.ones(1), g_out=f(N, M),
                    dscale_part=f(2), **block)
    assert fn == "cosine"
    return dict(online=torch.randn(N, D), target=torch.randn(N, D), cos=f(N), d_online=f(N, D), d_target=f(N, D),
                grad_scale=1.0, eps=1e-8)


_f = torch.zeros
TEACHER = dict(ta=torch.randn(N, 5), tb=torch.randn(M, 5), teacher_scale=torch.ones(1))
KD_PARTS = dict(row_part=_f(8, 1, N), col_part=_f(8, 2, M))
BAD_ARGUMENTS = [
    # function, overrides, exception, message
    ("clip_forward", dict(a=torch.randn(N, D, dtype=torch.float64)), TypeError, "a must be float32, float16 or bfloat16"),
    ("clip_forward", dict(b=torch.randn(M, D).half()), TypeError, "b has dtype torch.float16 but a has torch.float32"),
    ("clip_forward", dict(b=torch.randn(M, D + 1)), ValueError, "b has feature dimension 13 but a has 12"),
    ("clip_forward", dict(a=torch.randn(N * D)), ValueError, "a must be 2-D"),
    ("clip_forward", dict(a=torch.randn(0, D)), ValueError, "a must be non-empty"),
    ("clip_forward", dict(scale=torch.ones(2)), ValueError, "scale must be a vector of 1 elements"),
    ("clip_forward", dict(scale=None), TypeError, "scale must be a torch.Tensor, got NoneType"),
    ("siglip", dict(a=torch.randn(N, D).numpy()), TypeError, "a must be a torch.Tensor, got ndarray"),
    ("clip_forward", dict(scale=torch.ones(1, dtype=torch.float64)), TypeError, "scale must be float32"),
    ("clip_forward", dict(row_ids=torch.arange(N)), ValueError, "row_ids and col_ids must be given together"),
    ("clip_forward", dict(row_ids=torch.arange(N, dtype=torch.int32), col_ids=torch.arange(M, dtype=torch.int32)),
     TypeError, "row_ids must be int64"),
    ("clip_forward", dict(row_ids=torch.arange(N), col_ids=torch.arange(M + 1)), ValueError, r"col_ids must have shape \(7,\)"),
    ("clip_forward", dict(row_ids=torch.arange(2 * N)[::2], col_ids=torch.arange(M)), ValueError, "row_ids must be contiguous"),
    ("clip_forward", dict(row_groups=1, col_max=_f(1, M), col_sum=_f(1, M), col_pos=_f(1, M)), ValueError,
     "must cover the 2 row blocks"),
    ("clip_forward", dict(col_blocks_per_group=0), ValueError, "col_groups × col_blocks_per_group"),
    ("clip_forward", dict(col_groups=70000), ValueError, "col_groups must be in"),
    ("clip_forward", dict(row_max=_f(2, N)), ValueError, r"row_max must have shape \(1, 70\)"),
    ("clip_forward", dict(row_sum=_f(1, N, dtype=torch.float64)), TypeError, "row_sum must be float32"),
    ("clip_forward", dict(row_pos=_f(1, 2 * N)[:, ::2]), ValueError, "row_pos must be contiguous"),
    ("clip_forward", dict(col_max=_f(1, M)), ValueError, r"col_max must have shape \(2, 7\)"),
    ("clip_forward", dict(col_sum=None), ValueError, "col_max, col_sum and col_pos must be given together"),
    ("clip_forward", dict(col_dot=_f(2, M)), ValueError, "col_dot needs row_dot"),
    ("clip_forward", dict(row_dot=_f(1, N)), ValueError, "col_dot must be given exactly when the columns are"),
    ("clip_forward", dict(row_dot=_f(1, N), col_dot=_f(2, M), col_max=None, col_sum=None, col_pos=None), ValueError,
     "col_dot must be given exactly when the columns are"),
    ("clip_forward", dict(row_dot=_f(2, N), col_dot=_f(2, M)), ValueError, r"row_dot must have shape \(1, 70\)"),
    ("clip_forward", dict(row_dot=_f(1, N), col_dot=_f(2, M, dtype=torch.float64)), TypeError, "col_dot must be float32"),
    ("clip_grad", dict(row_lse=None), ValueError, "g_row needs row_lse"),
    ("clip_grad", dict(g_col=_f(M + 1)), ValueError, "g_col must be a vector of 7 elements"),
    ("clip_grad", dict(g_row_pos=_f(2 * N)[::2]), ValueError, "g_row_pos must be contiguous"),
    ("clip_grad", dict(inv_norm=_f(1, dtype=torch.float64)), TypeError, "inv_norm must be float32"),
    ("clip_grad", dict(row1=N + 1), ValueError, r"rows \[row0, row1\) = \[0, 71\)"),
    ("clip_grad", dict(col0=3, col1=3), ValueError, r"columns \[col0, col1\) = \[3, 3\)"),
    ("clip_grad", dict(g_out=_f(N, M + 1)), ValueError, r"g_out must have shape \(70, 7\)"),
    ("clip_grad", dict(g_out=_f(N, M, dtype=torch.float16)), TypeError, "g_out must have the features' dtype"),
    ("clip_grad", dict(dscale_part=_f(3)), ValueError, "dscale_part must be a vector of 2 elements"),
    ("siglip", dict(bias=torch.ones(2)), ValueError, "bias must be a vector of 1 elements"),
    ("siglip", dict(row0=64, g_out=_f(N, M)), ValueError, r"g_out must have shape \(6, 7\)"),
    ("siglip", dict(loss_part=_f(3)), ValueError, "loss_part must be a vector of 2 elements"),
    ("siglip", dict(dbias_part=_f(2, dtype=torch.float16)), TypeError, "dbias_part must be float32"),
    ("cosine", dict(online=torch.randn(N, D, dtype=torch.float64)), TypeError, "online must be float32"),
    ("cosine", dict(target=torch.randn(N, D).half()), TypeError, "target has dtype torch.float16 but online has torch.float32"),
    ("cosine", dict(target=torch.randn(N + 1, D)), ValueError, r"target must have shape \(70, 12\)"),
    ("cosine", dict(cos=_f(N + 1)), ValueError, "cos must be a vector of 70 elements"),
    ("cosine", dict(d_online=_f(N, D).half()), TypeError, "d_online must have the features' dtype"),
    ("cosine", dict(d_target=_f(D, N).t()), ValueError, "d_target must be contiguous"),
    ("cosine", dict(eps=0.0), ValueError, "eps must be > 0"),
    ("distill_forward", dict(margin=0.1), ValueError, "the teacher\\) are needed for a margin, a filter or kd"),
    ("distill_forward", dict(kd=1, **KD_PARTS), ValueError, "the teacher\\) are needed"),
    ("distill_forward", dict(TEACHER, teacher_scale=None), ValueError, "must be given together or not at all"),
    ("distill_forward", dict(TEACHER, tb=torch.randn(M, 6)), ValueError, "tb has feature dimension 6 but ta has 5"),
    ("distill_forward", dict(TEACHER, ta=torch.randn(N, 5).half()), TypeError, "ta has dtype torch.float16 but a has torch.float32"),
    ("distill_forward", dict(TEACHER, ta=torch.randn(N + 1, 5)), ValueError, r"ta must have shape \(70, teacher_dim\)"),
    ("distill_forward", dict(TEACHER, teacher_scale=torch.ones(2)), ValueError, "teacher_scale must be a vector of 1"),
    ("distill_forward", dict(margin=-0.1), ValueError, "margin must be a finite number >= 0"),
    ("distill_forward", dict(kd=3), ValueError, r"kd must be 0 \(off\), 1 \(kl\) or 2 \(ce\)"),
    ("distill_forward", dict(threshold=float("nan")), ValueError, "threshold must be finite"),
    ("distill_forward", dict(angle_eps=0.0), ValueError, "angle_eps must be in"),
    ("distill_forward", dict(row_part=_f(8, 1, N)), ValueError, r"row_part must have shape \(3, 1, 70\)"),
    ("distill_forward", dict(TEACHER, kd=1), ValueError, r"row_part must have shape \(8, 1, 70\)"),
    ("distill_forward", dict(TEACHER, kd=2, row_part=_f(8, 1, N)), ValueError, r"col_part must have shape \(8, 2, 7\)"),
    ("distill_grad", dict(row_vec=_f(7, N)), ValueError, r"row_vec must have shape \(3, 70\)"),
    ("distill_grad", dict(TEACHER, kd=1), ValueError, r"row_vec must have shape \(7, 70\)"),
    ("distill_grad", dict(col0=7, col1=8), ValueError, r"columns \[col0, col1\)"),
    ("distill_grad", dict(g_out=_f(N, M, dtype=torch.bfloat16)), TypeError, "g_out must have the features' dtype"),
    # every metadata check passes: only the device is wrong
    ("clip_forward", {}, ValueError, "a must be a CUDA tensor, got device cpu"),
    ("clip_forward", dict(col_max=None, col_sum=None, col_pos=None), ValueError, "a must be a CUDA tensor"),
    ("clip_forward", dict(row_dot=_f(1, N), col_dot=_f(2, M)), ValueError, "a must be a CUDA tensor"),
    ("clip_forward", dict(row_dot=_f(1, N), col_max=None, col_sum=None, col_pos=None), ValueError,
     "a must be a CUDA tensor"),
    ("clip_grad", {}, ValueError, "a must be a CUDA tensor, got device cpu"),
    ("clip_grad", dict(g_out=None, g_row=None, row_lse=None), ValueError, "a must be a CUDA tensor"),
    ("siglip", {}, ValueError, "a must be a CUDA tensor, got device cpu"),
    ("siglip", dict(bias=None, g_out=None, negative_only=True), ValueError, "a must be a CUDA tensor"),
    ("distill_forward", {}, ValueError, "a must be a CUDA tensor, got device cpu"),
    ("distill_forward", dict(TEACHER, kd=1, margin=0.3, threshold=0.1, **KD_PARTS), ValueError,
     "a must be a CUDA tensor"),
    ("distill_grad", {}, ValueError, "a must be a CUDA tensor, got device cpu"),
    ("distill_grad", dict(TEACHER, kd=2, row_vec=_f(7, N), col_vec=_f(7, M), g_out=None), ValueError,
     "a must be a CUDA tensor"),
    ("cosine", {}, ValueError, "online must be a CUDA tensor, got device cpu"),
    ("cosine", dict(d_online=None, d_target=None), ValueError, "online must be a CUDA tensor"),
]


@pytest.mark.parametrize("fn,overrides,exc,message", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{'-'.join(c[1]) or 'cpu'}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_are_rejected_before_any_launch(C, fn, overrides, exc, message):
    kwargs = dict(_valid(fn), **overrides)
    with pytest.raises(exc, match=message):
        getattr(C, fn)(**kwargs)


@needs_gpu
@pytest.mark.parametrize("fn", ["clip_forward", "clip_grad", "siglip", "cosine", "distill_forward", "distill_grad"])
def test_tensors_on_another_device_are_rejected(C, fn):
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _valid(fn).items()}
    first, second = ("online", "target") if fn == "cosine" else ("a", "scale")
    kwargs[second] = kwargs[second].cpu()
    with pytest.raises(ValueError, match=f"{second} is on cpu but {first} is on cuda"):
        getattr(C, fn)(**kwargs)


# ----------------------------------------------------------------------------- Python -> C marshalling (CPU)
#
# Record mode: the library fills each kernel's parameter struct exactly as for a launch, launches
# nothing and hands the struct back; every field must be what the tensors say, for every launcher
# and dtype. All sizes, strides, counts and block bounds below differ from one another, so a
# swapped argument anywhere between Python and the struct shows.

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RN, RM, RD, RDT = 200, 7, 12, 5  # four row blocks of 64, one column block
BLOCK = dict(row0=5, row1=150, col0=1, col1=6)  # 3 tiles
GROUPS = dict(row_groups=2, col_groups=1, row_blocks_per_group=3, col_blocks_per_group=5)


def _colmajor(rows, cols, dtype):
    return torch.randn(cols, rows).to(dtype).t()


def _every_other_column(rows, cols, dtype):
    return torch.randn(rows, 2 * cols + 3).to(dtype)[:, 1:2 * cols + 1:2]


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _score_fields(a, b, scale, tf32, pos_mode, row_ids=None, col_ids=None):
    return dict(dtype=DTYPE_CODE[a.dtype], a=a.data_ptr(), b=b.data_ptr(), n_rows=a.shape[0], n_cols=b.shape[0],
                dim=a.shape[1], stride_am=a.stride(0), stride_ak=a.stride(1), stride_bn=b.stride(0),
                stride_bk=b.stride(1), tf32=int(tf32 and a.dtype == torch.float32), scale=scale.data_ptr(),
                pos_mode=pos_mode, row_ids=_ptr(row_ids), col_ids=_ptr(col_ids))


def _teacher_fields(ta=None, tb=None, teacher_scale=None):
    if ta is None:
        return dict(ta=0, tb=0, teacher_dim=0, stride_tam=0, stride_tak=0, stride_tbn=0, stride_tbk=0,
                    teacher_scale=0)
    return dict(ta=ta.data_ptr(), tb=tb.data_ptr(), teacher_dim=ta.shape[1], stride_tam=ta.stride(0),
                stride_tak=ta.stride(1), stride_tbn=tb.stride(0), stride_tbk=tb.stride(1),
                teacher_scale=teacher_scale.data_ptr())


def _g_out_fields(g_out):
    return dict(g_out=_ptr(g_out), stride_gm=0 if g_out is None else g_out.stride(0),
                stride_gn=0 if g_out is None else g_out.stride(1))


def _marshal_case(fn, variant, dtype):
    """(kwargs for the checked Python function, the struct fields the library must receive)."""
    z = lambda *shape: torch.zeros(*shape)  # noqa: E731
    a, b = _colmajor(RN, RD, dtype), _every_other_column(RM, RD, dtype)
    scale = torch.ones(1)
    row_ids, col_ids = torch.arange(RN) % RM, torch.arange(RM)
    ids = dict(row_ids=row_ids, col_ids=col_ids) if variant == 0 else dict(row_ids=None, col_ids=None)
    pos_mode = 1 if variant == 0 else 0
    tf32 = variant == 0
    if fn == "clip_forward":
        outs = dict(row_max=z(1, RN), row_sum=z(1, RN), row_pos=z(1, RN))
        outs.update(dict(col_max=z(2, RM), col_sum=z(2, RM), col_pos=z(2, RM)) if variant == 0
                    else dict(col_max=None, col_sum=None, col_pos=None))
        outs.update(dict(row_dot=z(1, RN), col_dot=z(2, RM)) if variant == 0 else dict(row_dot=None, col_dot=None))
        kwargs = dict(a=a, b=b, scale=scale, **ids, **outs, **GROUPS, tf32=tf32)
        fields = dict(_score_fields(a, b, scale, tf32, pos_mode, **ids), **{k: _ptr(v) for k, v in outs.items()},
                      **GROUPS, pair_rule=0, penalty=0.0)
    elif fn == "clip_grad":
        names = ("row_lse", "col_lse", "g_row", "g_col", "g_row_pos", "g_col_pos")
        vecs = {k: z(RN if k.startswith(("row", "g_row")) else RM) for k in names}
        if variant == 1:
            vecs.update(col_lse=None, g_col=None, g_row_pos=None)
        g_out = torch.zeros(5, 145, dtype=dtype).t() if variant == 0 else None
        kwargs = dict(a=a, b=b, scale=scale, **ids, **vecs, inv_norm=torch.ones(1), g_out=g_out,
                      dscale_part=z(3), **BLOCK, tf32=tf32)
        fields = dict(_score_fields(a, b, scale, tf32, pos_mode, **ids), **{k: _ptr(v) for k, v in vecs.items()},
                      inv_norm=kwargs["inv_norm"].data_ptr(), **_g_out_fields(g_out),
                      dscale_part=kwargs["dscale_part"].data_ptr(), **BLOCK, pair_rule=0, penalty=0.0)
    elif fn == "siglip":
        bias = torch.zeros(1) if variant == 0 else None
        g_out = torch.zeros(145, 9, dtype=dtype)[:, 2:7] if variant == 0 else None
        parts = dict(loss_part=z(3), dscale_part=z(3), dbias_part=z(3))
        negative_only = variant == 0
        kwargs = dict(a=a, b=b, scale=scale, bias=bias, **ids, negative_only=negative_only, g_out=g_out, **parts,
                      **BLOCK, tf32=tf32)
        fields = dict(_score_fields(a, b, scale, tf32, 2 if negative_only else pos_mode, **ids), bias=_ptr(bias),
                      **_g_out_fields(g_out), **{k: v.data_ptr() for k, v in parts.items()}, **BLOCK)
    elif fn in ("distill_forward", "distill_grad"):
        teacher = dict(ta=_every_other_column(RN, RDT, dtype), tb=_colmajor(RM, RDT, dtype),
                       teacher_scale=torch.ones(1))
        options = (dict(margin=0.3, threshold=0.05, kd=1 if fn == "distill_forward" else 2, angle_eps=1e-6)
                   if variant == 0 else dict(margin=0.0, threshold=None, kd=0, angle_eps=2e-6))
        kd = options["kd"] != 0
        option_fields = dict(margin=float(np.float32(options["margin"])), filter=int(options["threshold"] is not None),
                             threshold=float(np.float32(options["threshold"] or 0.0)), kd=options["kd"],
                             angle_eps=float(np.float32(options["angle_eps"])))
        if variant == 0:
            teacher_fields = _teacher_fields(**teacher)
        else:  # the teacher is passed but no option reads it: the kernel gets none
            teacher_fields = _teacher_fields()
        common = dict(a=a, b=b, scale=scale, **teacher, **ids, **options, tf32=tf32)
        score = _score_fields(a, b, scale, tf32, pos_mode, **ids)
        if fn == "distill_forward":
            stats = 8 if kd else 3
            parts = dict(row_part=z(stats, 1, RN), col_part=z(stats, 2, RM))
            kwargs = dict(common, **parts, **GROUPS)
            fields = dict(score, **teacher_fields, **option_fields, **{k: v.data_ptr() for k, v in parts.items()},
                          **GROUPS)
        else:
            vectors = 7 if kd else 3
            vecs = dict(row_vec=z(vectors, RN), col_vec=z(vectors, RM), inv_norm=torch.ones(1))
            g_out = torch.zeros(5, 145, dtype=dtype).t() if variant == 0 else None
            kwargs = dict(common, **vecs, g_out=g_out, dscale_part=z(3), **BLOCK)
            fields = dict(score, **teacher_fields, **option_fields, **{k: v.data_ptr() for k, v in vecs.items()},
                          **_g_out_fields(g_out), dscale_part=kwargs["dscale_part"].data_ptr(), **BLOCK)
    else:
        assert fn == "cosine"
        online, target = _colmajor(RN, RD, dtype), _every_other_column(RN, RD, dtype)
        grads = (dict(d_online=torch.zeros(RN, RD, dtype=dtype), d_target=torch.zeros(RN, RD, dtype=dtype))
                 if variant == 0 else dict(d_online=None, d_target=None))
        kwargs = dict(online=online, target=target, cos=z(RN), **grads, grad_scale=0.37, eps=1e-8)
        fields = dict(dtype=DTYPE_CODE[dtype], online=online.data_ptr(), target=target.data_ptr(), n_rows=RN, dim=RD,
                      stride_pm=online.stride(0), stride_pk=online.stride(1), stride_zm=target.stride(0),
                      stride_zk=target.stride(1), cos=kwargs["cos"].data_ptr(),
                      **{k: _ptr(v) for k, v in grads.items()}, grad_scale=float(np.float32(0.37)),
                      eps=float(np.float32(1e-8)))
    return kwargs, dict(fields, fn=fn, device=-1, stream=0)


KERNELS = ["clip_forward", "clip_grad", "siglip", "distill_forward", "distill_grad", "cosine"]
CPU_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("variant", [0, 1], ids=["all-options", "fewest-options"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fn", KERNELS)
def test_library_receives_what_python_passes(C, library, fn, dtype, variant):
    kwargs, expected = _marshal_case(fn, variant, dtype)
    with library.record_calls() as records:
        getattr(C, fn)(**kwargs)
    assert len(records) == 1
    got = records[0]
    assert sorted(got) == sorted(expected), "the struct's fields"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"fields the C side received wrongly (got, expected): {wrong}"


def _pair_rule_case(fn, rule, dtype):
    """A rows-only InfoNCE launch with a pair rule: (kwargs, expected struct fields)."""
    z = lambda *shape: torch.zeros(*shape)  # noqa: E731
    a, b = _colmajor(RN, RD, dtype), _every_other_column(RM, RD, dtype)
    scale = torch.ones(1)
    ids = dict(row_ids=torch.arange(RN) % RM, col_ids=torch.arange(RM) - 1)
    penalty = 0.1 + rule  # not exact in float32: the library must receive the float32 rounding
    if fn == "clip_forward":
        outs = dict(row_max=z(1, RN), row_sum=z(1, RN), row_pos=z(1, RN), col_max=None, col_sum=None, col_pos=None,
                    row_dot=None, col_dot=None)
        kwargs = dict(a=a, b=b, scale=scale, **ids, **outs, **GROUPS, tf32=False, pair_rule=rule, penalty=penalty)
        fields = dict(_score_fields(a, b, scale, False, 2, **ids), **{k: _ptr(v) for k, v in outs.items()}, **GROUPS)
    else:
        vecs = dict(row_lse=z(RN), col_lse=None, g_row=z(RN), g_col=None, g_row_pos=None, g_col_pos=None)
        g_out = torch.zeros(5, 145, dtype=dtype).t()
        kwargs = dict(a=a, b=b, scale=scale, **ids, **vecs, inv_norm=torch.ones(1), g_out=g_out, dscale_part=z(3),
                      **BLOCK, tf32=True, pair_rule=rule, penalty=penalty)
        fields = dict(_score_fields(a, b, scale, True, 2, **ids), **{k: _ptr(v) for k, v in vecs.items()},
                      inv_norm=kwargs["inv_norm"].data_ptr(), **_g_out_fields(g_out),
                      dscale_part=kwargs["dscale_part"].data_ptr(), **BLOCK)
    fields.update(pair_rule=rule, penalty=float(np.float32(penalty)))
    return kwargs, dict(fields, fn=fn, device=-1, stream=0)


@pytest.mark.parametrize("rule", [1, 2, 3], ids=["exclude-equal", "penalise-unequal", "penalise-equal"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fn", ["clip_forward", "clip_grad"])
def test_library_receives_the_pair_rule(C, library, fn, dtype, rule):
    """A pair rule reaches the kernel's struct with the ids and no positives (pos_mode 2)."""
    kwargs, expected = _pair_rule_case(fn, rule, dtype)
    with library.record_calls() as records:
        getattr(C, fn)(**kwargs)
    (got,) = records
    assert sorted(got) == sorted(expected), "the struct's fields"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"fields the C side received wrongly (got, expected): {wrong}"


PAIR_RULE_BAD_ARGUMENTS = [
    ("clip_forward", dict(pair_rule=4), "pair_rule must be one of"),
    ("clip_forward", dict(pair_rule=True), "pair_rule must be one of"),
    ("clip_forward", dict(pair_rule=1, row_ids=None, col_ids=None), "pair_rule=1 needs row_ids and col_ids"),
    ("clip_forward", dict(pair_rule=2, col_max=_f(2, M), col_sum=_f(2, M), col_pos=_f(2, M)),
     "pair_rule=2 is rows only: col_max must be None"),
    ("clip_forward", dict(pair_rule=3, penalty=float("nan")), "penalty must be finite"),
    ("clip_forward", dict(pair_rule=1, row_dot=_f(1, N)), "cannot be computed with a pair_rule"),
    ("clip_grad", dict(pair_rule=1, col_lse=_f(M), g_col=_f(M)), "is rows only: col_lse, g_col must be None"),
    ("clip_grad", dict(pair_rule=3, g_row_pos=_f(N)), "is rows only: g_row_pos must be None"),
]


@pytest.mark.parametrize("fn,overrides,message", PAIR_RULE_BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PAIR_RULE_BAD_ARGUMENTS)])
def test_bad_pair_rule_arguments_are_rejected_before_any_launch(C, fn, overrides, message):
    kwargs = dict(_valid(fn), row_ids=torch.arange(N), col_ids=torch.arange(M), col_max=None, col_sum=None,
                  col_pos=None) if fn == "clip_forward" else dict(_valid(fn), row_ids=torch.arange(N),
                                                                  col_ids=torch.arange(M), col_lse=None,
                                                                  g_col=None, g_row_pos=None)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        getattr(C, fn)(**kwargs)


def test_launchers_hand_the_pair_rule_to_the_kernels(C, library, monkeypatch):
    """pyclipfast/cuda/clip.py in record mode: the rule code and α reach both kernels, rows only."""
    from pyclipfast.cuda import _launch, clip

    monkeypatch.setattr(_launch, "parallel_target", lambda x: 3)
    a, b = _colmajor(70, 12, torch.float32), _every_other_column(90, 12, torch.float32)
    rows, cols = torch.arange(70), torch.arange(90) % 70
    with library.record_calls() as records:
        clip.clip_forward(a, b, torch.tensor(7.5), rows, cols, False, rule=2, penalty=1.5)
        clip.clip_backward(a, b, torch.tensor(7.5), rows, cols, torch.rand(70), None, torch.rand(70), None, None,
                           None, rule=3, penalty=2.5)
    assert [(r["fn"], r["pair_rule"], r["penalty"], r["pos_mode"]) for r in records] == (
        [("clip_forward", 2, 1.5, 2)] + [("clip_grad", 3, 2.5, 2)] * (len(records) - 1))
    assert records[0]["col_max"] == 0 and all(r["g_col"] == 0 and r["g_row_pos"] == 0 for r in records[1:])


def _memory(ptr, shape, strides, dtype):
    """The elements at `ptr` with these strides (CPU memory), as a tensor: what a kernel would read."""
    item = torch.empty(0, dtype=dtype).element_size()
    span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    raw = bytearray((ctypes.c_char * (span * item)).from_address(ptr))
    return torch.frombuffer(raw, dtype=dtype).as_strided(shape, strides).clone()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_launchers_hand_the_kernels_their_inputs(C, library, monkeypatch, dtype):
    """pyclipfast/cuda/<loss>.py end to end in record mode, with strided features and strided ids: at
    the pointers and strides each kernel receives lie exactly the features, ids and scale."""
    from pyclipfast.cuda import _launch, clip, distill, siglip
    from pyclipfast.distill import DistillOptions

    monkeypatch.setattr(_launch, "parallel_target", lambda x: 3)
    n, m, d = 70, 90, 12
    a, b = _colmajor(n, d, dtype), _every_other_column(m, d, dtype)
    ta, tb = _every_other_column(n, RDT, dtype), _colmajor(m, RDT, dtype)
    row_ids = torch.stack([torch.arange(n) // 2, torch.arange(n)], 1)[:, 0]  # a strided view
    col_ids = torch.stack([torch.arange(m) // 3, torch.arange(m)], 1)[:, 0]
    assert not row_ids.is_contiguous() and not col_ids.is_contiguous()
    scale, teacher_scale = torch.tensor(7.5), torch.tensor(3.25)
    vec = lambda k: torch.rand(k)  # noqa: E731
    seen = []
    with library.record_calls() as records:
        original = library.call

        def call(fn, fields):  # read the memory while the launcher still holds its temporaries
            original(fn, fields)
            r = records[-1]
            seen.append(dict(
                fn=fn, a=_memory(r["a"], (r["n_rows"], r["dim"]), (r["stride_am"], r["stride_ak"]), dtype),
                b=_memory(r["b"], (r["n_cols"], r["dim"]), (r["stride_bn"], r["stride_bk"]), dtype),
                row_ids=_memory(r["row_ids"], (r["n_rows"],), (1,), torch.int64),
                col_ids=_memory(r["col_ids"], (r["n_cols"],), (1,), torch.int64),
                scale=_memory(r["scale"], (1,), (1,), torch.float32),
                ta=_memory(r["ta"], (r["n_rows"], r["teacher_dim"]), (r["stride_tam"], r["stride_tak"]), dtype)
                if r.get("ta") else None))

        monkeypatch.setattr(library, "call", call)
        clip.clip_forward(a, b, scale, row_ids, col_ids, True)
        clip.clip_backward(a, b, scale, row_ids, col_ids, vec(n), vec(m), vec(n), vec(m), vec(n), vec(m))
        siglip.siglip_forward(a, b, scale, torch.tensor(-1.0), row_ids, col_ids, False, 1.0, True, True, True, True)
        opts = DistillOptions(margin=0.3, threshold=0.05, kd="kl")
        lse = distill.distill_forward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts)
        grads = {k: vec(n if k.startswith(("row", "student_row")) else m) for k in lse if "teacher" not in k}
        distill.distill_backward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts, lse, grads)
    assert {s["fn"] for s in seen} == {"clip_forward", "clip_grad", "siglip", "distill_forward", "distill_grad"}
    for s in seen:
        assert torch.equal(s["a"], a) and torch.equal(s["b"], b), s["fn"]
        assert torch.equal(s["row_ids"], row_ids) and torch.equal(s["col_ids"], col_ids), s["fn"]
        assert float(s["scale"]) == 7.5, s["fn"]
        if s["fn"].startswith("distill"):
            assert torch.equal(s["ta"], ta), s["fn"]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
def test_clip_forward_hands_the_kernel_dot_buffers_only_when_asked(C, library, monkeypatch, bidirectional):
    """dots=True gives the kernel its own Σ exp(S − max)·S buffers, shaped like the sum-exp partials (rows
    per column group, columns per row group, none for a rows-only sweep); without it the kernel gets
    none (its plain variant) and everything else is the same."""
    from pyclipfast.cuda import _launch, clip

    monkeypatch.setattr(_launch, "parallel_target", lambda x: 3)
    n, m, d = 200, 90, 12
    a, b, scale = torch.randn(n, d), torch.randn(m, d), torch.tensor(2.0)
    with library.record_calls() as records:
        clip.clip_forward(a, b, scale, None, None, bidirectional)
        clip.clip_forward(a, b, scale, None, None, bidirectional, True)
    plain, dots = records
    assert plain["row_dot"] == plain["col_dot"] == 0
    assert dots["row_dot"] != 0 and (dots["col_dot"] != 0) == bidirectional
    pointers = {dots[k] for k in ("row_max", "row_sum", "row_pos", "col_max", "col_sum", "col_pos") if dots[k]}
    assert dots["row_dot"] not in pointers and dots["col_dot"] not in pointers
    same = {k for k in plain if k not in ("row_dot", "col_dot") and not k.startswith(("row_", "col_"))} - {"scale"}
    assert {k: dots[k] for k in same} == {k: plain[k] for k in same}


# ----------------------------------------------------------------------------- kernels against the reference (GPU)

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Several forward row and column groups (a program sweeps several row blocks and reads its
    column partials back) and several ragged gradient blocks, at test sizes."""
    from pyclipfast import _blocks
    from pyclipfast.cuda import _launch

    monkeypatch.setattr(_launch, "MAX_ROW_GROUPS", 2)
    monkeypatch.setattr(_launch, "parallel_target", lambda x: 5)
    monkeypatch.setattr(_blocks, "GRAD_BLOCK_ELEMENTS", 128 * 192)


def _misaligned(n, d, dtype, seed):
    """Features whose rows start off a 16-byte boundary (no vector loads)."""
    x = features(n, d + 1, dtype=dtype, seed=seed)
    return x[:, 1:]


def _pair(n, m, d, dtype, seed, layout):
    if layout == "misaligned":
        return _misaligned(n, d, dtype, seed), _misaligned(m, d, dtype, seed + 1)
    opts = {} if layout == "contiguous" else {"layout": layout}
    return features(n, d, dtype=dtype, seed=seed, **opts), features(m, d, dtype=dtype, seed=seed + 1, **opts)


def _ids(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    text = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])[torch.randperm(m, generator=g)]
    return dict(image_ids=torch.arange(n).to(DEVICE), text_ids=text.to(DEVICE))


# id, N, M, D, scale, layout, ids
SHAPES = [
    ("N1-D8", 1, 1, 8, 10.0, "contiguous", False),
    ("N200-D72", 200, 200, 72, 14.3, "contiguous", False),
    ("N97-D33", 97, 97, 33, 20.0, "contiguous", False),
    ("N130-D100-misaligned", 130, 130, 100, 10.0, "misaligned", False),
    ("N70-D48-strided", 70, 70, 48, 20.0, "strided", False),
    ("N66-D24-colmajor", 66, 66, 24, 5.0, "colmajor", False),
    ("N90-D16-scale100", 90, 90, 16, 100.0, "contiguous", False),
    ("N150xM201-D40-ids", 150, 201, 40, 10.0, "contiguous", True),
]


def _clip_run(backend, a, b, scale, **kw):
    a, b, scale = leaves(a, b, scale)
    loss = pcf.clip_loss(a, b, scale, backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, (a, b, scale))]


def _siglip_run(backend, a, b, scale, bias, **kw):
    a, b, scale, bias = leaves(a, b, scale, bias)
    loss = pcf.siglip_loss(a, b, scale, bias, backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, (a, b, scale, bias))]


def _to_reference(kw):
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}


def _check(out, ref, tol, names):
    for name, o, r in zip(names, out, ref):
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        err = rel_err(o, r)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@needs_gpu
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_matches_float64_reference(small_blocks, dtype, shape, bidirectional):
    _, n, m, d, s, layout, with_ids = shape
    seed = fresh_seed()
    a, b = _pair(n, m, d, dtype, seed, layout)
    scale = torch.tensor(s, device=DEVICE)
    kw = dict(_ids(n, m, seed) if with_ids else {}, bidirectional=bidirectional)
    out = _clip_run("cuda", a, b, scale, **kw)
    ref = _clip_run("reference", *as_reference(a, b, scale), **_to_reference(kw))
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_close_to_reference(out, ref, dtype, ["loss", "d_image", "d_text", "d_scale"])


@needs_gpu
@pytest.mark.parametrize("mode", ["diag", "ids", "negative_only"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_matches_float64_reference(small_blocks, dtype, shape, mode):
    _, n, m, d, s, layout, _ = shape
    if mode == "diag" and n != m:
        pytest.skip("the diagonal needs N == M")
    seed = fresh_seed()
    a, b = _pair(n, m, d, dtype, seed, layout)
    scale, bias = torch.tensor(s, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    kw = {"diag": {}, "negative_only": {"negative_only": True},
          "ids": dict(image_ids=torch.randint(0, 20, (n,), generator=g).to(DEVICE),
                      text_ids=torch.randint(0, 20, (m,), generator=g).to(DEVICE))}[mode]
    out = _siglip_run("cuda", a, b, scale, bias, **kw)
    ref = _siglip_run("reference", *as_reference(a, b, scale, bias), **_to_reference(kw))
    assert_close_to_reference(out, ref, dtype, ["loss", "d_image", "d_text", "d_scale", "d_bias"])


@needs_gpu
def test_tf32_products_when_torch_allows_them(small_blocks, monkeypatch):
    """allow_tf32 routes fp32 through TF32 tensor cores: the tf32 tolerance, and not IEEE-exact."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    a, b = features(200, 72, seed=1), features(200, 72, seed=2)
    scale = torch.tensor(20.0, device=DEVICE)
    ref = _clip_run("reference", *as_reference(a, b, scale))
    out = _clip_run("cuda", a, b, scale)
    _check(out, ref, 1e-3, ["loss", "d_image", "d_text", "d_scale"])
    out = _siglip_run("cuda", a, b, scale, torch.tensor(-10.0, device=DEVICE))
    ref = _siglip_run("reference", *as_reference(a, b, scale, torch.tensor(-10.0)))
    _check(out, ref, 1e-3, ["loss", "d_image", "d_text", "d_scale", "d_bias"])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_only_the_scale_needs_a_gradient(small_blocks, dtype):
    """Frozen features: no gradient tile is stored (g_out=None), dscale still comes from the partials."""
    a, b = features(150, 40, dtype=dtype, seed=3), features(150, 40, dtype=dtype, seed=4)
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    (ds,) = torch.autograd.grad(pcf.clip_loss(a, b, scale, backend="cuda"), scale)
    ref_scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(pcf.clip_loss(a.double().cpu(), b.double().cpu(), ref_scale, backend="reference"),
                                 ref_scale)
    _check([ds], [ref], TOLERANCE[dtype], ["d_scale"])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_deterministic(small_blocks, dtype):
    """No atomics: two runs give bit-identical losses and gradients (a race would show here)."""
    a, b = features(300, 72, dtype=dtype, seed=5), features(300, 72, dtype=dtype, seed=6)
    scale, bias = torch.tensor(30.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)
    for run in (lambda: _clip_run("cuda", a, b, scale), lambda: _siglip_run("cuda", a, b, scale, bias)):
        first, second = run(), run()
        for x, y in zip(first, second):
            assert torch.equal(x, y)


@needs_gpu
@pytest.mark.slow
def test_offsets_past_2_31_elements():
    """N·D > 2^31: the last rows are only reached with 64-bit offsets (compared against float32 on the GPU)."""
    n, m, d = 2**21 + 17, 64, 1024
    g = torch.Generator(device=DEVICE).manual_seed(7)
    a = torch.randn(n, d, device=DEVICE, generator=g, dtype=torch.bfloat16)
    a = a / a.float().norm(dim=1, keepdim=True).to(a.dtype)
    b = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE, generator=g), dim=1).to(torch.bfloat16)
    scale = torch.tensor(10.0, device=DEVICE)
    ids = dict(image_ids=torch.arange(n, device=DEVICE) % m, text_ids=torch.arange(m, device=DEVICE))
    checks = [
        (lambda x, y, s, backend: pcf.clip_loss(x, y, s, backend=backend, **ids), "clip"),
        (lambda x, y, s, backend: pcf.siglip_loss(x, y, s, -10.0, negative_only=True, backend=backend), "siglip"),
    ]
    for loss_fn, name in checks:
        x, y, s = leaves(a, b, scale)
        loss = loss_fn(x, y, s, "cuda")
        da, db, ds = torch.autograd.grad(loss, (x, y, s))
        x, y, s = leaves(a.float(), b.float(), scale)
        ref_loss = loss_fn(x, y, s, "reference")
        ref_da, ref_db, ref_ds = torch.autograd.grad(ref_loss, (x, y, s))
        tail = slice(n - 4096, n)  # rows whose offsets exceed 2^31
        _check([loss, da[tail], db, ds], [ref_loss, ref_da[tail], ref_db, ref_ds], TOLERANCE[torch.bfloat16],
               [f"{name} loss", f"{name} d_image (last rows)", f"{name} d_text", f"{name} d_scale"])
        del da, db, ref_da, ref_db


# id, N, D, feature options, magnitude of the online rows: one lane group of 8, 16 and 32 lanes,
# 2/4/8 vectors per lane in registers, and the two-sweep path past 4 KB rows
COSINE_SHAPES = [
    ("N1-D8", 1, 8, {}, 1.0),
    ("N37-D20", 37, 20, {}, 1.0),
    ("N300-D200", 300, 200, {}, 1.0),
    ("N70-D600", 70, 600, {}, 1.0),
    ("N50-D1500", 50, 1500, {}, 1.0),
    ("N20-D3000-two-sweep", 20, 3000, {}, 1.0),
    ("N33-D24-strided", 33, 24, {"layout": "strided"}, 1.0),
    ("N40-D300-colmajor", 40, 300, {"layout": "colmajor"}, 1.0),
    ("N50-D10-large-norms", 50, 10, {"normalize": False}, 100.0),
]


def _cosine_run(backend, p, z):
    p, z = leaves(p, z)
    loss = pcf.cosine_loss(p, z, target_grad=True, backend=backend)
    return [loss, *torch.autograd.grad(loss, (p, z))]


@needs_gpu
@pytest.mark.parametrize("shape", COSINE_SHAPES, ids=[s[0] for s in COSINE_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_matches_float64_reference(dtype, shape):
    _, n, d, opts, magnitude = shape
    seed = fresh_seed()
    p = features(n, d, dtype=dtype, seed=seed, **opts) * magnitude
    z = features(n, d, dtype=dtype, seed=seed + 1, **opts)
    out = _cosine_run("cuda", p, z)
    ref = _cosine_run("reference", *as_reference(p, z))
    assert all(g.dtype == dtype and g.shape == (n, d) for g in out[1:])
    assert_close_to_reference(out, ref, dtype, ["loss", "d_online", "d_target"])


@needs_gpu
@pytest.mark.parametrize("d", [5, 80, 3000])
def test_cosine_zero_vectors_are_clamped_like_cosine_similarity(d):
    p, z = features(12, d, seed=1), features(12, d, seed=2)
    p[3], z[5], p[7] = 0.0, 0.0, 1e-9 * p[7]  # zero and sub-eps rows
    z[9] = p[9]  # cos = 1: zero gradient
    out = _cosine_run("cuda", p, z)
    ref = _cosine_run("reference", *as_reference(p, z))
    assert_close_to_reference(out, ref, torch.float32, ["loss", "d_online", "d_target"])


@needs_gpu
def test_cosine_stop_gradient_target_gets_no_gradient_buffer():
    p, z = features(64, 96, seed=3).requires_grad_(), features(64, 96, seed=4)
    pcf.cosine_loss(p, z, backend="cuda").backward()
    ref_p = as_reference(p)[0]
    pcf.cosine_loss(ref_p, z.double().cpu(), backend="reference").backward()
    assert_close_to_reference([p.grad], [ref_p.grad], torch.float32, ["d_online"])


# id, options of distill_loss: margin, filter, KD kind and weight (kd_weight=0: the teacher is never read)
DISTILL_OPTIONS = [
    ("m0.3-kl", dict(margin=0.3)),
    ("m0.3-filter-kl", dict(margin=0.3, false_negative_threshold=0.05)),
    ("filter-ce-kd2", dict(false_negative_threshold=0.0, kd="ce", kd_weight=2.0)),
    ("m0.1-kd0", dict(margin=0.1, kd_weight=0.0)),
    ("plain-kd0", dict(kd_weight=0.0)),
]
# id, N, M, D, Dt, scale, layout, ids
DISTILL_SHAPES = [
    ("N1-D8-Dt6", 1, 1, 8, 6, 10.0, "contiguous", False),
    ("N97-D33-Dt20", 97, 97, 33, 20, 20.0, "contiguous", False),
    ("N130-D100-Dt72-misaligned", 130, 130, 100, 72, 10.0, "misaligned", False),
    ("N150xM201-D40-Dt24-ids", 150, 201, 40, 24, 14.3, "contiguous", True),
]


def _distill_run(backend, a, b, ta, tb, scale, teacher_scale, **kw):
    a, b, scale = leaves(a, b, scale)
    contrastive, distill = pcf.distill_loss(a, b, ta, tb, scale, teacher_scale, backend=backend, **kw)
    return [contrastive, distill, *torch.autograd.grad(contrastive + distill, (a, b, scale))]


@needs_gpu
@pytest.mark.parametrize("options", DISTILL_OPTIONS, ids=[o[0] for o in DISTILL_OPTIONS])
@pytest.mark.parametrize("shape", DISTILL_SHAPES, ids=[s[0] for s in DISTILL_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_distill_matches_float64_reference(small_blocks, dtype, shape, options):
    _, n, m, d, dt, s, layout, with_ids = shape
    seed = fresh_seed()
    a, b = _pair(n, m, d, dtype, seed, layout)
    ta, tb = _pair(n, m, dt, dtype, seed + 2, layout)
    scale, teacher_scale = torch.tensor(s, device=DEVICE), torch.tensor(1.5 * s, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    ids = {}
    if with_ids:
        image = torch.randint(0, max(1, (2 * n) // 3), (n,), generator=g)
        text = torch.cat([image, image[torch.randint(0, n, (m - n,), generator=g)]])[torch.randperm(m, generator=g)]
        ids = dict(image_ids=image.to(DEVICE), text_ids=text.to(DEVICE))
    kw = dict(options[1], **ids)
    out = _distill_run("cuda", a, b, ta, tb, scale, teacher_scale, **kw)
    ref = _distill_run("reference", *as_reference(a, b, ta, tb, scale, teacher_scale), **_to_reference(kw))
    assert out[2].dtype == dtype and out[3].dtype == dtype
    names = ["contrastive", "distill", "d_image", "d_text", "d_scale"]
    if options[1].get("kd_weight") == 0.0:
        assert float(out[1]) == 0.0
        out, ref, names = out[:1] + out[2:], ref[:1] + ref[2:], names[:1] + names[2:]
    assert_close_to_reference(out, ref, dtype, names)


# ----------------------------------------------------------------------------- the margin near |c| = 1


def _near_duplicates(n, d, seed):
    """Unit rows a_i and b_j = ±a_(j−1) + small noise: each row has one negative with |c| within
    1e-4 of 1 (+1 in the first half, −1 in the second)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    level = 10 ** torch.empty(n, 1, dtype=torch.float64).uniform_(-2.5, -2.0, generator=g)
    sign = torch.where(torch.arange(n) < n // 2, 1.0, -1.0).to(torch.float64)[:, None]
    b = torch.nn.functional.normalize(sign * a.roll(1, 0) + level * noise, dim=1)
    return a.float(), b.float()


def test_near_duplicate_inputs_are_near_duplicates():
    a, b = _near_duplicates(64, 32, seed=0)
    c = (a.double() @ b.double().T).fill_diagonal_(0)
    near = (1 - c.abs()) < 1e-4
    assert int(near.sum()) == 64 and int(near.sum(1).min()) == 1


def _slope_f32(c, alpha, margin, eps, sin_mu_error=0.0):
    """ψ' of csrc/distill/distill_tile.cuh in float32 arithmetic (sin/cos of μ through sincospif(μ·1/π)),
    with sin μ off by `sin_mu_error`; and the same in float64."""
    f = np.float32
    cc = np.clip(c, f(-1 + eps), f(1 - eps))
    sin_theta = np.sqrt((f(1) - cc) * (f(1) + cc))
    mu = f(margin) * (f(1) - alpha)
    x = mu * f(1 / np.pi)
    sin_mu = (np.sin(np.pi * x.astype(np.float64)).astype(f) + f(sin_mu_error)).astype(f)
    cos_mu = np.cos(np.pi * x.astype(np.float64)).astype(f)
    slope32 = np.where(cc < cos_mu, cos_mu - cc * sin_mu / sin_theta, f(0))
    c64, mu64 = c.astype(np.float64), margin * (1 - alpha.astype(np.float64))
    sin_theta64 = np.sqrt((1 - c64) * (1 + c64))
    slope64 = np.where(c64 < np.cos(mu64), np.cos(mu64) - c64 * np.sin(mu64) / sin_theta64, 0.0)
    return slope32, slope64


def test_margin_slope_model_near_duplicates_needs_accurate_sin():
    """CPU model of the kernel's ψ' = cos μ − c·sin μ / sin θ for negatives with c within 1e-4 of 1 and
    μ < θ (the teacher agrees they are near-duplicates): accurate sin μ stays within the float32
    tolerance; an error of __sincosf's size (2^-21.41 absolute) does not."""
    rng = np.random.default_rng(0)
    c = (1 - 10 ** rng.uniform(-6, -4, 4096)).astype(np.float32)
    theta = np.arccos(c.astype(np.float64))
    margin = 0.3
    alpha = (1 - rng.uniform(0.05, 0.95, c.size) * theta / margin).astype(np.float32)  # μ = u·θ
    slope32, slope64 = _slope_f32(c, alpha, margin, 1e-6)
    err = np.linalg.norm(slope32 - slope64) / np.linalg.norm(slope64)
    assert err <= TOLERANCE[torch.float32], err
    fast32, _ = _slope_f32(c, alpha, margin, 1e-6, sin_mu_error=2 ** -21.41)
    fast_err = np.linalg.norm(fast32 - slope64) / np.linalg.norm(slope64)
    assert fast_err > 10 * TOLERANCE[torch.float32], fast_err


@needs_gpu
@pytest.mark.parametrize("teacher", ["student", "random"])
def test_distill_margin_near_duplicate_negatives(small_blocks, teacher):
    """Negatives with |c| within 1e-4 of 1 and margin > 0, float32, against the float64 reference.
    Teacher = student: μ = m·(1 − c) < θ, the small sin μ that an approximate sin gets wrong."""
    a, b = _near_duplicates(96, 64, seed=3)
    ta, tb = (a, b) if teacher == "student" else (features(96, 24, seed=4, device="cpu"),
                                                 features(96, 24, seed=5, device="cpu"))
    a, b, ta, tb = (x.to(DEVICE) for x in (a, b, ta, tb))
    scale, teacher_scale = torch.tensor(20.0, device=DEVICE), torch.tensor(30.0, device=DEVICE)
    kw = dict(margin=0.3, kd_weight=0.0, normalize=False)
    out = _distill_run("cuda", a, b, ta, tb, scale, teacher_scale, **kw)
    ref = _distill_run("reference", *as_reference(a, b, ta, tb, scale, teacher_scale), **kw)
    out, ref = out[:1] + out[2:], ref[:1] + ref[2:]
    assert_close_to_reference(out, ref, torch.float32, ["contrastive", "d_image", "d_text", "d_scale"])
