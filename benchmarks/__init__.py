"""pyclipfast's benchmark suite: every loss × implementation × size, against the hardware's limits.

Layout (Liger-Kernel style):

    ops/<loss>.py   one module per op: its minimum-work cost model, inputs, and implementations
                    (pyclipfast backends, peers, plain PyTorch baselines)
    registry.py     Op / Impl / Shape and the registry the op modules fill
    cases.py        one case → the timed step (forward + gradients)
    timing.py       CPU (perf_counter) and CUDA (events) timers, median and spread
    memory.py       peak extra memory: CUDA allocator stats; CPU peak RSS in subprocesses
    hardware.py     device, versions, measured ceilings (dense GEMM rate, copy bandwidth)
    maxbatch.py     largest N that fits (doubling, then bisection)
    suites.py       quick, full, cpu-acceptance and gpu-goals, and the goal checks
    runner.py       sweeps a suite and collects every figure
    report.py       derived figures, JSON, markdown; plots.py draws PNGs from the JSON

Run ``python -m benchmarks --help``; see benchmarks/README.md.
"""
