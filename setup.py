"""Build script for pyclipfast.

The pure-Python package (chunked PyTorch + Triton backends) always installs.
The CUDA C++ extension ``pyclipfast._C`` (sources in ``csrc/``) is built when a
CUDA toolkit and a CUDA-enabled torch are present:

    PYCLIPFAST_BUILD_CUDA=auto (default) | 1 (force, fail if impossible) | 0 (skip)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" (default) selects the architectures.

torch must already be installed; build with ``pip install --no-build-isolation -e .``
so pip does not fetch a second torch into an isolated build environment.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    mode = os.environ.get("PYCLIPFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PYCLIPFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    reason = None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        reason = "torch is not installed (install it first, then use --no-build-isolation)"
    else:
        if not sources:
            reason = "csrc/ holds no sources"
        elif torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif cpp_extension.CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason:
        if mode == "1":
            sys.exit(f"PYCLIPFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"pyclipfast: building without the CUDA extension ({reason})")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = cpp_extension.CUDAExtension(
        name="pyclipfast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            # The C++ binding only checks arguments: -O1 -g0 halves its compile time (the
            # slowest file, it parses torch headers). No -std: torch adds the standard its
            # headers need (C++20 for recent torch, C++17 for older). The .cu kernels never see torch.
            "cxx": ["-O1", "-g0"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
        },
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="pyclipfast",
    version="0.1.0",
    description="Fused GPU kernels for CLIP-style contrastive losses (InfoNCE, SigLIP, distillation) "
    "in O(N·D) memory, with a chunked PyTorch CPU backend and open_clip drop-ins.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyclipfast", "pyclipfast.*"]),
    package_data={"pyclipfast.train": ["configs/*.json"]},  # the trainer's open_clip model configs
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["open_clip_torch>=2.24", "matplotlib", "pillow", "pandas", "webdataset", "braceexpand"],
        "sentence-transformers": ["sentence-transformers>=6.2"],
        "test": [
            "pytest>=7",
            "pytest-benchmark",
            "open_clip_torch>=2.24",
            "matplotlib",
            "pandas",
            "webdataset",
            "braceexpand",
            "ninja",
            "sentence-transformers>=6.2",
        ],
    },
    entry_points={"console_scripts": ["pyclipfast-train=pyclipfast.train.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
