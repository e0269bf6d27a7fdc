"""The training loop: gradient-cached CLIP/SigLIP steps, evaluation, metrics, checkpoints, resume.

    result = train(TrainConfig(...))            # or: python -m pyclipfast.train ...

One step: a batch of images and captions (sharded over the ranks) → optional batch transform →
gradient caching (`grad_cache_step`) over the two towers with the pyclipfast loss of the
global batch plus any extra loss terms → gradients summed over ranks → AdamW step → cosine
schedule. Every generator the trajectory depends on is either restored from the checkpoint
(torch, numpy, python) or derived from (seed, epoch, step), so a resumed run reproduces the
uninterrupted one exactly.

Methods (CLIP-C compositions, CLIPin, teacher distillation; pyclipfast/train/methods/) plug into
the loop through `Hooks` (hooks.py): a batch transform, a replacement of the contrastive loss,
extra loss terms, an after-step callback, and modules of their own that the optimizer trains and
the checkpoint keeps. `train` builds the hooks of the methods the config enables and merges them
with those it is given.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from collections.abc import Callable, Iterable
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

import pyclipfast
import pyclipfast.distributed as pcf_dist

from .attribute_probe import AttributeProbe
from .batches import (
    TokenizedBatch, build_train_data, dataset_type, gather_batch, real_val_pairs, shard_of, synthetic_split,
    trim_to_common_size,
)
from .checkpoint import (
    WEIGHTS_NAME, Progress, atomic_write, check_compatible, export_weights, load_checkpoint, restore, rng_states,
    save_checkpoint,
)
from .config import TrainConfig, UsageError, caption_choice, check_config, with_method_defaults
from .evaluate import PairRetrievalEvaluation, SyntheticEvaluation, autocast_context, evaluate
from .gradcache import grad_cache_step
from .hooks import Hooks, LossContext, merge_hooks
from .memory import compare_loss_memory, memory_method
from .methods import build_methods
from .metrics import MetricsLog, plot_metrics
from .model import create_model, create_tokenizer, image_size, model_config, resolve_model_name
from .runtime import (
    Runtime, all_gather_with_grad, all_reduce_mean, choose_threads, gather_rows, global_term, seed_everything,
    average_scales, broadcast_object, distributed_towers, fsdp_no_sync, full_state, gather_objects, setup_runtime,
    sharded_towers, teardown_runtime,
)


@dataclass
class TrainResult:
    """What a run produced: evaluations before/after, paths, counts, and the loss memory comparison."""

    config: TrainConfig
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    step: int
    output_dir: Path
    checkpoint: Optional[Path]
    metrics_path: Path
    plots: list[Path]
    skipped: int
    seconds: float
    loss_memory: Optional[dict[str, Any]] = None
    is_main: bool = True  # False on the other ranks of a torchrun job (their evaluations are not reported)
    weights: Optional[Path] = None


def param_groups(model: torch.nn.Module, weight_decay: float,
                 extra: Iterable[torch.nn.Module] = ()) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases and the logit scale/bias.

    The trainable parameters of the `extra` modules (the hooks' heads) follow the model's, split alike.
    """
    decay, no_decay = [], []
    for module in (model, *extra):
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            exclude = parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exclude else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_schedule(warmup: int, steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def lr_schedule(cfg: TrainConfig, batches_per_epoch: Optional[int]) -> Callable[[int], float]:
    """The learning-rate factor of --lr-scheduler (open_clip's cosine_lr, const_lr, const_lr_cooldown).

    Every schedule warms up linearly over --warmup steps. const-cooldown then holds the rate until
    the last --epochs-cooldown epochs, where it decays as (1 − e/E)^power from --lr to --lr-cooldown-end.
    """
    if cfg.lr_scheduler == "cosine":
        return cosine_schedule(cfg.warmup, cfg.steps)
    cooldown = 0 if cfg.lr_scheduler == "const" else cfg.epochs_cooldown * batches_per_epoch
    start = cfg.steps - cooldown
    end = cfg.lr_cooldown_end / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if step < start:
            return 1.0
        decay = (1 - min(1.0, (step - start) / max(1, cooldown))) ** cfg.lr_cooldown_power
        return decay * (1 - end) + end
    return factor


def contrastive_loss(cfg: TrainConfig, runtime: Runtime) -> Callable[..., torch.Tensor]:
    """The loss of the global batch: pyclipfast.distributed's clip/siglip (single-process when not launched).

    With --local-loss, --gather-with-grad or --siglip-dist-impl on several processes: open_clip's
    ClipLoss / SigLipLoss (pyclipfast's drop-ins) with those settings, each rank's loss averaged over
    the ranks' gradients as DDP does with open_clip.
    """
    world = runtime.world_size
    if world > 1 and (cfg.local_loss or cfg.gather_with_grad or cfg.siglip_dist_impl is not None):
        if cfg.loss == "clip":
            module = pyclipfast.ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                                         rank=runtime.rank, world_size=world, backend=cfg.backend)
        else:
            module = pyclipfast.SigLipLoss(rank=runtime.rank, world_size=world, dist_impl=cfg.siglip_dist_impl,
                                           backend=cfg.backend)

        def open_clip_loss(model, image_features, text_features, image_ids, text_ids):
            bias = model.logit_bias if cfg.loss == "siglip" else None
            return global_term(module(image_features, text_features, model.logit_scale.exp(), bias), world)
        return open_clip_loss

    def loss(model, image_features, text_features, image_ids, text_ids):
        scale = model.logit_scale.exp()
        if cfg.loss == "clip":
            return pcf_dist.clip_loss(image_features, text_features, scale, image_ids=image_ids, text_ids=text_ids,
                                      backend=cfg.backend)
        return pcf_dist.siglip_loss(image_features, text_features, scale, model.logit_bias, image_ids=image_ids,
                                    text_ids=text_ids, backend=cfg.backend)
    return loss


