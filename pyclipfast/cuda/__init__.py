"""CUDA C++ backend: Python launchers for the kernels of libpyclipfast_cuda.so (csrc/).

The kernels are a C library (csrc/pyclipfast_c.h) with the CUDA runtime linked in statically:
no torch and no Python inside, so one build loads with any torch and any Python. `_library`
loads it with ctypes, `_kernels` checks every argument and passes raw pointers, sizes and
strides on torch's current stream, and one file per loss has exactly the functions and
signatures of ``pyclipfast/triton/<loss>.py``, so the autograd Functions of
``pyclipfast/<loss>.py`` run unchanged with ``backend="cuda"``.
Importing this package raises ImportError, saying why, when the library is not built or does not load.
"""
from . import _library

_library.load()
