"""Trainer configuration: the TrainConfig dataclass, the presets and the command line.

Every field is one flag (`batch_size` ↔ `--batch-size`). A preset fills in defaults; flags given
on the command line win over it:

    python -m pyclipfast.train --preset cpu-demo                 # the README's demo
    python -m pyclipfast.train --preset cpu-demo --steps 20      # a shorter demo
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .data import ATTRIBUTES, CAPTION_MODES

LOSSES = ("clip", "siglip")
BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")
REPORT_TO = ("none", "tensorboard")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
DEVICES = ("auto", "cpu", "cuda")
DATASET_TYPES = ("auto", "synthetic", "csv", "webdataset")
CAPTIONS = CAPTION_MODES + ("all",)
DISTILL_KDS = ("kl", "ce")
# Settings of a method that only mean something with the method on: None until the method is
# enabled, then these defaults (`with_method_defaults`). Giving one without its method is an error.
CLIPIN_DEFAULTS: dict[str, Any] = {"lambda_inter": 1.0, "lambda_intra": 1.0, "ema_momentum": 0.95, "view_flip": 0.0}
TEACHER_DEFAULTS: dict[str, Any] = {"distill_margin": 0.0, "distill_weight": 1.0, "distill_kd": "kl"}
TEACHER_OPTIONS = ("teacher_checkpoint", "teacher_cache", "false_negative_threshold", *TEACHER_DEFAULTS)


class UsageError(ValueError):
    """A setting (or the data it points to) that a run cannot use; the message names the flag."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (see `--help` for each field)."""

    # model
    model: str = "pcf-tiny-48"
    pretrained: Optional[str] = None
    loss: str = "clip"
    backend: str = "auto"
    precision: str = "fp32"
    device: str = "auto"
    threads: Optional[int] = None
    grad_checkpointing: bool = False
    torchcompile: bool = False
    fsdp: bool = False
    lock_image: bool = False
    lock_text: bool = False
    # data
    train_data: Optional[str] = None
    val_data: Optional[str] = None
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    train_size: int = 20_000
    val_size: int = 1_000
    caption: str = "short"
    omit: Optional[str] = None
    perturb: Optional[str] = None
    workers: int = 0
    train_num_samples: Optional[int] = None
    dataset_resampled: bool = False
    # optimisation
    batch_size: int = 256
    chunk_size: Optional[int] = None
    accum_freq: int = 1
    steps: int = 100
    epochs: Optional[int] = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 10
    lr_scheduler: str = "cosine"
    epochs_cooldown: Optional[int] = None
    lr_cooldown_power: float = 1.0
    lr_cooldown_end: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: Optional[float] = None
    seed: int = 0
    local_loss: bool = False
    gather_with_grad: bool = False
    siglip_dist_impl: Optional[str] = None
    # methods (pyclipfast/train/methods/): CLIP-C, CLIPin, teacher distillation
    clipc_rate: float = 0.0
    clipin: bool = False
    lambda_inter: Optional[float] = None
    lambda_intra: Optional[float] = None
    ema_momentum: Optional[float] = None
    view_flip: Optional[float] = None
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_cache: Optional[str] = None
    distill_margin: Optional[float] = None
    distill_weight: Optional[float] = None
    distill_kd: Optional[str] = None
    false_negative_threshold: Optional[float] = None
    # evaluation, logging, checkpoints
    output_dir: str = "runs/pyclipfast"
    eval_every: int = 0
    eval_at_start: bool = True
    log_every: int = 1
    save_every: int = 0
    save_frequency: int = 0
    delete_previous_checkpoint: bool = False
    resume: Optional[str] = None
    stop_at: Optional[int] = None
    progress: bool = True
    plots: bool = True
    compare_memory: bool = False
    report_to: str = "none"
    preset: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The README's main command: a small model on the built-in data, on a CPU, in a few minutes.
    # The batch is encoded in chunks of 128 (gradient caching), the loss sees all 512 at once.
    "cpu-demo": dict(
        model="pcf-tiny-48", device="cpu", precision="fp32", loss="clip", caption="short",
        train_size=20_000, val_size=500, batch_size=512, chunk_size=128, steps=70, lr=2e-3,
        warmup=10, weight_decay=0.1, eval_every=0, log_every=1, save_every=10,
        output_dir="runs/cpu-demo", compare_memory=True,
    ),
    # A larger model and batch for one GPU (≈ 80 GB): 32768 pairs per step in chunks of 4096, bf16.
    # Rendering the synthetic images is CPU work: give the loader the machine's cores (--workers).
    "gpu": dict(
        model="pcf-small-64", device="cuda", precision="bf16", loss="clip", caption="all",
        train_size=1_000_000, val_size=5_000, batch_size=32_768, chunk_size=4_096, steps=2_000, lr=1e-3,
        warmup=100, weight_decay=0.1, workers=12, eval_every=250, log_every=10, save_every=250,
        output_dir="runs/gpu", compare_memory=True,
    ),
}

