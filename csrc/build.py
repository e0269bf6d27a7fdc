"""Build libpyclipfast_cuda.so, the CUDA kernels behind the C interface of pyclipfast_c.h.

nvcc compiles each .cu (one loss kernel in one dtype) and capi.cpp into an object, ninja runs
them in parallel, and nvcc links them with the CUDA runtime linked statically: the library
needs no torch, no Python and no CUDA toolkit where it runs, only the NVIDIA driver.

    python csrc/build.py [--out pyclipfast/cuda/libpyclipfast_cuda.so] [--archs 80,90] [--jobs N]

setup.py calls `build()` (PYCLIPFAST_BUILD_CUDA and PYCLIPFAST_CUDA_ARCHS select what it builds).
Architectures: real code (sm_XY) for each, plus PTX of the newest so that later GPUs JIT it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIBRARY = "libpyclipfast_cuda.so"
DEFAULT_OUT = os.path.join(ROOT, "pyclipfast", "cuda", LIBRARY)
DEFAULT_ARCHS = ("80", "90")
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden", "-I", HERE]


def find_nvcc() -> Optional[str]:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda; None when there is none."""
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_ninja() -> Optional[str]:
    try:  # the ninja wheel (a build requirement in pyproject.toml)
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def why_not_buildable() -> Optional[str]:
    """None when the library can be built here, else the reason in words."""
    if find_nvcc() is None:
        return "no CUDA toolkit found (no nvcc in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin; set CUDA_HOME)"
    if find_ninja() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def parse_archs(text: str) -> List[str]:
    """'80,90' / '8.0;9.0' / 'sm_90' -> ['80', '90']."""
    archs = []
    for item in text.replace(";", ",").replace(" ", ",").split(","):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if item:
            if not item.isdigit():
                raise ValueError(f"PYCLIPFAST_CUDA_ARCHS: {item!r} is not a compute capability like 90 or 9.0")
            archs.append(item)
    if not archs:
        raise ValueError("PYCLIPFAST_CUDA_ARCHS names no architecture")
    return sorted(set(archs), key=int)


def gencode_flags(archs: Sequence[str]) -> List[str]:
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    return flags


def sources() -> List[str]:
    return sorted(glob.glob(os.path.join(HERE, "**", "*.cu"), recursive=True)) + [os.path.join(HERE, "capi.cpp")]


def write_ninja(build_dir: str, out: str, nvcc: str, archs: Sequence[str]) -> str:
    q = shlex.quote
    flags = " ".join(q(f) for f in NVCC_FLAGS + gencode_flags(archs))
    lines = [
        "ninja_required_version = 1.3",
        f"builddir = {q(build_dir)}",  # ninja's log and dependency database
        f"nvcc = {q(nvcc)}",
        f"flags = {flags}",
        "rule compile",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared -cudart static $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for src in sources():
        obj = os.path.join(build_dir, os.path.relpath(src, HERE).replace(os.sep, "_") + ".o")
        objects.append(obj)
        lines.append(f"build {q(obj)}: compile {q(src)}")
    lines.append(f"build {q(out)}: link {' '.join(q(o) for o in objects)}")
    path = os.path.join(build_dir, "build.ninja")
    os.makedirs(build_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def build(out: str = DEFAULT_OUT, archs: Sequence[str] = DEFAULT_ARCHS, build_dir: Optional[str] = None,
          jobs: Optional[int] = None, verbose: bool = True) -> float:
    """Compile and link the library at `out`; returns the seconds it took. Raises RuntimeError if it cannot."""
    reason = why_not_buildable()
    if reason:
        raise RuntimeError(f"cannot build {LIBRARY}: {reason}")
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda-" + "-".join(archs))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ninja_file = write_ninja(build_dir, os.path.abspath(out), find_nvcc(), archs)
    cmd = [find_ninja(), "-f", ninja_file, "-j", str(jobs or os.cpu_count() or 1)]
    if verbose:
        print(f"pyclipfast: building {out} for sm_{', sm_'.join(archs)} (+ PTX): {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building {LIBRARY} failed (ninja exit {result.returncode})"
                           + ("" if verbose else ":\n" + result.stdout[-4000:]))
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the library goes (default: %(default)s)")
    parser.add_argument("--archs", default=os.environ.get("PYCLIPFAST_CUDA_ARCHS", ",".join(DEFAULT_ARCHS)),
                        help="compute capabilities, e.g. 80,90 (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    args = parser.parse_args(argv)
    try:
        seconds = build(args.out, parse_archs(args.archs), jobs=args.jobs)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pyclipfast: built {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
