"""The benchmark harness (benchmarks/): runs every registered op × available implementation at tiny
sizes, writes well-formed JSON / markdown / PNG, counts FLOPs and fractions of peak right, skips
what is missing cleanly, and measures memory in capped subprocesses. No timing assertions.

Torch runs single-threaded here: on the shared 2-core CI machine a 2-thread OpenMP region stalls for
~0.25 s whenever the other thread is descheduled, which would make tiny cases take seconds.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import registry
from benchmarks.__main__ import main as bench_main
from benchmarks.cases import CaseSpec, input_sets, make_step, value_of
from benchmarks.hardware import device_slug
from benchmarks.maxbatch import largest_batch
from benchmarks.memory import ProbeResult, ProbeWorker
from benchmarks.registry import Impl, Op, Shape
from benchmarks.report import derive_all, figures, markdown, was_busy
from benchmarks.suites import build_suite, find
from benchmarks.timing import Timing, time_interleaved_cpu

OPS = registry.discover()
TINY_N, TINY_D = 48, 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# End to end, everything but the interpreted Triton kernels (seconds each; the per-implementation
# test runs them through the same harness step).
E2E_IMPLS = ("pcf-torch", "reference", "open_clip", "torch-eager", "inf-cl", "siglip-kernel", "ghost-peer")


@pytest.fixture(autouse=True)
def single_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _cases():
    return [pytest.param(op_name, impl.name, id=f"{op_name}-{impl.name}")
            for op_name, op in sorted(OPS.items()) for impl in op.impls]


def _spec(op: str, impl: str, n: int = TINY_N, d: int = TINY_D) -> CaseSpec:
    return CaseSpec(op, impl, "cpu", "float32", n, d)


# ------------------------------------------------------------------ every op × implementation

@pytest.mark.parametrize("op_name, impl_name", _cases())
def test_every_implementation_runs_and_agrees(benchmark, op_name, impl_name):
    """The harness's step for each registered (op, implementation) runs at a tiny size under
    pytest-benchmark, and gives the same value as the op's reference implementation."""
    op = OPS[op_name]
    impl = op.impl(impl_name)
    if op.skip_reason():
        pytest.skip(op.skip_reason())
    spec = _spec(op_name, impl_name)
    reason = impl.skip_reason(spec.context())
    if reason:
        pytest.skip(f"not available here: {reason}")
    step = make_step(op, impl.make_call(spec.context()))
    inputs = input_sets(op, spec, 1)[0]
    out, grads = benchmark.pedantic(step, args=(inputs,), rounds=1, iterations=1)
    value = value_of(out)
    assert math.isfinite(value)
    if op.mode == "fwd+bwd":
        assert len(grads) == len(inputs.grad_names) and all(torch.isfinite(g).all() for g in grads)
    other = _computed_another_way(op, impl_name, spec)
    ref_value = value_of(make_step(op, other.make_call(spec.context()))(inputs)[0])
    assert value == pytest.approx(ref_value, rel=1e-4, abs=1e-5), f"{impl_name} vs {other.name}"


def _computed_another_way(op, impl_name: str, spec: CaseSpec):
    """The implementation a value is checked against: the materialised reference, or for the
    reference itself a peer or plain-PyTorch baseline (open_clip, torch-eager), or failing those
    pyclipfast's chunked backend. Never the implementation itself; compiled variants are left out."""
    names = ["reference", *(i.name for i in op.impls if i.kind != "pyclipfast"), "pcf-torch"]
    for name in names:
        if name != impl_name and not name.endswith("-compile") and name in {i.name for i in op.impls}:
            impl = op.impl(name)
            if not impl.skip_reason(spec.context()):
                return impl
    raise AssertionError(f"no second implementation of {op.name} to check {impl_name} against")


def test_registry_covers_the_public_losses():
    import pyclipfast

    assert {"clip", "siglip"} <= set(OPS)
    for name, op in OPS.items():
        assert op.flops(Shape(8, 4)) >= 0 and op.min_bytes(Shape(8, 4), 4) > 0
        assert (op.skip_reason() is None) == hasattr(pyclipfast, op.api), name
        assert len({i.name for i in op.impls}) == len(op.impls), f"duplicate implementation names in {name}"


# ------------------------------------------------------------------ cost model and figures

