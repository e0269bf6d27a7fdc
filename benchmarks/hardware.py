"""The machine a run happens on: what it is, what software, and its measured ceilings.

Ceilings are measured in the same run, on the same device, at its start and
at its end; the better of the two is used (on a shared machine a ceiling taken
during a burst of load would understate the hardware), so fractions of peak
compare like with like:

    dense GEMM rate   torch.mm of two random square matrices in the case's dtype
                      (2·S³ FLOPs per call; S = 8192 on CUDA, 2048 on the CPU)
    copy bandwidth    dst.copy_(src) of a large buffer, counting bytes read + written
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .timing import Timing, time_cpu, time_cuda

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_DISTRIBUTIONS = {"open_clip": "open_clip_torch", "inf_cl": "inf-cl", "siglip_kernel": "siglip-kernel"}
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}


def machine_info(device: str) -> dict:
    """Device name and size, plus the load on a CPU machine (it may be shared)."""
    info = {"device": device, "hostname": platform.node(), "platform": platform.platform()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info.update(cpu_model=_cpu_model(), cpu_cores=cores, torch_threads=torch.get_num_threads(),
                memory_bytes=_total_memory(), load_average=list(os.getloadavg()))
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                    l2_cache_bytes=getattr(p, "L2_cache_size", None), capability=f"{p.major}.{p.minor}",
                    driver=_nvidia_smi("driver_version"), clocks=_nvidia_smi("clocks.sm,clocks.max.sm"))
    else:
        info["name"] = info["cpu_model"]
    return info


def device_slug(info: dict) -> str:
    """Folder name for a machine's results: 'cpu-2core', 'h100-sxm', 'h200', ..."""
    if info["device"] == "cpu":
        return f"cpu-{info['cpu_cores']}core"
    name = info["name"].lower()
    for chip in ("gh200", "h100", "h200", "h800", "a100", "b200", "l40s", "l4"):
        if chip in name:
            if chip in ("h100", "a100"):
                form = "pcie" if "pcie" in name else "nvl" if "nvl" in name else "sxm"
                return f"{chip}-{form}"
            return chip
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def versions() -> dict:
    """Python, torch, triton, numpy, the peers and pyclipfast's commit (with uncommitted files listed)."""
    import numpy

    import pyclipfast

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__, "triton": _dist_version("triton"), "pyclipfast": pyclipfast.__version__}
    out["peers"] = {module: _dist_version(dist) for module, dist in PEER_DISTRIBUTIONS.items()}
    out["git_commit"] = _git("rev-parse", "HEAD").strip()
    dirty = _git("status", "--porcelain", "--", "pyclipfast", "csrc", "benchmarks", ":!benchmarks/results")
    out["git_uncommitted"] = [line[3:] for line in dirty.splitlines() if len(line) > 3]
    return out


def measure_ceilings(device: str, dtypes: List[torch.dtype], *, gemm_size: Optional[int] = None,
                     copy_bytes: Optional[int] = None) -> dict:
    """Dense GEMM rate per dtype and copy bandwidth, measured now on `device`."""
    size = gemm_size or GEMM_SIZE[device]
    gemm: Dict[str, dict] = {}
    for dtype in dtypes:
        t = _time_gemm(device, dtype, size)
        gemm[_name(dtype)] = {"tflops": 2.0 * size**3 / (t.median_ms * 1e-3) / 1e12, "size": size,
                              "timing": t.to_dict()}
    nbytes = copy_bytes or COPY_BYTES[device]
    t = _time_copy(device, nbytes)
    copy = {"gbps": 2.0 * nbytes / (t.median_ms * 1e-3) / 1e9, "bytes_per_call": 2 * nbytes, "timing": t.to_dict()}
    return {"gemm": gemm, "copy": copy,
            "tf32": bool(device == "cuda" and torch.backends.cuda.matmul.allow_tf32)}


def best_ceilings(first: dict, second: dict) -> dict:
    """Per dtype and for the copy, the measurement with the higher rate (each keeps its timing)."""
    gemm = {k: max(first["gemm"][k], second["gemm"][k], key=lambda g: g["tflops"]) for k in first["gemm"]}
    copy = max(first["copy"], second["copy"], key=lambda c: c["gbps"])
    return {"gemm": gemm, "copy": copy, "tf32": first["tf32"], "rule": "best of the start and end measurements"}


def _time_gemm(device: str, dtype: torch.dtype, size: int) -> Timing:
    gen = torch.Generator(device=device).manual_seed(1234)
    pairs = [(torch.randn(size, size, generator=gen, device=device).to(dtype),
              torch.randn(size, size, generator=gen, device=device).to(dtype)) for _ in range(2)]
    step = lambda ab: torch.mm(*ab)  # noqa: E731
    return time_cuda(step, pairs) if device == "cuda" else time_cpu(step, pairs, budget_s=2.0, min_reps=5)


def _time_copy(device: str, nbytes: int) -> Timing:
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    step = lambda _: dst.copy_(src)  # noqa: E731
    return time_cuda(step, [None]) if device == "cuda" else time_cpu(step, [None], budget_s=1.0, min_reps=5)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _total_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _nvidia_smi(fields: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""
