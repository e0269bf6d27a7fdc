"""The trainer as open_clip users run it: DataLoader workers, open_clip CSVs and weights, clear early errors."""
import contextlib
import signal
import time
from types import MappingProxyType

import numpy as np
import open_clip
import pytest
import torch

from pyclipfast.train import TrainConfig, UsageError, train
from pyclipfast.train.batches import SyntheticCollate
from pyclipfast.train.data import SyntheticClipDataset
from pyclipfast.train.metrics import read_metrics
from pyclipfast.train.model import register_configs

from train_helpers import micro, run_on_ranks, write_images

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

def test_workers_train_on_the_built_in_data(tmp_path):
    with deadline(120):
        result = train(micro(tmp_path, workers=2, steps=2, train_size=128, batch_size=32))
    assert result.step == 2
    assert [r["step"] for r in read_metrics(result.metrics_path) if r["kind"] == "train"] == [1, 2]


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
        result = train(micro(tmp_path, train_data=str(csv), batch_size=8, chunk_size=None, steps=2, workers=2))
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


@pytest.mark.parametrize("method", ["clipin", "teacher"])
def test_methods_on_two_ranks_take_the_single_process_steps(tmp_path, method):
    """--clipin / --teacher on 2 gloo ranks × 16 pairs follow the 1 × 32 run: the loss per step within 1e-5."""
    settings = dict(train_size=96, batch_size=32, chunk_size=8, steps=3, eps=1e-3)
    if method == "clipin":
        settings.update(clipin=True, view_flip=0.5)
    else:
        teacher = tmp_path / "teacher.pt"
        register_configs()
        torch.manual_seed(5)
        torch.save(open_clip.create_model("pcf-micro-32").state_dict(), teacher)
        settings.update(teacher="pcf-micro-32", teacher_checkpoint=str(teacher), distill_margin=0.1,
                        clipc_rate=0.5)
    single = train(micro(tmp_path / "one", **settings, **_cache(method, tmp_path / "cache-one")))
    assert run_on_ranks(micro(tmp_path / "two", **settings, **_cache(method, tmp_path / "cache-two")), 2) == []
    one, two = _train_losses(single.metrics_path), _train_losses(tmp_path / "two" / "run" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    assert np.abs(np.array(one) - np.array(two)).max() < 1e-5, (one, two)
    if method == "teacher":  # rank 0 wrote the teacher cache, the other rank read it
        assert len(list((tmp_path / "cache-two").glob("*.pt"))) == 1


def _cache(method, directory):
    return {"teacher_cache": str(directory)} if method == "teacher" else {}