def test_flop_and_byte_counts_follow_the_spec():
    s = Shape(n=1000, d=64, m=500, dt=32)
    assert OPS["clip"].flops(s) == 8 * 1000 * 500 * 64
    assert OPS["siglip"].flops(s) == 6 * 1000 * 500 * 64
    assert OPS["clip"].min_bytes(s, 2) == 2 * (1000 + 500) * 64 * 2  # read A, B; write dA, dB
    if "distill" in OPS:
        assert OPS["distill"].flops(s) == 8 * 1000 * 500 * 64 + 4 * 1000 * 500 * 32
    if "cosine" in OPS:
        assert OPS["cosine"].flops(s) == 0 and OPS["cosine"].min_bytes(s, 4) == 3 * 1000 * 64 * 4
    if "recall" in OPS:
        assert OPS["recall"].flops(s) == 2 * 1000 * 500 * 64


def test_fraction_of_peak_arithmetic():
    f = figures(flops=8e12, nbytes=4e9, median_ms=1000.0, gemm_tflops=16.0, copy_gbps=10.0)
    assert f["tflops"] == pytest.approx(8.0) and f["frac_gemm"] == pytest.approx(0.5)
    assert f["gbps"] == pytest.approx(4.0) and f["frac_copy"] == pytest.approx(0.4)
    assert f["floor_ms"] == pytest.approx(500.0) and f["frac_floor"] == pytest.approx(0.5)
    assert f["bound"] == "compute"
    mem = figures(flops=0.0, nbytes=3e9, median_ms=2.0, gemm_tflops=16.0, copy_gbps=3000.0)
    assert mem["tflops"] is None and mem["bound"] == "memory"
    assert mem["frac_copy"] == pytest.approx(3e9 / 2e-3 / 1e9 / 3000.0)


def test_derived_figures_and_baseline_ratios():
    def result(impl, ms, peak):
        return {"op": "clip", "impl": impl, "dtype": "float32", "n": 1024, "m": 1024, "d": 128, "dt": None,
                "status": "ok", "time": {"median_ms": ms}, "memory": {"peak_extra_bytes": peak}}

    record = {"ceilings": {"gemm": {"float32": {"tflops": 1.0}}, "copy": {"gbps": 10.0}},
              "results": [result("open_clip", 10.0, 4000), result("pcf-torch", 2.5, 100)]}
    derive_all(record, OPS)
    mine = record["results"][1]
    assert mine["flops"] == 8 * 1024 * 1024 * 128
    assert mine["tflops"] == pytest.approx(mine["flops"] / 2.5e-3 / 1e12)
    assert mine["frac_gemm"] == pytest.approx(mine["tflops"] / 1.0)
    assert mine["baseline"] == "open_clip"
    assert mine["time_vs_baseline"] == pytest.approx(0.25) and mine["mem_vs_baseline"] == pytest.approx(0.025)


def test_machine_slug_and_busy_flag():
    assert device_slug({"device": "cpu", "cpu_cores": 2}) == "cpu-2core"
    assert device_slug({"device": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "h100-sxm"
    assert device_slug({"device": "cuda", "name": "NVIDIA GH200 480GB"}) == "gh200"
    cpu = {"device": "cpu", "cpu_cores": 2, "load_average": [0.5, 0.5, 0.5]}
    assert not was_busy(cpu, [1.0, 1.0, 1.0]) and was_busy(cpu, [7.5, 5.0, 3.0])


def test_timing_summary_statistics():
    t = Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], warmup_calls=1, method="test")
    assert (t.median_ms, t.min_ms, t.max_ms, t.reps) == (3.0, 1.0, 5.0, 5)
    assert (t.q1_ms, t.q3_ms) == (2.0, 4.0) and t.iqr_ms == 2.0


def test_interleaved_timing_takes_turns():
    calls = []
    steps = {name: (lambda inputs, name=name: calls.append((name, inputs))) for name in ("a", "b")}
    timings = time_interleaved_cpu(steps, {"a": ["a0", "a1"], "b": ["b0"]}, budget_s=0.0, min_reps=3, max_reps=3)
    assert calls[:2] == [("a", "a0"), ("b", "b0")]  # the discarded first calls
    assert [name for name, _ in calls[2:]] == ["a", "b", "b", "a", "a", "b"]  # the order rotates each round
    assert [inputs for name, inputs in calls[2:] if name == "a"] == ["a0", "a1", "a0"]  # input sets rotate
    assert timings["a"].reps == timings["b"].reps == 3 and "interleaved" in timings["a"].method