_HELP: dict[str, str] = {
    "model": "open_clip architecture name, a shipped config (pcf-micro-32, pcf-tiny-48, pcf-tiny-64, "
             "pcf-small-64) "
             "or the path of a model-config .json",
    "pretrained": "open_clip pretrained tag or checkpoint file (default: random initialisation)",
    "loss": "contrastive loss",
    "backend": "pyclipfast backend for the loss and the retrieval metrics",
    "precision": "fp32, bf16 autocast, or fp16 autocast with a gradient scaler (weights stay fp32)",
    "device": "auto: CUDA if available, else CPU",
    "threads": "torch CPU threads (default for a CPU run: all cores but one)",
    "grad_checkpointing": "recompute the towers' activations in the backward pass (open_clip's "
                          "set_grad_checkpointing): less memory per chunk, more compute",
    "torchcompile": "compile the image and text encoders with torch.compile",
    "fsdp": "under torchrun, shard the towers' parameters, gradients and optimizer state over the processes "
            "with torch's FSDP2 (fully_shard) instead of replicating them with DistributedDataParallel: for "
            "models that do not fit on one device; checkpoints stay whole (they load in one process)",
    "lock_image": "freeze the image tower (LiT: locked-image tuning); it gets no gradient and no second pass",
    "lock_text": "freeze the text tower",
    "train_data": "CSV file (open_clip format) or webdataset shards ('shards/{000..009}.tar'); "
                  "default: the built-in synthetic scenes",
    "val_data": "CSV or shards for retrieval evaluation (default with --train-data: none; "
                "synthetic training always evaluates on the synthetic val split)",
    "dataset_type": "auto: synthetic without --train-data, webdataset for .tar patterns, else csv",
    "csv_img_key": "CSV column with the image paths",
    "csv_caption_key": "CSV column with the captions",
    "csv_separator": "CSV field separator",
    "train_size": "synthetic train split size",
    "val_size": "synthetic val split size",
    "caption": "synthetic captions: short, detailed, sentences (a random subset of the detailed "
               "caption's sentences, redrawn every time the image is drawn, i.e. each epoch), all (short "
               "and detailed), or a comma-separated list of modes (short,sentences); the captions of one "
               "image are positives of each other",
    "omit": "selection bias on the built-in data: leave attributes out of the training captions with "
            "these rates, e.g. colour=0.5,shape=0.2 (attributes: " + ", ".join(ATTRIBUTES) + ")",
    "perturb": "perturbation bias on the built-in data: replace attributes in the training captions by "
               "another value with these rates, e.g. colour=0.3",
    "workers": "DataLoader worker processes",
    "dataset_resampled": "webdataset: every process draws shards with replacement (open_clip's resampling; "
                         "needs --train-num-samples, and any number of shards serves any number of processes)",
    "train_num_samples": "samples in one epoch of --train-data (webdataset shards have no length: needed with "
                         "--epochs there; with a CSV or the built-in data it shortens the epoch)",
    "batch_size": "global batch size (image–caption pairs per step, over all processes)",
    "chunk_size": "encode at most this many inputs at once (gradient caching); memory grows with the "
                  "chunk, not the batch. Default: the whole per-process batch",
    "accum_freq": "open_clip's gradient accumulation over k batches; here gradient caching covers it "
                  "exactly (the loss sees the whole batch at once): use --batch-size k*B --chunk-size B. "
                  "Only 1 is accepted",
    "steps": "optimizer steps (--epochs sets it)",
    "epochs": "train this many epochs: --steps becomes epochs x batches per epoch",
    "lr": "peak learning rate (AdamW, linear warmup, then --lr-scheduler)",
    "weight_decay": "AdamW weight decay (not on gains, biases and the logit scale/bias)",
    "warmup": "warmup steps",
    "lr_scheduler": "after the warmup: cosine decay to 0, const, or const-cooldown (constant, then a decay "
                    "over the last --epochs-cooldown epochs)",
    "epochs_cooldown": "const-cooldown: epochs of the final decay (needs --epochs)",
    "lr_cooldown_power": "const-cooldown: power of the decay (1: linear)",
    "lr_cooldown_end": "const-cooldown: the learning rate at the end",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "clip the global gradient norm to this value",
    "seed": "seed of the model initialisation, the data order and the synthetic data",
    "local_loss": "torchrun: open_clip's ClipLoss(local_loss=True) instead of the loss of the global batch "
                  "(each rank's rows against all columns; with --gather-with-grad the same gradient)",
    "gather_with_grad": "torchrun: open_clip's ClipLoss/SigLipLoss gather_with_grad; without it (and with "
                        "--local-loss or --siglip-dist-impl) the other ranks' features carry no gradient, as in "
                        "open_clip. Neither flag: the exact loss of the global batch",
    "siglip_dist_impl": "torchrun with --loss siglip: open_clip's SigLipLoss dist_impl (bidir, shift, reduce, "
                        "gather) instead of the loss of the global batch",
    "clipc_rate": "CLIP-C: probability that a batch element becomes a composite of two samples (centre "
                  "halves side by side, caption '<caption 1> and <caption 2>'); 0 disables it",
    "clipin": "CLIPin: non-contrastive heads and EMA target encoders on two augmented views, "
              "cosine losses added to the contrastive loss",
    "lambda_inter": "CLIPin weight of the inter-modal cosine loss (default 1.0 with --clipin)",
    "lambda_intra": "CLIPin weight of the intra-modal cosine loss (default 1.0 with --clipin)",
    "ema_momentum": "CLIPin target update θ_t ← m·θ_t + (1−m)·θ_o (default 0.95 with --clipin)",
    "view_flip": "CLIPin: probability of a horizontal flip in each augmented view (default 0 with "
                 "--clipin: captions that name left and right would contradict a flipped image)",
    "teacher": "distillation teacher: open_clip architecture, shipped config or config .json; "
               "distill_loss replaces the contrastive loss",
    "teacher_checkpoint": "the teacher's weights: a pyclipfast.train checkpoint.pt, an open_clip "
                          "checkpoint file or an open_clip pretrained tag",
    "teacher_cache": "directory of the precomputed teacher embeddings of the built-in data (default: "
                     "teacher-cache/ beside --teacher-checkpoint; 'off': embed every batch)",
    "distill_margin": "adaptive angular margin m in radians (default 0 with --teacher)",
    "distill_weight": "weight λ of the soft-label distillation term (default 1.0 with --teacher)",
    "distill_kd": "distillation term: kl or ce (default kl with --teacher)",
    "false_negative_threshold": "negatives the teacher scores above this cosine leave the InfoNCE "
                                "denominators (default: none)",
    "output_dir": "where checkpoint.pt, metrics.jsonl and the plots go",
    "eval_every": "evaluate every this many steps (0: only at the start and the end)",
    "eval_at_start": "evaluate the untrained model before the first step",
    "log_every": "log training metrics every this many steps",
    "save_every": "write the checkpoint every this many steps (0: only at the end)",
    "save_frequency": "also keep the checkpoint of every this many epochs as epoch_K.pt (0: none)",
    "delete_previous_checkpoint": "keep only the newest epoch_K.pt",
    "resume": "continue from this checkpoint ('auto' or 'latest': OUTPUT_DIR/checkpoint.pt, the newest, if "
              "it exists); the run then follows the uninterrupted trajectory exactly",
    "stop_at": "stop after this step and save a checkpoint, as if interrupted (resume with --resume)",
    "progress": "show a progress bar",
    "plots": "write loss.png and metrics.png",
    "compare_memory": "measure the peak memory of the loss against open_clip's at the batch size "
                      "(and at 8192 on a CPU)",
    "report_to": "also log the training metrics to TensorBoard (OUTPUT_DIR/tensorboard; needs the "
                 "tensorboard package)",
    "preset": "a set of defaults: " + ", ".join(PRESETS),
}
_CHOICES: dict[str, Sequence[str]] = {
    "loss": LOSSES, "backend": BACKENDS, "precision": PRECISIONS, "device": DEVICES,
    "dataset_type": DATASET_TYPES, "preset": tuple(PRESETS), "lr_scheduler": LR_SCHEDULERS, "report_to": REPORT_TO,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind: type):
    """argparse type for an Optional field: 'none' → None."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default once, as Python writes it ('\\t', not an invisible tab); none where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        shown = repr(action.default) if isinstance(action.default, str) else str(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Formatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag help wrapped, the epilog as written."""