def encode_features(towers: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                    precision: str) -> list[torch.Tensor]:
    """L2-normalised features of `towers(**inputs)`: the towers under autocast, the normalisation after it.

    CUDA autocast runs F.normalize in fp32 (CPU autocast does not), so normalising inside it would
    hand the loss fp32 features under --precision bf16 on GPUs: twice the gather traffic and fp32
    kernels. Outside it, the features keep the towers' output dtype on every device.
    """
    with autocast_context(device, precision):
        features = towers(**inputs)
    return [F.normalize(f, dim=-1) for f in features]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for the batch transform of `step`, independent of the global RNG."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 1)


class _Run:
    """State of one training run (built by `train`)."""

    def __init__(self, cfg: TrainConfig, hooks: Hooks, runtime: Runtime,
                 echo: Callable[[str], None] = print) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.out = Path(cfg.output_dir)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.weights_path = self.out / WEIGHTS_NAME
        seed_everything(cfg.seed)
        self.model = create_model(cfg.model, cfg.loss, runtime.device, cfg.pretrained)
        prepare_model(self.model, cfg)
        check_chunking(self.model, cfg, runtime)
        self.tokenizer = create_tokenizer(cfg.model)
        size = image_size(self.model)
        self.data = build_train_data(cfg, self.tokenizer, size, runtime)
        self.batches_per_epoch = self.data.batches_per_epoch
        if cfg.epochs is not None:
            if self.batches_per_epoch is None:
                raise UsageError("--epochs: webdataset shards have no length; give --train-num-samples (samples per "
                                 "epoch) too")
            cfg = self.cfg = dataclasses.replace(cfg, steps=cfg.epochs * self.batches_per_epoch)
            if cfg.stop_at is not None and not 0 < cfg.stop_at <= cfg.steps:
                raise UsageError(f"--stop-at must be in [1, {cfg.steps}] (--epochs {cfg.epochs}); got {cfg.stop_at}")
        if cfg.save_frequency and self.batches_per_epoch is None:
            raise UsageError("--save-frequency counts epochs: with webdataset shards give --train-num-samples too")
        self.hooks = merge_hooks(build_methods(cfg, self.model, self.tokenizer, self.data, runtime, echo), hooks)
        self.evaluations = self._evaluations(size)
        self.fsdp = cfg.fsdp and runtime.world_size > 1
        if self.fsdp:
            check_fsdp(self.hooks, cfg)
        # Before the optimizer: FSDP2 replaces the parameters with sharded ones.
        self.ddp = sharded_towers(self.model, runtime) if self.fsdp else distributed_towers(self.model, runtime)
        parameters = param_groups(self.model, cfg.weight_decay, self.hooks.modules.values())
        self.optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg, self.batches_per_epoch))
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=cfg.precision == "fp16")
        self.loss = contrastive_loss(cfg, runtime)
        self.towers = torch.compile(self.ddp, backend=COMPILE_BACKEND) if cfg.torchcompile else self.ddp
        self.encoders = self._encoders()
        if runtime.world_size > 1:  # dropout and other draws of the step differ per rank (the model is built alike)
            seed_everything(cfg.seed * 1_000_003 + runtime.rank)
        self.trained_parameters = [p for module in (self.model, *self.hooks.modules.values())
                                   for p in module.parameters() if p.requires_grad]
        self.hooks_see_batch = bool(self.hooks.batch_transform or self.hooks.loss or self.hooks.loss_terms)
        self.csv_data = dataset_type(cfg) == "csv"
        self.progress = Progress()
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def _evaluations(self, size: int) -> list:
        evaluations = []
        if dataset_type(self.cfg) == "synthetic":
            scenes = synthetic_split(self.cfg, "val", size)
            caption = caption_choice(self.cfg.caption)
            evaluations.append(SyntheticEvaluation(scenes, self.tokenizer, caption, self.cfg.backend))
            evaluations.append(AttributeProbe(scenes, self.tokenizer))
        pairs = real_val_pairs(self.cfg, self.tokenizer, size)
        if pairs is not None:
            evaluations.append(PairRetrievalEvaluation(pairs, self.cfg.backend))
        return evaluations

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Continue from --resume. Rank 0 decides and reads the checkpoint, every rank gets its content
        (an output folder local to rank 0's node still resumes every rank, from the same state)."""
        automatic = self.cfg.resume in ("auto", "latest")  # checkpoint.pt is always the newest save
        path = self.checkpoint_path if automatic else Path(self.cfg.resume)
        found: Any = None
        if self.runtime.is_main:
            try:
                found = None if automatic and not path.is_file() else load_checkpoint(path, self.runtime.device)
                if found is not None:
                    check_compatible(found["config"], self.cfg.to_dict())
            except UsageError as error:  # every rank stops with rank 0's reason
                found = error
        found = broadcast_object(found, self.runtime)
        if isinstance(found, UsageError):
            raise found
        if found is None:
            return  # nothing to resume: start afresh
        self.progress = restore(found, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                modules=self.hooks.modules, scaler=self.scaler, rank=self.runtime.rank)
        if self.progress.step > self.cfg.steps:
            raise UsageError(f"--resume: the checkpoint is at step {self.progress.step}, past --steps {self.cfg.steps}")

    # ------------------------------------------------------------------ one step

    def _encoders(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per tower: (inputs) → L2-normalised features, through `self.towers` (DDP on several processes).

        The towers run under autocast; the normalisation runs after it, so the features keep the
        towers' output dtype — bf16 under --precision bf16 on CUDA as on the CPU (CUDA autocast
        would run F.normalize in fp32) — and the loss, its gather and its kernels get bf16.
        """
        return [partial(self._encode, "images"), partial(self._encode, "tokens")]

    def _encode(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        return encode_features(self.towers, {tower: inputs}, self.runtime.device, self.cfg.precision)[0]

    def _encode_both(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Both towers in one forward (one DDP forward per backward when nothing is chunked)."""
        return encode_features(self.towers, {"images": inputs[0], "tokens": inputs[1]}, self.runtime.device,
                               self.cfg.precision)

    def train_step(self, batch: TokenizedBatch) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step on `batch` (this rank's shard); returns the loss terms (tensors) and the step's lr."""
        step = self.progress.step + 1
        world = self.runtime.world_size
        if world > 1 and self.csv_data:
            batch = trim_to_common_size(batch, self.runtime)
        global_batch = gather_batch(batch, self.runtime) if world > 1 and self.hooks_see_batch else batch
        if self.hooks.batch_transform is not None:  # on the global batch: the draws of one process
            global_batch = self.hooks.batch_transform(global_batch, step_generator(self.cfg.seed, step))
            batch = shard_of(global_batch, self.runtime)
        batch = batch.to(self.runtime.device)
        global_batch = global_batch.to(self.runtime.device) if world > 1 and self.hooks_see_batch else batch

        def hook_context(image_features, text_features) -> tuple[LossContext, Callable[[dict], dict]]:
            """What the hooks see (the global batch) and how their terms enter this rank's loss."""
            if world == 1:
                return LossContext(image_features, text_features, batch, self.model, step), lambda parts: parts
            context = LossContext(all_gather_with_grad(image_features), all_gather_with_grad(text_features),
                                  global_batch, self.model, step, local_batch=batch, gather=gather_rows)
            return context, lambda parts: {name: global_term(value, world) for name, value in parts.items()}

        def loss_fn(image_features, text_features):
            if self.hooks.loss is not None or self.hooks.loss_terms:
                context, scaled = hook_context(image_features, text_features)
            if self.hooks.loss is not None:
                parts = scaled(self.hooks.loss(context))
            else:
                parts = {"contrastive": self.loss(self.model, image_features, text_features, batch.image_ids,
                                                  batch.text_ids)}
            for term in self.hooks.loss_terms:
                parts.update(scaled(term(context)))
            total = sum(parts.values())
            # W·loss: DDP averages the ranks' gradients, each rank holds its share of the global loss's gradient.
            # fp16: the scaler's multiple is back-propagated; the loss itself is logged.
            backward = self.scaler.scale(total * world if world > 1 else total)
            return backward, (total.detach(), {name: value.detach() for name, value in parts.items()})

        self.optimizer.zero_grad(set_to_none=True)
        _, (loss, terms) = grad_cache_step(
            self.encoders, [batch.images, batch.tokens], loss_fn, self.cfg.chunk_size, joint=self._encode_both,
            no_sync=self._no_sync() if world > 1 else None,
            trainable=[not self.cfg.lock_image, not self.cfg.lock_text])
        average_scales(self.model, self.runtime)
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.trained_parameters, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves on)
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient is not finite (every rank alike)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():  # open_clip's clamp: the temperature never exceeds 100
            self.model.logit_scale.clamp_(0, math.log(100))
        if self.hooks.after_step is not None:
            self.hooks.after_step(self.model, step)
        values = {"loss": loss, **{f"loss/{name}": value for name, value in terms.items() if len(terms) > 1}}
        return values, lr  # tensors: read (a host sync) only when logged

    def _no_sync(self) -> Callable[[], Any]:
        """The context factory under which gradient caching's backward passes skip the gradient sync."""
        return partial(fsdp_no_sync, self.model) if self.fsdp else self.ddp.no_sync

    # ------------------------------------------------------------------ evaluation, saving

    def evaluate(self) -> dict[str, float]:
        chunk = self.cfg.chunk_size or self.cfg.batch_size // self.runtime.world_size
        return evaluate(self.model, self.evaluations, self.runtime.device, self.cfg.precision,
                        batch_size=max(64, min(chunk, 1024)))

    def save(self) -> None:
        """The resumable checkpoint.pt and, beside it, the weights open_clip loads (open_clip_weights.pt)."""
        rng = gather_objects(rng_states(), self.runtime)  # every rank's generators (per-rank dropout streams)
        model_state = optimizer_state = None
        if self.fsdp:  # the whole tensors, gathered by every rank: the checkpoint loads in one process
            model_state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
            optimizer_state = full_state(self.optimizer.state_dict())
        if self.runtime.is_main:
            save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, progress=self.progress, config=self.cfg.to_dict(),
                            modules=self.hooks.modules, scaler=self.scaler, rng_per_rank=rng,
                            model_state=model_state, optimizer_state=optimizer_state)
            export_weights(self.weights_path, self.model, model_state)

    def save_epoch(self, epoch: int) -> None:
        """--save-frequency: keep checkpoint.pt (just written) as epoch_K.pt; drop the previous one if asked."""
        if not self.runtime.is_main:
            return
        kept = self.out / f"epoch_{epoch}.pt"
        shutil.copyfile(self.checkpoint_path, kept)
        if self.cfg.delete_previous_checkpoint:
            for older in self.out.glob("epoch_*.pt"):
                if older != kept:
                    older.unlink()

    def batches(self):
        """(batch) forever, epoch after epoch, starting where the progress says."""
        while True:
            produced = 0
            for batch in self.data.epoch(self.progress.epoch, start=self.progress.batch_in_epoch):
                produced += 1
                yield batch
            if produced == 0 and self.progress.batch_in_epoch == 0:
                raise UsageError(f"--train-data: not one full batch of {self.cfg.batch_size} in an epoch")
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0


