"""One module per benchmarked op (Liger-style: benchmark scripts mirror the loss names).

Each module builds an `Op` with its implementations and calls `registry.register`;
`registry.discover()` imports every module here whose name does not start with "_".
Run one op alone with ``python -m benchmarks.ops.<name> [run options]``.
"""