EPILOG = """\
subcommand:
  python -m pyclipfast.train experiments [--preset quick|full] [--jobs N] ...
      train every method variant with several seeds and write the methods' results table
      (see python -m pyclipfast.train experiments --help)
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pyclipfast.train`, one flag per TrainConfig field."""
    parser = argparse.ArgumentParser(
        prog="python -m pyclipfast.train",
        description="Train a CLIP model with pyclipfast's fused losses and gradient caching.",
        formatter_class=lambda prog: _Formatter(prog), epilog=EPILOG,
    )
    for field in dataclasses.fields(TrainConfig):
        flag, default, help_text = _flag(field.name), field.default, _HELP[field.name]
        if field.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = {"int": int, "float": float, "str": str}
        kind = field.type.removeprefix("Optional[").removesuffix("]")
        parse = base[kind] if not field.type.startswith("Optional") else _optional(base[kind])
        parser.add_argument(flag, type=parse, default=default, choices=_CHOICES.get(field.name), help=help_text)
    return parser


def check_config(cfg: TrainConfig) -> None:
    """Raise UsageError naming the flag of the first invalid setting."""
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices and not (name == "preset" and value is None):
            raise UsageError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")
    positive = ("batch_size", "steps", "train_size", "val_size", "log_every", "lr", "eps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{_flag(name)} must be positive; got {getattr(cfg, name)}")
    for name in ("workers", "warmup", "eval_every", "save_every", "weight_decay", "seed"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{_flag(name)} must be >= 0; got {getattr(cfg, name)}")
    for name in ("epochs", "train_num_samples", "epochs_cooldown"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UsageError(f"{_flag(name)} must be positive; got {getattr(cfg, name)}")
    if cfg.dataset_resampled and cfg.train_num_samples is None:
        raise UsageError("--dataset-resampled draws shards endlessly: give the epoch length with --train-num-samples")
    if cfg.save_frequency < 0:
        raise UsageError(f"--save-frequency must be >= 0; got {cfg.save_frequency}")
    if cfg.accum_freq != 1:
        raise UsageError(f"--accum-freq {cfg.accum_freq}: gradient caching computes the exact step of a large batch "
                         f"that accumulation approximates; use --batch-size {cfg.accum_freq}x(your batch) "
                         f"--chunk-size (your batch)")
    if cfg.lr_scheduler == "const-cooldown" and (cfg.epochs_cooldown is None or cfg.epochs is None):
        raise UsageError("--lr-scheduler const-cooldown needs --epochs and --epochs-cooldown (the epochs of the decay)")
    if cfg.epochs_cooldown is not None and cfg.lr_scheduler != "const-cooldown":
        raise UsageError("--epochs-cooldown applies to --lr-scheduler const-cooldown only")
    if cfg.epochs is not None and cfg.epochs_cooldown is not None and cfg.epochs_cooldown > cfg.epochs:
        raise UsageError(f"--epochs-cooldown {cfg.epochs_cooldown} is more than --epochs {cfg.epochs}")
    if cfg.lr_cooldown_power <= 0 or cfg.lr_cooldown_end < 0:
        raise UsageError("--lr-cooldown-power must be positive and --lr-cooldown-end >= 0")
    if cfg.siglip_dist_impl is not None and (cfg.siglip_dist_impl not in SIGLIP_DIST_IMPLS or cfg.loss != "siglip"):
        raise UsageError(f"--siglip-dist-impl must be one of {', '.join(SIGLIP_DIST_IMPLS)} with --loss siglip; "
                         f"got {cfg.siglip_dist_impl!r} with --loss {cfg.loss}")
    if cfg.local_loss and cfg.loss != "clip":
        raise UsageError("--local-loss applies to --loss clip (SigLIP: --siglip-dist-impl)")
    if cfg.lock_image and cfg.lock_text:
        raise UsageError("--lock-image and --lock-text together leave nothing to train but the logit scale")
    if cfg.threads is not None and cfg.threads <= 0:
        raise UsageError(f"--threads must be positive; got {cfg.threads}")
    if cfg.chunk_size is not None and cfg.chunk_size <= 0:
        raise UsageError(f"--chunk-size must be positive; got {cfg.chunk_size}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise UsageError(f"--grad-clip must be positive; got {cfg.grad_clip}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1); got {getattr(cfg, name)}")
    if cfg.stop_at is not None and cfg.epochs is None and not 0 < cfg.stop_at <= cfg.steps:
        raise UsageError(f"--stop-at must be in [1, --steps={cfg.steps}]; got {cfg.stop_at}")
    if cfg.train_data is None and cfg.dataset_type in ("csv", "webdataset"):
        raise UsageError(f"--dataset-type {cfg.dataset_type} needs --train-data")
    if cfg.train_data is not None and cfg.dataset_type == "synthetic":
        raise UsageError("--train-data cannot be used with --dataset-type synthetic")
    caption_choice(cfg.caption)
    if cfg.train_data is not None and cfg.caption != "short":
        raise UsageError("--caption applies to the built-in synthetic data only (real data has one caption per image)")
    check_methods(cfg)


def caption_choice(caption: str) -> Union[str, tuple[str, ...]]:
    """--caption as the data takes it: a mode ("short", ..., "all") or a tuple of modes ("short,sentences")."""
    if caption in CAPTIONS:
        return caption
    modes = tuple(mode.strip() for mode in caption.split(","))
    if len(modes) < 2 or any(mode not in CAPTION_MODES for mode in modes) or len(set(modes)) != len(modes):
        raise UsageError(f"--caption must be one of {', '.join(CAPTIONS)} or a comma-separated list of distinct "
                         f"modes from {', '.join(CAPTION_MODES)}; got {caption!r}")
    return modes


def parse_rates(flag: str, text: Optional[str]) -> dict[str, float]:
    """'colour=0.5,shape=0.2' → {"colour": 0.5, "shape": 0.2}; UsageError naming `flag` when malformed.

    Attributes are those of the built-in captions (data.ATTRIBUTES); rates are in [0, 1].
    """
    if text is None:
        return {}
    rates: dict[str, float] = {}
    for item in text.split(","):
        attribute, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not attribute:
            raise UsageError(f"{flag} takes ATTRIBUTE=RATE pairs separated by commas (e.g. colour=0.5,shape=0.2); "
                             f"got {item!r}")
        if attribute not in ATTRIBUTES:
            raise UsageError(f"{flag}: unknown attribute {attribute!r}; expected one of {', '.join(ATTRIBUTES)}")
        if attribute in rates:
            raise UsageError(f"{flag}: attribute {attribute!r} is given twice")
        try:
            rate = float(value)
        except ValueError:
            raise UsageError(f"{flag} {attribute}={value}: the rate must be a number in [0, 1]") from None
        if not 0.0 <= rate <= 1.0:
            raise UsageError(f"{flag} {attribute}={value}: the rate must be in [0, 1]")
        rates[attribute] = rate
    return rates


def _check_range(cfg: TrainConfig, name: str, low: float, high: float) -> None:
    value = getattr(cfg, name)
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{_flag(name)} must be in [{low:g}, {high:g}]; got {value}")


def check_methods(cfg: TrainConfig) -> None:
    """The method flags: ranges, each option only with its method, and combinations that cannot work."""
    for name in ("omit", "perturb"):
        parse_rates(_flag(name), getattr(cfg, name))
        if getattr(cfg, name) is not None and cfg.train_data is not None:
            raise UsageError(f"{_flag(name)} applies to the built-in synthetic data only (it edits their captions)")
    _check_range(cfg, "clipc_rate", 0.0, 1.0)
    for name in CLIPIN_DEFAULTS:
        if getattr(cfg, name) is not None and not cfg.clipin:
            raise UsageError(f"{_flag(name)} is a CLIPin setting: it needs --clipin")
    for name in ("lambda_inter", "lambda_intra"):
        _check_range(cfg, name, 0.0, math.inf)
    _check_range(cfg, "ema_momentum", 0.0, 1.0)
    _check_range(cfg, "view_flip", 0.0, 1.0)
    for name in TEACHER_OPTIONS:
        if getattr(cfg, name) is not None and cfg.teacher is None:
            raise UsageError(f"{_flag(name)} is a distillation setting: it needs --teacher")
    if cfg.teacher is None:
        return
    if cfg.teacher_checkpoint is None:
        raise UsageError("--teacher needs --teacher-checkpoint: the teacher's trained weights (a pyclipfast.train "
                         "checkpoint.pt, an open_clip checkpoint file or pretrained tag)")
    if cfg.loss != "clip":
        raise UsageError(f"--teacher replaces the contrastive loss by distill_loss (InfoNCE with a margin): it needs "
                         f"--loss clip, got --loss {cfg.loss}")
    _check_range(cfg, "distill_margin", 0.0, math.pi)
    _check_range(cfg, "distill_weight", 0.0, math.inf)
    _check_range(cfg, "false_negative_threshold", -1.0, 1.0)
    if cfg.distill_kd is not None and cfg.distill_kd not in DISTILL_KDS:
        raise UsageError(f"--distill-kd must be one of {', '.join(DISTILL_KDS)}; got {cfg.distill_kd!r}")


def with_method_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the unset settings of its enabled methods at their defaults (CLIPIN_DEFAULTS, TEACHER_DEFAULTS)."""
    filled: dict[str, Any] = {}
    for enabled, defaults in ((cfg.clipin, CLIPIN_DEFAULTS), (cfg.teacher is not None, TEACHER_DEFAULTS)):
        if enabled:
            filled.update({name: value for name, value in defaults.items() if getattr(cfg, name) is None})
    return dataclasses.replace(cfg, **filled)


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse the command line (preset defaults first, explicit flags over them); exit on a bad flag."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.preset is not None:
        parser.set_defaults(**PRESETS[first.preset])
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        check_config(cfg)
    except UsageError as error:  # a value argparse accepted but the run cannot use: the one line, no usage text
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return cfg


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset with fields overridden (the Python equivalent of the command line)."""
    if name not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}; got {name!r}")
    cfg = TrainConfig(**{**PRESETS[name], "preset": name, **overrides})
    check_config(cfg)
    return cfg