# Where stderr is not a terminal (a log file, a job scheduler), progress is a line this often.
PROGRESS_SECONDS = 30.0


class ProgressLines:
    """tqdm's interface for logs: a plain line every PROGRESS_SECONDS (and at the last step), no carriage returns."""

    def __init__(self, total: int, initial: int, echo: Callable[[str], None]) -> None:
        self.total, self.n, self.echo = total, initial, echo
        self.start = self.last = time.perf_counter()
        self.postfix: dict[str, str] = {}

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = values

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS or self.n == self.total:
            self.last = now
            values = "".join(f", {name} {value}" for name, value in self.postfix.items())
            self.echo(f"train: step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), "
                      f"{now - self.start:.0f} s{values}")

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, echo: Callable[[str], None]):
    """A tqdm bar on a terminal, ProgressLines in a log, a disabled tqdm when `enabled` is False."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, initial, echo)
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


# On a CPU the demo's batch is small enough that the N×N logits are a few MB; one larger batch
# shows how the two losses scale (open_clip needs ≈ 1 GB there, still fine on a laptop).
CPU_MEMORY_BATCH = 8192


def loss_memory_rows(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """Peak memory of the loss, pyclipfast against open_clip, at this process's batch (and 8192 on a CPU)."""
    dim = model_config(resolve_model_name(cfg.model))["embed_dim"]
    batch = cfg.batch_size // runtime.world_size
    batches = [batch] + ([CPU_MEMORY_BATCH] if runtime.device.type == "cpu" and batch < CPU_MEMORY_BATCH else [])
    rows = [{"batch": n, **compare_loss_memory(cfg.loss, n, dim, runtime.device, cfg.backend)} for n in batches]
    return {"dim": dim, "method": memory_method(runtime.device), "rows": rows}


