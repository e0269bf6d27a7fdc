"""The trainer as open_clip users run it: DataLoader workers, open_clip CSVs and weights, clear early errors."""
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import time
from types import MappingProxyType

import numpy as np
import open_clip
import pytest
import torch

import pyclipfast.train.loop as loop
from pyclipfast.train import UsageError, train
from pyclipfast.train.batches import SyntheticCollate
from pyclipfast.train.data import SyntheticClipDataset
from pyclipfast.train.checkpoint import load_checkpoint
from pyclipfast.train.metrics import read_metrics
from pyclipfast.train.model import create_model, register_configs

from train_helpers import micro, run_on_ranks, write_images, write_shards

pytestmark = pytest.mark.usefixtures("real_tiles")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM after `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------- workers

def test_workers_train_on_the_built_in_data(tmp_path, monkeypatch, capsys):
    """Also: progress in a log (stderr is no terminal here) is plain lines, one per PROGRESS_SECONDS."""
    monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)
    with deadline(120):
        result = train(micro(tmp_path, workers=2, steps=2, train_size=128, batch_size=32, progress=True))
    assert result.step == 2
    records = [r for r in read_metrics(result.metrics_path) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup 2: the first step's own rate, not the next one's
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err
    assert re.findall(r"train: step (\d)/2 \(\d+%\), \d+ s, loss \d\.\d{4}", printed.out) == ["1", "2"]


def test_workers_read_webdataset_shards(tmp_path):
    write_shards(tmp_path, shards=2, per_shard=8)
    with deadline(120):
        result = train(micro(tmp_path, train_data=str(tmp_path / "shard-{0..1}.tar"), batch_size=4, chunk_size=None,
                             steps=3, workers=2))
    assert result.step == 3


def test_a_failing_worker_ends_the_run_with_its_error(tmp_path, monkeypatch):
    def broken(self, index):
        raise RuntimeError(f"sample {index} is broken")
    monkeypatch.setattr(SyntheticClipDataset, "__getitem__", broken)  # the forked workers inherit it
    start = time.perf_counter()
    with deadline(60), pytest.raises(RuntimeError, match="sample .* is broken"):
        train(micro(tmp_path, workers=2, steps=2, train_size=128, batch_size=32))
    assert time.perf_counter() - start < 30


def test_a_batch_a_worker_cannot_send_is_an_error_not_a_hang(tmp_path, monkeypatch):
    collate = SyntheticCollate.__call__
    monkeypatch.setattr(SyntheticCollate, "__call__",
                        lambda self, samples: collate(self, samples)._replace(extra=MappingProxyType({})))
    with deadline(60), pytest.raises(TypeError, match="pickle"):
        train(micro(tmp_path, workers=1, steps=1, train_size=128, batch_size=32))


# ---------------------------------------------------------------------------------------------- open_clip CSV

def test_open_clip_csv_with_working_directory_paths_trains(tmp_path, monkeypatch):
    """open_clip's layout: the CSV elsewhere, its image paths relative to where the command runs."""
    paths = write_images(tmp_path / "work" / "images", 8)
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"images/{p.name}\ta grey square number {i}\n"
                                                  for i, p in enumerate(paths)))
    monkeypatch.chdir(tmp_path / "work")
    with deadline(120):
        result = train(micro(tmp_path, train_data=str(csv), batch_size=4, chunk_size=None, steps=2, workers=2))
    assert result.step == 2 and result.skipped == 0


def test_csv_without_a_readable_image_stops_at_once_naming_the_path(tmp_path, monkeypatch):
    csv = tmp_path / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"pictures/{i}.png\ta caption\n" for i in range(1000)))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"--train-data .*'pictures/0.png', was tried as given \(.*working directory"):
        train(micro(tmp_path, train_data=str(csv), batch_size=8, chunk_size=None, steps=1))
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------- torchrun

def _train_losses(path):
    return [r["loss"] for r in read_metrics(path) if r["kind"] == "train"]


def test_methods_on_two_ranks_take_the_single_process_steps(tmp_path):
    """CLIP-C, --clipin and --teacher together on 2 gloo ranks × 16 pairs follow the 1 × 32 run (loss per step
    within 1e-5): the batch transforms, CLIPin's heads (BatchNorm) and distill_loss see the global batch."""
    teacher = tmp_path / "teacher.pt"
    register_configs()
    torch.manual_seed(5)
    torch.save(open_clip.create_model("pcf-micro-32").state_dict(), teacher)
    settings = dict(train_size=96, batch_size=32, chunk_size=8, steps=3, eps=1e-3, clipin=True, view_flip=0.5,
                    clipc_rate=0.5, teacher="pcf-micro-32", teacher_checkpoint=str(teacher), distill_margin=0.1)
    single = train(micro(tmp_path / "one", teacher_cache=str(tmp_path / "cache-one"), **settings))
    assert run_on_ranks(micro(tmp_path / "two", teacher_cache=str(tmp_path / "cache-two"), **settings), 2) == []
    one, two = _train_losses(single.metrics_path), _train_losses(tmp_path / "two" / "run" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    assert np.abs(np.array(one) - np.array(two)).max() < 1e-5, (one, two)
    assert len(list((tmp_path / "cache-two").glob("*.pt"))) == 1  # rank 0 wrote the teacher cache, rank 1 read it


def test_open_clip_local_loss_with_gathered_gradients_on_two_ranks(tmp_path):
    """--local-loss --gather-with-grad: open_clip's ClipLoss on each rank; averaged as DDP does, the step is the
    single-process step (the parameters after 2 steps match); each rank logs its own local loss."""
    settings = dict(train_size=64, batch_size=32, chunk_size=8, steps=2, eps=1e-3)
    single = train(micro(tmp_path / "one", **settings))
    assert run_on_ranks(micro(tmp_path / "two", local_loss=True, gather_with_grad=True, **settings), 2) == []
    one = load_checkpoint(single.checkpoint, torch.device("cpu"))["model"]
    two = load_checkpoint(tmp_path / "two" / "run" / "checkpoint.pt", torch.device("cpu"))["model"]
    for name, tensor in one.items():  # an lr-sized step is 3e-3; summation order moves Adam's steps by ~1e-7
        assert torch.allclose(two[name], tensor, rtol=1e-4, atol=1e-6), name
    assert _train_losses(tmp_path / "two" / "run" / "metrics.jsonl") != _train_losses(single.metrics_path)


def test_fewer_shards_than_ranks_is_a_message_on_every_rank(tmp_path):
    write_shards(tmp_path, shards=1, per_shard=4)
    errors = run_on_ranks(micro(tmp_path, train_data=str(tmp_path / "shard-0.tar"), batch_size=4, chunk_size=None,
                                steps=1), 2, timeout=60)
    assert sorted(e.split(":")[0] for e in errors) == ["rank 0", "rank 1"], errors
    assert all("1 shard(s) for 2 processes" in e for e in errors), errors


def test_only_rank_0_prints_the_summary(monkeypatch, capsys, tmp_path):
    import pyclipfast.train.loop as loop
    from pyclipfast.train.__main__ import main

    def other_rank(cfg):
        return loop.TrainResult(config=cfg, first_eval={}, last_eval={}, step=1, output_dir=tmp_path, checkpoint=None,
                                metrics_path=tmp_path / "metrics.jsonl", plots=[], skipped=0, seconds=1.0,
                                is_main=False)
    monkeypatch.setattr(loop, "train", other_rank)
    assert main(["--model", "pcf-micro-32", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- weights

def test_exported_weights_load_in_open_clip_with_the_same_embeddings(tmp_path):
    mask = os.umask(0o022)
    try:
        result = train(micro(tmp_path, steps=2, train_size=64, batch_size=32))
    finally:
        os.umask(mask)
    assert result.weights == tmp_path / "run" / "open_clip_weights.pt"
    for name in ("checkpoint.pt", "open_clip_weights.pt", "metrics.jsonl", "params.txt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name  # the umask's, not 0600
    trained = create_model("pcf-micro-32", "clip", torch.device("cpu"))
    trained.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"])
    register_configs()
    exported = open_clip.create_model("pcf-micro-32", pretrained=str(result.weights))
    from_checkpoint = create_model("pcf-micro-32", "clip", torch.device("cpu"), pretrained=str(result.checkpoint))
    from_weights = create_model("pcf-micro-32", "clip", torch.device("cpu"), pretrained=str(result.weights))
    images, tokens = torch.randn(4, 3, 32, 32), open_clip.get_tokenizer("pcf-micro-32")(["a red circle"] * 4)
    expected = trained.eval().encode_image(images), trained.encode_text(tokens)
    assert not torch.allclose(expected[0], create_model("pcf-micro-32", "clip", torch.device("cpu")).eval()
                              .encode_image(images))  # training moved the weights: the comparison can fail
    for model in (exported, from_checkpoint, from_weights):
        model.eval()
        assert torch.equal(model.encode_image(images), expected[0])
        assert torch.equal(model.encode_text(tokens), expected[1])


def test_pretrained_tag_without_network_says_a_local_file_is_needed(tmp_path):
    with pytest.raises(UsageError, match="--pretrained 'openai'.*give the local file"):
        train(micro(tmp_path, pretrained="openai"))


# ---------------------------------------------------------------------------------------------- early errors

def test_batchnorm_with_chunks_is_refused(tmp_path):
    config = tmp_path / "tiny-resnet.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    with pytest.raises(UsageError, match=r"--chunk-size 16: .*BatchNorm layers \(visual.bn1"):
        train(micro(tmp_path, model=str(config)))


def test_unwritable_output_dir_fails_before_anything_runs(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError, match="--output-dir .*a-file/run: cannot write there"):
        train(micro(tmp_path, output_dir=str(tmp_path / "a-file" / "run")))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_on_a_cpu_run_are_refused(tmp_path, monkeypatch, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match=f"--backend {backend} runs on CUDA devices"):
        train(micro(tmp_path, backend=backend))


def test_data_errors_are_one_line_without_the_usage_text(tmp_path, capsys):
    from pyclipfast.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "pcf-micro-32", "--device", "cpu", "--train-data", str(tmp_path / "missing.csv"),
              "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" not in error
    assert error.count("\n") == 1 and "error: --train-data" in error


def test_console_script_without_the_train_extra_says_what_to_install(monkeypatch, capsys):
    """A base install (no Pillow: hidden here) gets the one-line hint, not `No module named 'PIL'`."""
    from pyclipfast.train.__main__ import main

    monkeypatch.setitem(sys.modules, "PIL", None)
    for name in [n for n in sys.modules if n == "pyclipfast.train.config" or n.startswith("pyclipfast.train.data")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh by main, and put back after the test
    assert main(["--preset", "cpu-demo"]) == 2
    assert capsys.readouterr().err.startswith(
        "pyclipfast-train: the trainer needs its extra dependencies: pip install 'pyclipfast[train]'")


def test_resume_is_decided_on_rank_0(tmp_path):
    """Node-local output folders: only rank 0 sees the checkpoint, and every rank resumes from it (else the
    ranks would run different steps and never finish); the run ends where the single-process run does."""
    settings = dict(train_size=64, batch_size=32, chunk_size=16, steps=3, eps=1e-3)
    single = train(micro(tmp_path / "one", **settings))
    node_local = {1: {"output_dir": str(tmp_path / "node-1")}}
    assert run_on_ranks(micro(tmp_path / "two", stop_at=1, **settings), 2, timeout=120, per_rank=node_local) == []
    assert not (tmp_path / "node-1" / "checkpoint.pt").exists()
    assert run_on_ranks(micro(tmp_path / "two", resume="auto", **settings), 2, timeout=120, per_rank=node_local) == []
    state = load_checkpoint(tmp_path / "two" / "run" / "checkpoint.pt", torch.device("cpu"))
    assert state["progress"]["step"] == 3 and len(state["rng_per_rank"]) == 2
    one = load_checkpoint(single.checkpoint, torch.device("cpu"))["model"]
    for name, tensor in one.items():
        assert torch.allclose(state["model"][name], tensor, rtol=1e-4, atol=1e-6), name


def test_fsdp_on_two_ranks_takes_the_single_process_steps_resumes_and_evaluates_the_whole_val_set(tmp_path):
    """--fsdp on 2 gloo ranks × 16 pairs follows the 1 × 32 run (loss per step within 1e-5, gradient caching's
    chunks and --grad-clip included) across a stop and resume; its checkpoint resumes in one process and its
    weights load in open_clip. Every rank embeds all the --val-data shards: the recall equals the single
    process's (the model is the same before training; a rank evaluating half the pairs would differ). Rank 1
    builds another model: the sharded one starts from rank 0's, as DDP does."""
    write_shards(tmp_path / "val", shards=2, per_shard=8, caption=lambda i: f"a square of grey level {i}")
    settings = dict(train_size=64, batch_size=32, chunk_size=8, steps=3, eps=1e-3, grad_clip=1.0, eval_at_start=True,
                    val_data=str(tmp_path / "val" / "shard-{0..1}.tar"))
    single = train(micro(tmp_path / "one", **settings))
    two = tmp_path / "two" / "run"
    register_configs()
    torch.manual_seed(5)
    torch.save(open_clip.create_model("pcf-micro-32").state_dict(), tmp_path / "other.pt")
    other_start = {1: {"pretrained": str(tmp_path / "other.pt")}}  # rank 0's parameters reach every rank
    assert run_on_ranks(micro(tmp_path / "two", fsdp=True, stop_at=2, **settings), 2, timeout=120,
                        per_rank=other_start) == []
    shutil.copyfile(two / "checkpoint.pt", tmp_path / "step-2.pt")
    assert run_on_ranks(micro(tmp_path / "two", fsdp=True, resume="auto", **settings), 2, timeout=120) == []
    assert "cpu x2 sharded (FSDP2)" in (two / "out.log").read_text()

    one_losses, two_losses = _train_losses(single.metrics_path), _train_losses(two / "metrics.jsonl")
    assert len(one_losses) == len(two_losses) == 3
    assert np.abs(np.array(one_losses) - np.array(two_losses)).max() < 1e-5, (one_losses, two_losses)
    evals = {path: [r for r in read_metrics(path) if r["kind"] == "eval"] for path in (single.metrics_path,
                                                                                      two / "metrics.jsonl")}
    first_one, first_two = evals[single.metrics_path][0], evals[two / "metrics.jsonl"][0]
    assert first_one["step"] == first_two["step"] == 0 and "val/t2i_R@10" in first_one
    assert {k: v for k, v in first_two.items() if k.startswith("val/")} == \
        {k: v for k, v in first_one.items() if k.startswith("val/")}

    # The sharded run's checkpoint is whole: one process resumes it and takes the single-process step 3.
    resumed = train(micro(tmp_path / "three", resume=str(tmp_path / "step-2.pt"), **settings))
    assert abs(_train_losses(resumed.metrics_path)[-1] - one_losses[-1]) < 1e-5
    state = load_checkpoint(two / "checkpoint.pt", torch.device("cpu"))
    for name, tensor in load_checkpoint(single.checkpoint, torch.device("cpu"))["model"].items():
        assert torch.allclose(state["model"][name], tensor, rtol=1e-4, atol=1e-6), name
    exported = open_clip.create_model("pcf-micro-32", pretrained=str(two / "open_clip_weights.pt"))
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name


def test_fsdp_refuses_the_training_methods(tmp_path):
    from pyclipfast.train.hooks import Hooks
    from pyclipfast.train.loop import check_fsdp

    with pytest.raises(UsageError, match="--fsdp trains the plain CLIP/SigLIP step"):
        check_fsdp(Hooks(after_step=lambda model, step: None), micro(tmp_path, fsdp=True))
    with pytest.raises(UsageError, match="--fsdp with --torchcompile"):
        check_fsdp(Hooks(), micro(tmp_path, fsdp=True, torchcompile=True))
