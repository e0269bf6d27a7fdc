"""A CachedMultipleNegativesRankingLoss training step: pyclipfast's drop-in vs sentence-transformers'.

The model is a tiny BERT with random weights built on disk (nothing is downloaded); the batch
holds (anchor, positive, negative_1..k) tuples of random words. Each implementation and batch size
runs in a fresh process: the model and the tokenized batch are built, the peak-RSS counter is reset
(``5 > /proc/self/clear_refs``), then one warm-up step and ``--repeat`` timed steps
(forward + backward of the loss, which re-embeds the mini-batches) run, on one thread; the time is
the process's CPU time (and wall time), the extra peak memory VmHWM minus the RSS before the steps.

    python -m benchmarks.bench_sentence_transformers                           # batch 4096 and 16384, 3 negatives
    python -m benchmarks.bench_sentence_transformers --batch 1024 --repeat 1
    python -m benchmarks.bench_sentence_transformers --out benchmarks/results/cpu-2core   # + st-cmnrl.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("pyclipfast", "sentence-transformers")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{k}" for k in range(200)]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")   # any other lowercase text, piece by piece


def tiny_model(path: str, *, hidden: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.0, seed: int = 0):
    """A SentenceTransformer (BERT + mean pooling) with random weights, saved under `path`.

    Dropout is 0 by default, so two runs of the same batch give the same embeddings. The WordPiece vocabulary
    holds ``WORDS`` and single characters (word-initial and ``##`` continuations), so any lowercase
    ASCII text gets distinct tokens.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL_TOKENS + WORDS + CHARACTERS + ["##" + c for c in CHARACTERS]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(WORDS) + 2 * len(CHARACTERS), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    BertTokenizerFast(vocab=vocab).save_pretrained(path)  # transformers 5 ignores vocab_file=
    transformer = Transformer(path, max_seq_length=32)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def random_texts(rng: random.Random, count: int, low: int = 2, high: int = 8) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.impl == "pyclipfast":
        from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss
    else:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(tmp, hidden=args.hidden)
    rng = random.Random(0)
    columns = [random_texts(rng, args.batch) for _ in range(2 + args.negatives)]
    features = [model.preprocess(texts) for texts in columns]
    labels = torch.zeros(args.batch, dtype=torch.long)
    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], labels)
        loss.backward()
        return float(loss)

    Path("/proc/self/clear_refs").write_text("5")
    base_kib = _status_kib("VmRSS")
    loss = step()                                            # warm-up (allocator, first calls)
    times, cpu_times = [], []
    for _ in range(args.repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"impl": args.impl, "batch": args.batch, "negatives": args.negatives, "hidden": args.hidden,
            "mini_batch_size": args.mini_batch, "loss": loss, "seconds": min(times), "all_seconds": times,
            "cpu_seconds": min(cpu_times), "all_cpu_seconds": cpu_times,
            "extra_peak_mib": (_status_kib("VmHWM") - base_kib) / 1024,
            "threads": torch.get_num_threads()}


def _run_isolated(argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_sentence_transformers", "--worker", *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _markdown(record: dict) -> str:
    rows = ["| batch | implementation | step CPU time (s) | step wall time (s) | extra peak memory (MiB) | loss |",
            "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in record["results"]:
        rows.append(f"| {r['batch']:,} | {r['impl']} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} | "
                    f"{r['extra_peak_mib']:,.0f} | {r['loss']:.5f} |")
    by = {(r["batch"], r["impl"]): r for r in record["results"]}
    ratios = []
    for batch in sorted({r["batch"] for r in record["results"]}):
        ours, theirs = by.get((batch, IMPLEMENTATIONS[0])), by.get((batch, IMPLEMENTATIONS[1]))
        if ours and theirs:
            ratios.append(f"- batch {batch:,}: CPU time {ours['cpu_seconds'] / theirs['cpu_seconds']:.2f}×, "
                          f"extra peak memory {ours['extra_peak_mib'] / theirs['extra_peak_mib']:.1%} "
                          "of sentence-transformers'")
    return "\n".join([
        "# CachedMultipleNegativesRankingLoss training step, CPU",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Machine: {record['machine']['cpu_model']}, {record['machine']['cpu_cores']} cores "
        f"(the 2-core CPU development VM); load average before / after: {record['load_before']} / "
        f"{record['load_after']} (the machine is shared). torch {record['torch']}, "
        f"sentence-transformers {record['sentence_transformers']}, {record['threads']} thread{'s' if record['threads'] != 1 else ''}.",
        "",
        f"Tiny BERT (hidden {record['hidden']}, 2 layers, random weights), {record['negatives']} hard negatives per "
        f"anchor, mini_batch_size {record['mini_batch_size']}, fp32. Time: fastest of {record['repeat']} step(s) "
        "after a warm-up (forward + backward, the cached re-embedding included); the CPU time of the process "
        "(one thread) is the figure to compare, the wall time grows with the other load on the machine. "
        "Memory: peak RSS of the process over the steps minus its RSS before them.",
        "",
        *rows,
        "",
        *ratios,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sentence_transformers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    p.add_argument("--negatives", type=int, default=3)
    p.add_argument("--mini-batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads only contend)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS))
    p.add_argument("--out", type=Path, default=None, help="folder for st-cmnrl.json and st-cmnrl.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.batch = args.batch[0]
        print(json.dumps(worker(args)))
        return 0

    import torch
    import sentence_transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import hardware

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for batch in args.batch:
        for impl in args.impls:
            common = ["--batch", str(batch), "--negatives", str(args.negatives), "--mini-batch",
                      str(args.mini_batch), "--hidden", str(args.hidden), "--repeat", str(args.repeat),
                      "--threads", str(args.threads)]
            r = _run_isolated(common + ["--impl", impl])
            print(f"batch {batch:>6} {impl:<22} {r['cpu_seconds']:8.2f} s CPU {r['seconds']:8.2f} s wall "
                  f"{r['extra_peak_mib']:9.0f} MiB  "
                  f"loss {r['loss']:.5f}", flush=True)
            results.append(r)
    record = {
        "command": "python -m benchmarks.bench_sentence_transformers " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": hardware.machine_info("cpu"),
        "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
        "threads": results[0]["threads"] if results else None, "hidden": args.hidden,
        "negatives": args.negatives, "mini_batch_size": args.mini_batch, "repeat": args.repeat,
        "results": results,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "st-cmnrl.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "st-cmnrl.md").write_text(_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