# torch.compile's backend for --torchcompile (the tests swap in "eager" to keep compile time out of CI).
COMPILE_BACKEND = "inductor"


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """--grad-checkpointing, --lock-image, --lock-text: open_clip's own switches on the model."""
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)


def check_fsdp(hooks: Hooks, cfg: TrainConfig) -> None:
    """--fsdp trains the plain CLIP/SigLIP step: the methods' hooks read the model's parameters whole."""
    if hooks.batch_transform or hooks.loss or hooks.loss_terms or hooks.after_step or hooks.modules:
        raise UsageError("--fsdp trains the plain CLIP/SigLIP step; the training methods (--clipc-rate, --clipin, "
                         "--teacher, ...) read the model's parameters whole: run them without --fsdp")
    if cfg.torchcompile:
        raise UsageError("--fsdp with --torchcompile is not supported; drop one of them")


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> None:
    """torch's clip_grad_norm_, also over a mix of FSDP2-sharded (DTensor) and whole gradients."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()]
    if whole:
        norms.append(torch.nn.utils.get_total_norm(whole).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)


def check_chunking(model: torch.nn.Module, cfg: TrainConfig, runtime: Runtime) -> None:
    """Refuse gradient caching for a model with BatchNorm: chunks would be normalised by their own statistics.

    Re-encoding a batch in chunks reproduces it exactly only when every layer treats samples
    independently; BatchNorm's batch statistics differ per chunk, so the loss and gradients would
    not be those of the whole batch (RN50: a different loss and vision gradients far apart).
    """
    per_rank = cfg.batch_size // runtime.world_size
    if cfg.chunk_size is None or cfg.chunk_size >= per_rank:
        return
    norms = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise UsageError(f"--chunk-size {cfg.chunk_size}: {cfg.model} has BatchNorm layers ({norms[0]}, ... "
                         f"{len(norms)} in all), whose batch statistics differ per chunk, so gradient caching would "
                         f"not compute the step of the whole batch; train it without --chunk-size (or with a chunk "
                         f"of at least the per-process batch, {per_rank}), or choose a model without BatchNorm (ViT)")


def check_output_dir(path: Path) -> None:
    """Create --output-dir and make sure a file can be written there, before anything else runs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"--output-dir {path}: cannot write there ({error.strerror or error})") from error


