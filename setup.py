"""Build script for pyclipfast.

The pure-Python package (chunked PyTorch + Triton backends) always installs. The CUDA
kernel library ``pyclipfast/cuda/libpyclipfast_cuda.so`` (sources in ``csrc/``, a plain C
interface: no torch and no Python inside) is compiled by ``csrc/build.py`` with nvcc and
ninja when a CUDA toolkit is present; no torch is needed to build it, so a plain
(build-isolated) ``pip install .`` works:

    PYCLIPFAST_BUILD_CUDA=auto (default) | 1 (force, fail if impossible) | 0 (skip)
    PYCLIPFAST_CUDA_ARCHS="80,90" (default): real code for each, plus PTX of the newest

The library has no Python ABI, so a wheel that carries it is tagged py3-none-<platform>.
"""
import importlib.util
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_MODULE = "pyclipfast.cuda.libpyclipfast_cuda"


def _builder():
    """csrc/build.py, loaded by path (csrc/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pyclipfast_csrc_build", os.path.join(HERE, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_library():
    """[the library as an Extension] when it is to be built, else [] (saying why)."""
    mode = os.environ.get("PYCLIPFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PYCLIPFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    if not os.path.exists(os.path.join(HERE, "csrc", "build.py")):
        reason = "csrc/ (the kernel sources) is missing from this source tree"
    else:
        reason = _builder().why_not_buildable()
    if reason:
        if mode == "1":
            sys.exit(f"PYCLIPFAST_BUILD_CUDA=1 but the CUDA kernel library cannot be built: {reason}")
        print(f"pyclipfast: installing without the CUDA kernel library ({reason}); backend='cuda' will be "
              "unavailable, the torch and triton backends work", file=sys.stderr)
        return []
    return [Extension(LIBRARY_MODULE, sources=[])]


class BuildCudaLibrary(build_ext):
    """Builds the library with csrc/build.py (nvcc + ninja) instead of a Python extension."""

    def get_ext_filename(self, fullname):
        parts = fullname.split(".")
        if parts[-1] == LIBRARY_MODULE.rsplit(".", 1)[1]:
            return os.path.join(*parts[:-1], parts[-1] + ".so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != LIBRARY_MODULE:
            return super().build_extension(ext)
        builder = _builder()
        archs = builder.parse_archs(os.environ.get("PYCLIPFAST_CUDA_ARCHS", ",".join(builder.DEFAULT_ARCHS)))
        jobs = int(os.environ["MAX_JOBS"]) if os.environ.get("MAX_JOBS") else None
        seconds = builder.build(self.get_ext_fullpath(ext.name), archs, jobs=jobs)
        print(f"pyclipfast: CUDA kernel library built in {seconds:.0f} s")


class PlatformWheel(bdist_wheel):
    """A wheel with the kernel library fits every Python (no Python ABI): py3-none-<platform>."""

    def get_tag(self):
        python, abi, platform = super().get_tag()
        return (python, abi, platform) if self.root_is_pure else ("py3", "none", platform)


setup(
    name="pyclipfast",
    version="0.1.0",
    description="Fused GPU kernels for CLIP-style contrastive losses (InfoNCE, SigLIP, distillation) "
    "in O(N·D) memory, with a chunked PyTorch CPU backend and open_clip drop-ins.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["pyclipfast", "pyclipfast.*"]),
    package_data={"pyclipfast.train": ["configs/*.json"]},  # the trainer's open_clip model configs
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["open_clip_torch>=2.24", "matplotlib", "pillow", "pandas", "webdataset", "braceexpand", "tensorboard"],
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
    ext_modules=_cuda_library(),
    cmdclass={"build_ext": BuildCudaLibrary, "bdist_wheel": PlatformWheel},
)
