"""The CUDA C++ backend: pyclipfast._C (csrc/) and its launchers (pyclipfast/cuda/).

- Built whenever it can be: with nvcc and a CUDA build of torch present, a missing
  or broken extension FAILS here, so a kernel that does not compile fails CI.
- The binding checks its arguments before any launch, shapes and dtypes first and
  devices last, so every check runs on the CPU.
- On a GPU: each loss against the float64 reference in float32/float16/bfloat16
  (and TF32), with odd shapes, several forward groups and gradient blocks,
  misaligned and strided features, run-to-run determinism and offsets past 2^31.
  (tests/test_{clip,siglip,cosine,distill}.py hold backend="cuda" to the reference too.)
"""
import importlib
import inspect
import os
import shutil
import sys

import pytest
import torch

import pyclipfast as pcf
from helpers import DEVICE, HAS_CUDA, TOLERANCE, as_reference, assert_close_to_reference, features, leaves, rel_err
from pyclipfast._dispatch import cuda_extension_available

needs_gpu = pytest.mark.skipif(not (HAS_CUDA and cuda_extension_available()),
                               reason="needs a CUDA device and the built extension pyclipfast._C")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _why_not_buildable():
    if os.environ.get("PYCLIPFAST_BUILD_CUDA", "auto").strip() == "0":
        return "PYCLIPFAST_BUILD_CUDA=0 switches the CUDA build off"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _nvcc() is None:
        return "no nvcc (CUDA toolkit) found"
    return None


@pytest.fixture
def C():
    try:
        from pyclipfast import _C
    except ImportError as err:
        pytest.skip(f"pyclipfast._C is not built ({err})")
    return _C


# ----------------------------------------------------------------------------- the build


def test_extension_is_built_when_nvcc_and_cuda_torch_are_present():
    reason = _why_not_buildable()
    if reason:
        pytest.skip(reason)
    try:
        from pyclipfast import _C
    except ImportError as err:
        pytest.fail(f"nvcc ({_nvcc()}) and torch {torch.__version__} (CUDA {torch.version.cuda}) are present but "
                    f"pyclipfast._C does not import: {err}. Build it with: CUDA_HOME=/usr/local/cuda-13.0 "
                    "TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .")
    for fn in ("clip_forward", "clip_grad", "siglip", "cosine", "distill_forward", "distill_grad"):
        assert callable(getattr(_C, fn)), fn
    assert (_C.BLOCK_M, _C.BLOCK_N) == (64, 64)
    assert cuda_extension_available()
    for loss in ("clip", "siglip", "cosine", "distill"):
        importlib.import_module(f"pyclipfast.cuda.{loss}")


def test_cuda_package_raises_import_error_without_the_extension(monkeypatch):
    import pyclipfast

    monkeypatch.setitem(sys.modules, "pyclipfast._C", None)  # `import pyclipfast._C` now fails
    monkeypatch.delattr(pyclipfast, "_C", raising=False)
    monkeypatch.delattr(pyclipfast, "cuda", raising=False)
    for name in [k for k in sys.modules if k == "pyclipfast.cuda" or k.startswith("pyclipfast.cuda.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        importlib.import_module("pyclipfast.cuda.clip")


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
    ("clip_forward", dict(b=torch.randn(M, D).half()), TypeError, "b has dtype Half but a has Float"),
    ("clip_forward", dict(b=torch.randn(M, D + 1)), ValueError, "b has feature dimension 13 but a has 12"),
    ("clip_forward", dict(a=torch.randn(N * D)), ValueError, "a must be 2-D"),
    ("clip_forward", dict(a=torch.randn(0, D)), ValueError, "a must be non-empty"),
    ("clip_forward", dict(scale=torch.ones(2)), ValueError, "scale must be a vector of 1 elements"),
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
    ("cosine", dict(target=torch.randn(N, D).half()), TypeError, "target has dtype Half but online has Float"),
    ("cosine", dict(target=torch.randn(N + 1, D)), ValueError, r"target must have shape \(70, 12\)"),
    ("cosine", dict(cos=_f(N + 1)), ValueError, "cos must be a vector of 70 elements"),
    ("cosine", dict(d_online=_f(N, D).half()), TypeError, "d_online must have the features' dtype"),
    ("cosine", dict(d_target=_f(D, N).t()), ValueError, "d_target must be contiguous"),
    ("cosine", dict(eps=0.0), ValueError, "eps must be > 0"),
    ("distill_forward", dict(margin=0.1), ValueError, "the teacher\\) are needed for a margin, a filter or kd"),
    ("distill_forward", dict(kd=1, **KD_PARTS), ValueError, "the teacher\\) are needed"),
    ("distill_forward", dict(TEACHER, teacher_scale=None), ValueError, "must be given together or not at all"),
    ("distill_forward", dict(TEACHER, tb=torch.randn(M, 6)), ValueError, "tb has feature dimension 6 but ta has 5"),
    ("distill_forward", dict(TEACHER, ta=torch.randn(N, 5).half()), TypeError, "ta has dtype Half but a has Float"),
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
def test_binding_rejects_bad_arguments(C, fn, overrides, exc, message):
    kwargs = dict(_valid(fn), **overrides)
    with pytest.raises(exc, match=message):
        getattr(C, fn)(**kwargs)


@needs_gpu
@pytest.mark.parametrize("fn", ["clip_forward", "clip_grad", "siglip", "cosine", "distill_forward", "distill_grad"])
def test_binding_rejects_tensors_on_another_device(C, fn):
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _valid(fn).items()}
    first, second = ("online", "target") if fn == "cosine" else ("a", "scale")
    kwargs[second] = kwargs[second].cpu()
    with pytest.raises(ValueError, match=f"{second} is on cpu but {first} is on cuda"):
        getattr(C, fn)(**kwargs)


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
    seed = torch.seed() % 2**31
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
    seed = torch.seed() % 2**31
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
    """allow_tf32 routes fp32 through TF32 tensor cores: SPEC's tf32 tolerance, and not IEEE-exact."""
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
    seed = torch.seed() % 2**31
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
    seed = torch.seed() % 2**31
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