def check_backend(backend: str, device: torch.device) -> None:
    """--backend triton/cuda need a CUDA device (the Triton interpreter, TRITON_INTERPRET=1, aside)."""
    if device.type == "cuda":
        return
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        raise UsageError(f"--backend {backend} runs on CUDA devices and this run is on the {device.type}; "
                         f"use --backend auto or torch")


def train(cfg: TrainConfig, hooks: Optional[Hooks] = None, *, echo: Callable[[str], None] = print) -> TrainResult:
    """Run the training `cfg` describes; returns the evaluations, paths and counts (main process values)."""
    check_config(cfg)
    cfg = with_method_defaults(cfg)
    resolve_model_name(cfg.model)
    if cfg.resume not in (None, "auto", "latest") and not Path(cfg.resume).is_file():
        raise UsageError(f"--resume: no checkpoint at {cfg.resume}")
    check_output_dir(Path(cfg.output_dir))
    runtime = setup_runtime(cfg.device)
    check_backend(cfg.backend, runtime.device)
    if runtime.is_main:
        echo = tee(echo, Path(cfg.output_dir) / "out.log")
    note = choose_threads(cfg.threads, runtime.device)
    if note is not None and runtime.is_main:
        echo(note)
    try:
        return _train(cfg, hooks or Hooks(), runtime, echo if runtime.is_main else (lambda _: None))
    finally:
        teardown_runtime(runtime)


