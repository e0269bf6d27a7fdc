"""The reference trainer: it learns, resumes exactly, writes atomically, and fails clearly."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from pyclipfast.train import UsageError, train
from pyclipfast.train.__main__ import main
from pyclipfast.train.batches import EpochBatches
from pyclipfast.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from pyclipfast.train.config import parse_args
from pyclipfast.train.metrics import read_metrics, without_timing
from train_helpers import micro, run_on_ranks, write_images


pytestmark = pytest.mark.usefixtures("real_tiles")


# ---------------------------------------------------------------------------------------------- learning

def test_short_run_learns(tmp_path, capsys):
    """Loss falls and val recall@1 ends far above chance; the CLI prints the before/after table."""
    out = tmp_path / "learn"
    main(["--model", "pcf-micro-32", "--device", "cpu", "--train-size", "2048", "--val-size", "128",
          "--batch-size", "128", "--chunk-size", "64", "--steps", "40", "--lr", "2e-3", "--warmup", "10",
          "--output-dir", str(out), "--no-progress", "--compare-memory", "--seed", "1"])
    printed = capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(losses) == 40 and [e["step"] for e in evals] == [0, 40]
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    chance = 1 / 128
    before, after = evals
    for direction in ("i2t", "t2i"):
        assert after[f"val/{direction}_R@1"] > 5 * chance
        assert after[f"val/{direction}_R@1"] > 2 * before[f"val/{direction}_R@1"]
    assert after["zeroshot/colour"] > 0.3  # chance 1/8
    for line in ("recall@1 image→text", "probe: swapped attributes", "zero-shot colour+shape",
                 "loss peak memory", "open_clip", "metrics:", "plots:", "checkpoint:"):
        assert line in printed
    assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- resume

def test_resume_follows_the_uninterrupted_trajectory(tmp_path):
    """Stop at step 3 (mid-epoch), resume, and every metric and parameter equals the uninterrupted run.

    Patch dropout makes the step random and sentence sampling makes the captions depend on the
    epoch, so the RNG states, the data order and the epoch must all be restored.
    """
    config = tmp_path / "micro-dropout.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                       "patch_dropout": 0.5},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    common = dict(model=str(config), train_size=160, val_size=64, batch_size=64, chunk_size=32, steps=7,
                  caption="sentences", eval_every=3, save_every=2)
    whole = train(micro(tmp_path / "whole", **common))
    train(micro(tmp_path / "split", stop_at=3, **common))
    resumed = train(micro(tmp_path / "split", resume="auto", **common))

    expected = without_timing(read_metrics(whole.metrics_path))
    assert [r["step"] for r in expected if r["kind"] == "train"] == list(range(1, 8))
    assert {r["epoch"] for r in expected if r["kind"] == "train"} == {0, 1, 2, 3}  # 2 batches an epoch: the run crosses epochs
    assert without_timing(read_metrics(resumed.metrics_path)) == expected
    final_whole = load_checkpoint(whole.checkpoint, torch.device("cpu"))["model"]
    final_resumed = load_checkpoint(resumed.checkpoint, torch.device("cpu"))["model"]
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_resume_refuses_a_different_trajectory(tmp_path):
    train(micro(tmp_path, steps=1))
    with pytest.raises(UsageError, match="--batch-size"):
        train(micro(tmp_path, steps=3, batch_size=32, resume="auto"))


def test_two_processes_take_the_single_process_steps(tmp_path):
    """torch.distributed (gloo): 2 ranks × 32 pairs follow the 1 × 64 trajectory (same global batches).

    Gradients match up to summation order. Adam turns the pure rounding noise of gradients that
    are exactly zero in exact arithmetic (the attention key biases) into lr-sized steps; a
    large epsilon keeps that noise from looking like a difference.
    """
    settings = dict(steps=2, eps=1e-3)
    single = train(micro(tmp_path / "one", **settings))
    assert run_on_ranks(micro(tmp_path / "two", **settings), 2) == []
    one = load_checkpoint(single.checkpoint, torch.device("cpu"))["model"]
    two = load_checkpoint(tmp_path / "two" / "run" / "checkpoint.pt", torch.device("cpu"))["model"]
    for name, tensor in one.items():
        assert torch.allclose(two[name], tensor, rtol=1e-5, atol=1e-7), name
    losses = [[r["loss"] for r in read_metrics(path) if r["kind"] == "train"]
              for path in (single.metrics_path, tmp_path / "two" / "run" / "metrics.jsonl")]
    assert np.allclose(losses[0], losses[1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous checkpoint")

    def fail_midway(file):
        file.write(b"half of a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_midway)
    assert path.read_bytes() == b"previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # the temporary file is gone too


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    from pyclipfast.train.checkpoint import Progress

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, progress=Progress(step=1),
                    config={})
    real_save = torch.save

    def interrupted_save(obj, file):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # e.g. Ctrl-C or a job scheduler's signal mid-write

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, progress=Progress(step=2),
                        config={})
    assert load_checkpoint(path, torch.device("cpu"))["progress"]["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UsageError, match="--resume.*not a readable"):
        load_checkpoint(path, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- data

def test_epoch_batches_shard_disjointly_and_resume_in_place():
    full = list(EpochBatches(100, 20, seed=3, epoch=1))
    assert len(full) == 5 and all(len(b) == 20 for b in full)
    assert len({i for b in full for i in b}) == 100
    shards = [list(EpochBatches(100, 20, seed=3, epoch=1, rank=r, world_size=4)) for r in range(4)]
    for k, batch in enumerate(full):
        assert [i for shard in shards for i in shard[k]] == batch  # rank order is batch order
    assert list(EpochBatches(100, 20, seed=3, epoch=1, start=2)) == full[2:]
    assert list(EpochBatches(100, 20, seed=3, epoch=2)) != full


def test_csv_with_a_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    paths = write_images(tmp_path / "images", 12, corrupt={5})
    csv = tmp_path / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"images/{p.name}\ta grey square number {i}\n"
                                                  for i, p in enumerate(paths)))
    out = tmp_path / "run"
    main(["--model", "pcf-micro-32", "--device", "cpu", "--train-data", str(csv), "--batch-size", "12",
          "--steps", "2", "--output-dir", str(out), "--no-progress", "--no-plots", "--lr", "1e-3"])
    printed = capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # no synthetic evaluation with real data
    assert records[-1]["skipped"] == 2  # the corrupt row, once per epoch
    assert "skipped 2 unreadable sample(s)" in printed


def test_webdataset_shards_with_a_corrupt_member(tmp_path):
    paths = write_images(tmp_path / "images", 16, corrupt={3})
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * 8, shard * 8 + 8):
                for name, data in ((f"{i:04d}.png", paths[i].read_bytes()), (f"{i:04d}.txt", b"a grey square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    result = train(micro(tmp_path, train_data=str(tmp_path / "shard-{0..1}.tar"), batch_size=5, chunk_size=None,
                         steps=3))
    assert result.step == 3 and result.skipped >= 1


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--chunk-size", "-4"], "--chunk-size"),
    (["--loss", "triplet"], "--loss"),
    (["--steps", "10", "--stop-at", "11"], "--stop-at"),
    (["--lr", "-1"], "--lr"),
    (["--dataset-type", "csv"], "--dataset-type"),
    (["--caption", "detailed", "--train-data", "x.csv"], "--caption"),
])
def test_bad_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--model", "no-such-model"], "--model"),
    (["--model", "missing.json"], "--model"),
    (["--train-data", "missing.csv"], "--train-data"),
    (["--batch-size", "4096", "--train-size", "100"], "--batch-size"),
    (["--resume", "missing/checkpoint.pt"], "--resume"),
])
def test_unusable_settings_exit_naming_the_flag(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "pcf-micro-32", "--device", "cpu", "--output-dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_csv_missing_column_names_the_flag(tmp_path, capsys):
    csv = tmp_path / "train.csv"
    csv.write_text("path\tcaption\nimage.png\ta cat\n")
    with pytest.raises(SystemExit):
        main(["--model", "pcf-micro-32", "--device", "cpu", "--train-data", str(csv), "--output-dir",
              str(tmp_path)])
    assert "--csv-img-key" in capsys.readouterr().err
