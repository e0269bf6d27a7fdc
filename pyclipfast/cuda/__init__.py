"""CUDA C++ backend: Python launchers for the kernels of the compiled extension pyclipfast._C (csrc/).

One file per loss with exactly the functions and signatures of ``pyclipfast/triton/<loss>.py``,
so the autograd Functions of ``pyclipfast/<loss>.py`` run unchanged with ``backend="cuda"``.
Importing this package raises ImportError when the extension is not built.
"""
try:
    from .. import _C  # noqa: F401
except ImportError as err:  # the message says how to rebuild; _dispatch reports it for backend="cuda"
    raise ImportError(
        "pyclipfast.cuda needs the compiled extension pyclipfast._C, which is not built or does not load "
        f"({err}); rebuild with: CUDA_HOME=/usr/local/cuda PYCLIPFAST_BUILD_CUDA=1 "
        "pip install --no-build-isolation -e ."
    ) from err