def write_params(path: Path, cfg: TrainConfig) -> None:
    """params.txt as open_clip writes it: one `name: value` line per setting, sorted."""
    text = "".join(f"{name}: {value}\n" for name, value in sorted(cfg.to_dict().items()))
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def tee(echo: Callable[[str], None], path: Path) -> Callable[[str], None]:
    """`echo` that also appends each message to the log file `path`."""
    def both(message: str) -> None:
        echo(message)
        with open(path, "a", encoding="utf-8") as file:
            file.write(message + "\n")
    return both


def tensorboard_writer(cfg: TrainConfig, out: Path):
    """--report-to tensorboard: a SummaryWriter in OUTPUT_DIR/tensorboard (None otherwise)."""
    if cfg.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError(f"--report-to tensorboard needs the tensorboard package: pip install tensorboard ({error})") \
            from error
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _records_writer(log: Optional[MetricsLog], board) -> Callable[[dict[str, Any]], None]:
    """Write a metrics record to metrics.jsonl and, with TensorBoard, its numbers as scalars."""
    def write(record: dict[str, Any]) -> None:
        if log is None:
            return
        log.write(record)
        if board is not None:
            prefix = "train/" if record["kind"] == "train" else ""
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("step", "kind"):
                    board.add_scalar(prefix + name, value, record["step"])
            board.flush()
    return write


