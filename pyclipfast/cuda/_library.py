"""Loading libpyclipfast_cuda.so (csrc/, C interface in csrc/pyclipfast_c.h) with ctypes.

The library has a plain C interface and links the CUDA runtime statically, so one build
loads with any torch and any Python; ctypes (standard library) is all it takes. Each
launcher's C signature is declared once here, as (name, ctype) pairs in the order of the
C prototype: `call` passes the fields of a dict by those names, and in record mode the
library hands back the kernel parameters it built from them, under the same names.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading
from contextlib import contextmanager
from ctypes import c_float, c_int, c_int64, c_void_p
from functools import lru_cache
from typing import Dict, Iterator, List, Union

LIBRARY = "libpyclipfast_cuda.so"
ABI_VERSION = 3  # PCF_ABI_VERSION in csrc/pyclipfast_c.h
BUILD_HINT = ("build it with `python csrc/build.py` in a source checkout (nvcc and ninja needed), or install "
              "pyclipfast with PYCLIPFAST_BUILD_CUDA=1 where a CUDA toolkit is present")

_LAUNCH = [("device", c_int), ("stream", c_void_p)]
_SCORE = [("dtype", c_int), ("a", c_void_p), ("b", c_void_p), ("n_rows", c_int64), ("n_cols", c_int64),
          ("dim", c_int64), ("stride_am", c_int64), ("stride_ak", c_int64), ("stride_bn", c_int64),
          ("stride_bk", c_int64), ("tf32", c_int), ("scale", c_void_p), ("pos_mode", c_int),
          ("row_ids", c_void_p), ("col_ids", c_void_p)]
_TEACHER = [("ta", c_void_p), ("tb", c_void_p), ("teacher_dim", c_int64), ("stride_tam", c_int64),
            ("stride_tak", c_int64), ("stride_tbn", c_int64), ("stride_tbk", c_int64), ("teacher_scale", c_void_p)]
_OPTIONS = [("margin", c_float), ("filter", c_int), ("threshold", c_float), ("kd", c_int), ("angle_eps", c_float)]
_BLOCK = [("row0", c_int64), ("row1", c_int64), ("col0", c_int64), ("col1", c_int64)]
_GROUPS = [("row_groups", c_int), ("col_groups", c_int), ("row_blocks_per_group", c_int),
           ("col_blocks_per_group", c_int)]
_G_OUT = [("g_out", c_void_p), ("stride_gm", c_int64), ("stride_gn", c_int64)]
_PAIR_RULE = [("pair_rule", c_int), ("penalty", c_float)]

SIGNATURES = {
    "clip_forward": _LAUNCH + _SCORE + [(k, c_void_p) for k in ("row_max", "row_sum", "row_pos", "col_max",
                                                                "col_sum", "col_pos")] + _GROUPS
    + _PAIR_RULE + [("row_dot", c_void_p), ("col_dot", c_void_p)],
    "clip_grad": _LAUNCH + _SCORE + [(k, c_void_p) for k in ("row_lse", "col_lse", "g_row", "g_col", "g_row_pos",
                                                             "g_col_pos", "inv_norm")]
    + _G_OUT + [("dscale_part", c_void_p)] + _BLOCK + _PAIR_RULE,
    "siglip": _LAUNCH + _SCORE + [("bias", c_void_p)] + _G_OUT
    + [("loss_part", c_void_p), ("dscale_part", c_void_p), ("dbias_part", c_void_p)] + _BLOCK,
    "distill_forward": _LAUNCH + _SCORE + _TEACHER + _OPTIONS + [("row_part", c_void_p), ("col_part", c_void_p)]
    + _GROUPS,
    "distill_grad": _LAUNCH + _SCORE + _TEACHER + _OPTIONS
    + [("row_vec", c_void_p), ("col_vec", c_void_p), ("inv_norm", c_void_p)] + _G_OUT + [("dscale_part", c_void_p)]
    + _BLOCK,
    "cosine": _LAUNCH + [("dtype", c_int), ("online", c_void_p), ("target", c_void_p), ("n_rows", c_int64),
                         ("dim", c_int64), ("stride_pm", c_int64), ("stride_pk", c_int64), ("stride_zm", c_int64),
                         ("stride_zk", c_int64), ("cos", c_void_p), ("d_online", c_void_p), ("d_target", c_void_p),
                         ("grad_scale", c_float), ("eps", c_float)],
}
FLOAT_FIELDS = {name for sig in SIGNATURES.values() for name, ctype in sig if ctype is c_float}


def library_path() -> str:
    """$PYCLIPFAST_CUDA_LIBRARY, else the library installed beside this module."""
    return os.environ.get("PYCLIPFAST_CUDA_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     LIBRARY)


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """The loaded library with every launcher's signature declared; ImportError saying why not."""
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(f"the CUDA kernel library {path} is not built; {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as err:
        raise ImportError(f"the CUDA kernel library {path} does not load ({err}); {BUILD_HINT}") from err
    lib.pcf_abi_version.restype = c_int
    if lib.pcf_abi_version() != ABI_VERSION:
        raise ImportError(f"{path} has C interface version {lib.pcf_abi_version()}, this pyclipfast needs "
                          f"{ABI_VERSION}; {BUILD_HINT}")
    for fn in ("pcf_block_m", "pcf_block_n"):
        getattr(lib, fn).restype = c_int
    for fn in ("pcf_last_error", "pcf_last_record"):
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.pcf_set_record_only.argtypes = [c_int]
    lib.pcf_set_record_only.restype = None
    for name, signature in SIGNATURES.items():
        fn = getattr(lib, "pcf_" + name)
        fn.argtypes = [ctype for _, ctype in signature]
        fn.restype = c_int
    return lib


_state = threading.local()


def recording_calls() -> bool:
    """Whether this thread is inside `record_calls()` (nothing launches)."""
    return getattr(_state, "records", None) is not None


def call(fn: str, fields: Dict[str, Union[int, float, None]]) -> None:
    """Call pcf_<fn> with `fields` in the order of its C signature; RuntimeError with the library's message."""
    lib = load()
    args = [fields[name] for name, _ in SIGNATURES[fn]]
    if getattr(lib, "pcf_" + fn)(*args) != 0:
        raise RuntimeError(f"pyclipfast CUDA kernel failed: {lib.pcf_last_error().decode()}")
    if recording_calls():
        _state.records.append(parse_record(lib.pcf_last_record().decode()))


def parse_record(text: str) -> Dict[str, Union[int, float, str]]:
    record: Dict[str, Union[int, float, str]] = {}
    for line in text.splitlines():
        name, value = line.split("=", 1)
        record[name] = value if name == "fn" else _float32(value) if name in FLOAT_FIELDS else int(value)
    return record


def _float32(text: str) -> float:
    """The float the C side held (printed with 9 significant digits: exact for a float32)."""
    return struct.unpack("f", struct.pack("f", float(text)))[0]


@contextmanager
def record_calls() -> Iterator[List[Dict[str, Union[int, float, str]]]]:
    """Within it, launchers on this thread launch nothing: the library fills each kernel's parameters
    and hands them back; the list collects one dict per call (C field name -> value, pointers as ints)."""
    lib = load()
    _state.records = records = []
    lib.pcf_set_record_only(1)
    try:
        yield records
    finally:
        lib.pcf_set_record_only(0)
        _state.records = None