# ------------------------------------------------------------------ largest batch

def _fake_probe(fits_up_to: int, seconds_per_n2: float = 1e-9):
    def probe(n: int) -> ProbeResult:
        if n > fits_up_to:
            return ProbeResult("oom", message="out of memory")
        return ProbeResult("ok", peak_extra_bytes=n, elapsed_s=seconds_per_n2 * n * n)
    return probe


def test_largest_batch_doubles_then_bisects():
    found = largest_batch(_fake_probe(5000), lambda n: n * n, start=1024, max_n=2**20, trial_budget_s=60)
    assert [t.n for t in found.trials] == [1024, 2048, 4096, 8192, 6144, 5120]
    assert (found.largest_ok, found.smallest_failed) == (4096, 5120)
    assert found.stop_reason.startswith("memory")


def test_largest_batch_halves_when_the_start_does_not_fit_and_respects_the_time_budget():
    found = largest_batch(_fake_probe(3000), lambda n: n * n, start=8192, max_n=2**20, trial_budget_s=60)
    assert [t.n for t in found.trials] == [8192, 4096, 2048, 3072, 2560]
    assert (found.largest_ok, found.smallest_failed) == (2560, 3072)
    slow = largest_batch(_fake_probe(10**9, seconds_per_n2=1e-6), lambda n: n * n, start=1024, max_n=2**30,
                         trial_budget_s=20)
    assert slow.smallest_failed is None and slow.largest_ok == 4096 and slow.stop_reason.startswith("time budget")


# ------------------------------------------------------------------ CPU memory probes in subprocesses