def _train(cfg: TrainConfig, hooks: Hooks, runtime: Runtime, echo: Callable[[str], None]) -> TrainResult:
    start_time = time.perf_counter()
    run = _Run(cfg, hooks, runtime, echo)
    cfg = run.cfg  # --epochs has set --steps
    if cfg.resume is not None:
        run.resume()
    resumed_at = run.progress.step if cfg.resume is not None else None
    run.out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run.out / "metrics.jsonl", resume_step=resumed_at) if runtime.is_main else None
    board = tensorboard_writer(cfg, run.out) if runtime.is_main else None
    write = _records_writer(log, board)
    if runtime.is_main:
        write_params(run.out / "params.txt", cfg)
    chunks = "" if cfg.chunk_size is None else f", chunks of {cfg.chunk_size}"
    echo(f"pyclipfast.train: {cfg.model} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M params), "
         f"{cfg.loss} loss, batch {cfg.batch_size}{chunks}, {cfg.steps} steps on {runtime.device}"
         f"{f' x{runtime.world_size}' if runtime.world_size > 1 else ''}{' sharded (FSDP2)' if run.fsdp else ''}, "
         f"{cfg.precision}; output in {run.out}")
    if resumed_at:
        echo(f"resumed from step {resumed_at} (epoch {run.progress.epoch}, batch {run.progress.batch_in_epoch})")

    if run.progress.step == 0 and cfg.eval_at_start and run.evaluations:
        run.first_eval = run.evaluate()
        write({"kind": "eval", "step": 0, **run.first_eval})

    stop = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    bar = progress_bar(stop, run.progress.step, cfg.progress and runtime.is_main, echo)
    batches = run.batches()
    since, steps_since = time.perf_counter(), 0  # throughput over the steps between two logs
    while run.progress.step < stop:
        values, lr = run.train_step(next(batches))
        run.progress.step += 1
        run.progress.batch_in_epoch += 1
        steps_since += 1
        step = run.progress.step
        if step % cfg.log_every == 0 or step == stop:  # the only host syncs of a step: every --log-every
            numbers = {name: float(value) for name, value in values.items()}
            now = time.perf_counter()
            samples_per_s = all_reduce_mean(cfg.batch_size * steps_since / (now - since), runtime)
            since, steps_since = now, 0
            bar.set_postfix(loss=f"{numbers['loss']:.4f}", samples_per_s=f"{samples_per_s:.0f}", refresh=False)
            write({"kind": "train", "step": step, "epoch": run.progress.epoch, **numbers, "lr": lr,
                   "logit_scale": run.model.logit_scale.exp().item(),
                   "samples_per_s": samples_per_s, "skipped": run.data.skipped})
        bar.update(1)
        if run.evaluations and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            run.last_eval = run.evaluate()
            write({"kind": "eval", "step": step, **run.last_eval})
        epoch_done = run.batches_per_epoch is not None and run.progress.batch_in_epoch == run.batches_per_epoch
        keep_epoch = cfg.save_frequency and epoch_done and (run.progress.epoch + 1) % cfg.save_frequency == 0
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop or keep_epoch:
            run.save()
        if keep_epoch:
            run.save_epoch(run.progress.epoch + 1)
    bar.close()
    if board is not None:
        board.close()
    if not run.last_eval and run.evaluations and run.progress.step == cfg.steps:
        run.last_eval = run.evaluate()  # resumed at the very end: nothing left to train

    if not run.first_eval and log is not None:
        first = [r for r in log.records() if r["kind"] == "eval" and r["step"] == 0]
        run.first_eval = {k: v for k, v in first[0].items() if "/" in k} if first else {}
    plots = plot_metrics(log.records(), run.out) if (cfg.plots and log is not None) else []
    loss_memory = None
    if cfg.compare_memory and runtime.is_main:
        loss_memory = loss_memory_rows(cfg, runtime)
    skipped = run.data.skipped
    if skipped:
        echo(f"skipped {skipped} unreadable sample(s) (see the warnings above)")
    return TrainResult(config=cfg, first_eval=run.first_eval, last_eval=run.last_eval, step=run.progress.step,
                       output_dir=run.out, checkpoint=run.checkpoint_path if run.checkpoint_path.is_file() else None,
                       metrics_path=run.out / "metrics.jsonl", plots=plots, skipped=skipped,
                       seconds=time.perf_counter() - start_time, loss_memory=loss_memory, is_main=runtime.is_main,
                       weights=run.weights_path if run.weights_path.is_file() else None)
