"""The flags a user of open_clip_train reaches for, with open_clip's names and meanings."""
import numpy as np
import pytest
import torch

import pyclipfast.train.loop as loop
from pyclipfast.train import Hooks, UsageError, train
from pyclipfast.train.checkpoint import load_checkpoint
from pyclipfast.train.config import parse_args
from pyclipfast.train.metrics import read_metrics
from train_helpers import micro, write_shards

pytestmark = pytest.mark.usefixtures("real_tiles")


def _train_records(result):
    return [r for r in read_metrics(result.metrics_path) if r["kind"] == "train"]


def test_epochs_retention_logs_and_resume_latest(tmp_path):
    """--epochs with --train-num-samples sets the run length; --save-frequency keeps epoch_K.pt (only the newest
    with --delete-previous-checkpoint); params.txt, out.log and TensorBoard scalars land in the output folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = micro(tmp_path, train_size=96, batch_size=32, epochs=2, train_num_samples=64, steps=999,
                save_frequency=1, delete_previous_checkpoint=True, report_to="tensorboard", lr_scheduler="const")
    result = train(cfg)
    records = _train_records(result)
    assert result.step == 4 and [r["epoch"] for r in records] == [0, 0, 1, 1]
    assert [r["lr"] for r in records] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3])  # warmup 2, then constant
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_2.pt"]
    assert load_checkpoint(out / "epoch_2.pt", torch.device("cpu"))["progress"]["step"] == 4
    params = (out / "params.txt").read_text().splitlines()
    assert "steps: 4" in params and "epochs: 2" in params and "lr_scheduler: const" in params
    assert "pyclipfast.train: pcf-micro-32" in (out / "out.log").read_text()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    assert "val/i2t_R@1" in events.Tags()["scalars"]
    train(micro(tmp_path, **{**cfg.to_dict(), "resume": "latest", "output_dir": str(out)}))
    assert "resumed from step 4" in (out / "out.log").read_text()


def test_lr_schedules_are_open_clips():
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    steps, per_epoch = 40, 4
    cases = [
        (dict(lr_scheduler="cosine"), scheduler.cosine_lr(optimizer, 2e-3, 5, steps)),
        (dict(lr_scheduler="const"), scheduler.const_lr(optimizer, 2e-3, 5, steps)),
        (dict(lr_scheduler="const-cooldown", epochs=10, epochs_cooldown=3, lr_cooldown_power=2.0,
              lr_cooldown_end=1e-4),
         scheduler.const_lr_cooldown(optimizer, 2e-3, 5, steps, 3 * per_epoch, 2.0, 1e-4)),
    ]
    for settings, expected in cases:
        cfg = loop.TrainConfig(lr=2e-3, warmup=5, steps=steps, **settings)
        factor = loop.lr_schedule(cfg, per_epoch)
        ours = [2e-3 * factor(step) for step in range(steps)]
        assert ours == pytest.approx([expected(step) for step in range(steps)], rel=1e-12), settings


def test_grad_checkpointing_takes_the_same_steps(tmp_path, monkeypatch):
    import open_clip.transformer

    calls = []
    real_checkpoint = open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or real_checkpoint(*args, **kwargs))
    settings = dict(train_size=64, batch_size=32, steps=2)
    plain = train(micro(tmp_path / "plain", **settings))
    assert not calls
    switched = train(micro(tmp_path / "switched", grad_checkpointing=True, **settings))
    assert calls  # the towers' blocks ran under torch.utils.checkpoint
    assert [r["loss"] for r in _train_records(switched)] == pytest.approx([r["loss"] for r in _train_records(plain)],
                                                                          rel=1e-6)
    one = load_checkpoint(plain.checkpoint, torch.device("cpu"))["model"]
    two = load_checkpoint(switched.checkpoint, torch.device("cpu"))["model"]
    for name, tensor in one.items():
        assert torch.allclose(two[name], tensor, rtol=1e-4, atol=1e-6), name


def test_torchcompile_compiles_the_towers(tmp_path, monkeypatch):
    """The wiring only (Inductor's C++ build takes minutes on this CPU): the towers' module goes through
    torch.compile, and the step runs through what it returns."""
    compiled, calls = [], []

    def record(module, backend):
        compiled.append((type(module).__name__, backend))
        return lambda **inputs: calls.append(sorted(inputs)) or module(**inputs)
    monkeypatch.setattr(torch, "compile", record)
    result = train(micro(tmp_path, train_size=32, batch_size=32, chunk_size=16, steps=1, torchcompile=True))
    assert result.step == 1 and compiled == [("Towers", "inductor")]
    assert ["images"] in calls and ["tokens"] in calls


def test_lock_image_trains_the_text_tower_only(tmp_path):
    from pyclipfast.train.model import create_model

    torch.manual_seed(0)
    initial = create_model("pcf-micro-32", "clip", torch.device("cpu")).state_dict()
    result = train(micro(tmp_path, train_size=64, batch_size=32, steps=2, lock_image=True))
    trained = load_checkpoint(result.checkpoint, torch.device("cpu"))["model"]
    assert all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("visual."))
    assert not torch.equal(trained["text_projection"], initial["text_projection"])


def test_fp16_autocast_with_a_grad_scaler(tmp_path):
    result = train(micro(tmp_path, train_size=64, batch_size=32, steps=2, precision="fp16"))
    losses = [r["loss"] for r in _train_records(result)]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert load_checkpoint(result.checkpoint, torch.device("cpu"))["scaler"]["scale"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--accum-freq", "4"], "--accum-freq 4: gradient caching"),
    (["--lr-scheduler", "const-cooldown"], "const-cooldown needs --epochs and --epochs-cooldown"),
    (["--siglip-dist-impl", "shift"], "--siglip-dist-impl .* with --loss siglip"),
    (["--lock-image", "--lock-text"], "nothing to train"),
])
def test_open_clip_flags_refused_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message.split(" .* ")[0] in capsys.readouterr().err


def test_accum_freq_help_points_to_gradient_caching(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--accum-freq ACCUM_FREQ open_clip's gradient accumulation over k batches; here gradient caching" in text
    assert "CSV field separator (default: '\\t')" in text  # visible, not a tab
    assert "(default 1.0 with --clipin)" in text and "(default: None)" not in text  # each default once


def test_epochs_on_shards_need_the_sample_count(tmp_path):
    write_shards(tmp_path, shards=1, per_shard=4)
    with pytest.raises(UsageError, match="--epochs: .*--train-num-samples"):
        train(micro(tmp_path, train_data=str(tmp_path / "shard-0.tar"), batch_size=4, chunk_size=None, epochs=1))


def test_the_loss_gets_bf16_features_under_cpu_autocast(tmp_path):
    seen = []
    record = Hooks(loss_terms=[lambda context: seen.append(context.image_features.dtype) or {}])
    train(micro(tmp_path, train_size=32, batch_size=32, chunk_size=16, steps=1, precision="bf16"), record)
    assert seen == [torch.bfloat16]


def test_features_are_normalised_outside_autocast(monkeypatch):
    """CUDA autocast would turn F.normalize's output to fp32: the normalisation must run after autocast
    (checked on the CPU by where it runs; on a GPU the dtype then follows)."""
    calls = []
    normalize = torch.nn.functional.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda x, dim: calls.append(
        (torch.is_autocast_enabled("cpu"), x.dtype)) or normalize(x, dim=dim))
    towers = lambda images: [torch.nn.functional.linear(images, torch.randn(4, 6))]  # noqa: E731
    features = loop.encode_features(towers, {"images": torch.randn(3, 6)}, torch.device("cpu"), "bf16")
    assert calls == [(False, torch.bfloat16)] and features[0].dtype == torch.bfloat16
    assert torch.allclose(features[0].float().norm(dim=-1), torch.ones(3), atol=1e-2)


def test_dataset_resampled_draws_shards_endlessly(tmp_path):
    """One shard of 4 samples, epochs of 12: resampling keeps drawing the shard."""
    write_shards(tmp_path, shards=1, per_shard=4)
    result = train(micro(tmp_path, train_data=str(tmp_path / "shard-0.tar"), batch_size=4, chunk_size=None, epochs=2,
                         train_num_samples=12, dataset_resampled=True))
    assert [r["epoch"] for r in _train_records(result)] == [0, 0, 0, 1, 1, 1]