def test_cpu_memory_probes_are_capped_and_isolated(monkeypatch):
    """A materialised loss over the cap fails its allocation ("over-cap"); the chunked one fits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cap = 48 * 2**20
    with ProbeWorker(cap, isolation="batch", timeout_s=300) as worker:
        small = worker.probe(_spec("clip", "reference", n=1024))
        over = worker.probe(_spec("clip", "reference", n=4096))
        chunked = worker.probe(_spec("clip", "pcf-torch", n=4096))
    assert small.ok and small.peak_extra_bytes >= 1024 * 1024 * 4  # at least the N×N float32 logits
    assert over.status == "over-cap" and "allocate" in over.message
    assert chunked.ok and chunked.peak_extra_bytes < cap and math.isfinite(chunked.value)
    fresh = ProbeWorker(None, isolation="case", timeout_s=300)
    assert fresh.probe(_spec("siglip", "pcf-torch")).ok and fresh.proc is None  # one process per case


# ------------------------------------------------------------------ end to end, through the CLI

@pytest.fixture
def fake_entries(monkeypatch):
    """A peer that is not installed, and a loss pyclipfast does not export: both must be skipped."""
    clip = OPS["clip"]
    ghost = Impl("ghost-peer", "peer", lambda ctx: None, requires=("pyclipfast_no_such_peer",))
    monkeypatch.setattr(clip, "impls", [*clip.impls, ghost])
    missing = Op("ghost_loss", "a loss not in pyclipfast", "ghost_loss", lambda s: 1.0, lambda s, e: 1.0,
                 OPS["clip"].make_inputs, impls=[])
    monkeypatch.setitem(registry._OPS, "ghost_loss", missing)


def test_quick_suite_end_to_end_writes_results(benchmark, tmp_path, fake_entries):
    args = ["run", "--suite", "quick", "--device", "cpu", "--n", str(TINY_N), "--d", str(TINY_D),
            "--impls", ",".join(E2E_IMPLS), "--reps", "2", "--gemm-size", "128", "--copy-mb", "8",
            "--mem-isolation", "batch", "--no-max-batch", "--threads", "1",
            "--out", str(tmp_path), "--name", "tiny", "--note", "pytest"]
    assert benchmark.pedantic(bench_main, args=(args,), rounds=1, iterations=1) == 0

    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["machine"]["device"] == "cpu" and record["machine"]["cpu_cores"] >= 1
    assert record["versions"]["torch"] == torch.__version__ and "git_commit" in record["versions"]
    assert record["ceilings"]["gemm"]["float32"]["tflops"] > 0 and record["ceilings"]["copy"]["gbps"] > 0
    assert record["command"].startswith("python -m benchmarks") and record["note"] == "pytest"
    _check_every_available_case_ran(record)
    skipped = {(s["op"], s["impl"]): s["reason"] for s in record["skipped"]}
    assert skipped[("clip", "ghost-peer")] == "pyclipfast_no_such_peer is not installed"
    assert "does not exist" in skipped[("ghost_loss", "*")]

    text = (tmp_path / "tiny.md").read_text()
    assert text == markdown(record) and "## clip · float32 · D=16" in text and "ghost-peer" in text
    for op in record["ops_run"]:
        png = tmp_path / f"tiny-{op}-float32.png"
        assert png.read_bytes()[:8] == PNG_MAGIC

    replot = tmp_path / "replot"
    assert bench_main(["plot", str(tmp_path / "tiny.json"), "--out", str(replot)]) == 0
    assert sorted(p.name for p in replot.glob("*.png")) == sorted(p.name for p in tmp_path.glob("tiny-*.png"))


def _check_every_available_case_ran(record: dict) -> None:
    for name, op in OPS.items():
        if op.skip_reason():
            continue
        for impl in (i for i in op.impls if i.name in E2E_IMPLS):
            spec = _spec(name, impl.name)
            r = find(record, name, impl.name, TINY_N, TINY_D, "float32")
            if impl.skip_reason(spec.context()):
                assert r is None
                continue
            assert r is not None and r["status"] == "ok", (name, impl.name, r and r["message"])
            assert r["time"]["reps"] == 2 and r["memory"]["peak_extra_bytes"] is not None
            assert r["min_bytes"] > 0 and r["frac_copy"] is not None


# ------------------------------------------------------------------ goals

def test_cpu_acceptance_goals_pass_fail_and_not_evaluated():
    suite = build_suite("cpu-acceptance", "cpu")

    def case(impl, n, d, ms, peak, status="ok"):
        return {"op": "clip", "impl": impl, "n": n, "d": d, "dtype": "float32", "status": status, "message": "",
                "time": {"median_ms": ms, "reps": 3}, "memory": {"peak_extra_bytes": peak}}

    record = {"results": [case("pcf-torch", 8192, 256, 1000.0, 20e6), case("open_clip", 8192, 256, 3000.0, 1e9),
                          case("pcf-torch", 65536, 128, 60e3, 80e6),
                          case("open_clip", 65536, 128, None, None, status="over-cap")]}
    verdicts = {g.name: g.check(record)["passed"] for g in suite.goals}
    assert verdicts == {"cpu-time": True, "cpu-memory": True, "cpu-65k": True}
    record["results"][0]["time"]["median_ms"] = 2000.0
    assert suite.goals[0].check(record)["passed"] is False
    assert suite.goals[0].check({"results": []})["passed"] is None


def test_gpu_goals_suite_is_cuda_only_and_cpu_suites_exist():
    assert build_suite("gpu-goals", "cuda").cuda_only
    for name in ("quick", "full", "cpu-acceptance"):
        assert build_suite(name, "cpu").sweeps
    with pytest.raises(ValueError):
        build_suite("nope", "cpu")


def test_score_spread_benchmark_runs_and_writes(tmp_path, monkeypatch):
    """A tiny run of benchmarks/bench_score_spread.py: every loss × features × implementation, the
    trained features deep below float32's exp range and the random ones not; the floor restored."""
    import json
    import sys

    from benchmarks import bench_score_spread
    from pyclipfast.chunked import _tiles

    monkeypatch.setattr(sys, "argv", ["bench_score_spread", "--n", "48", "--d", "16", "--repeat", "1",
                                      "--out", str(tmp_path)])
    bench_score_spread.main()
    record = json.loads((tmp_path / "score-spread.json").read_text())
    rows = record["rows"]
    assert {(r["loss"], r["regime"], r["implementation"]) for r in rows} == {
        (loss, regime, impl) for loss in ("clip", "siglip", "distill") for regime in ("random", "trained")
        for impl in ("open_clip", "pyclipfast", "pyclipfast, no floor")}
    deep = {r["regime"]: r["deep_fraction"] for r in rows}
    assert deep["random"] == 0 and deep["trained"] > 0.5
    assert all(r["seconds"] > 0 for r in rows)
    assert _tiles.EXP_FLOOR == -64.0
    table = (tmp_path / "score-spread.md").read_text()
    assert "--n 48 --d 16 --repeat 1" in table and table.count("| clip |") == 6
