"""Training batches: the built-in synthetic scenes or real data, tokenized, sharded and resumable.

    data = build_train_data(cfg, tokenizer, image_size, runtime)
    for batch in data.epoch(epoch, start=k):     # this rank's batches of `epoch`, from batch k on
        batch.images, batch.tokens, batch.image_ids, batch.text_ids

The order of an epoch is a pure function of (seed, epoch) and the batches are cut from it
before they are split over the ranks, so a run resumed at (epoch, k) sees exactly the batches
an uninterrupted run would have seen, and every rank's shard is disjoint from the others'.
Webdataset shards are streamed (split over ranks and workers by webdataset); resuming replays
the epoch's stream up to batch k.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, Optional

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors with ForkingPickler)
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .config import TrainConfig, UsageError, caption_choice, parse_rates
from .data import (
    CaptionNoise, CsvCaptions, ResizeCropNormalize, SyntheticClipDataset, SyntheticScenes, WebDatasetCaptions,
    collate_clip, drop_unreadable,
)
from .runtime import Runtime

Tokenizer = Callable[[list[str]], torch.Tensor]


class _NoExtra(Mapping):
    """The empty, read-only `extra` of a batch no transform has touched (picklable, unlike a mappingproxy)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


NO_EXTRA: Mapping[str, torch.Tensor] = _NoExtra()


class TokenizedBatch(NamedTuple):
    """Images (B, 3, H, W), tokens (T, L), and positive ids (None: text i belongs to image i).

    texts: the T caption strings the tokens encode (batch transforms and teachers re-tokenize them).
    extra: tensors the batch transforms add for the loss terms, e.g. CLIPin's second views, or
        "altered" (B,) bool: images that are no longer their dataset sample (composites, views).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    image_ids: Optional[torch.Tensor]
    text_ids: Optional[torch.Tensor]
    texts: Optional[tuple[str, ...]] = None
    extra: Mapping[str, torch.Tensor] = NO_EXTRA

    def to(self, device: torch.device) -> "TokenizedBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return self._replace(images=move(self.images), tokens=move(self.tokens), image_ids=move(self.image_ids),
                             text_ids=move(self.text_ids), extra={k: move(v) for k, v in self.extra.items()})


class SyntheticCollate:
    """collate_clip, then the tokenizer: ids are the dataset indices (several captions → several positives)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples) -> TokenizedBatch:
        batch = collate_clip(samples)
        return TokenizedBatch(batch.images, self.tokenizer(batch.texts), batch.image_ids, batch.text_ids,
                              tuple(batch.texts))


class PairCollate:
    """(image tensor, caption) pairs of real data: one caption per image, the diagonal positives.

    Unreadable rows (None from CsvCaptions) are dropped, so such a batch is smaller.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[Optional[tuple[torch.Tensor, str]]]) -> TokenizedBatch:
        samples = drop_unreadable(samples)
        if not samples:
            raise UsageError("--train-data: no image of a whole batch could be read (see the warnings above)")
        images = torch.stack([image for image, _ in samples])
        texts = tuple(caption for _, caption in samples)
        return TokenizedBatch(images, self.tokenizer(list(texts)), None, None, texts)


class WorkerCollate:
    """A collate function that, in a DataLoader worker, checks that its batch can reach the main process.

    A worker hands its batch to a queue whose feeder thread pickles it; an object that cannot be
    pickled there is dropped with a printed traceback and the main process waits forever. Pickling
    it here with the same pickler (tensors move to shared memory once, as they would anyway) turns
    that into an exception in the worker, which the DataLoader re-raises in the main process.
    """

    def __init__(self, collate: Callable[[Any], TokenizedBatch]) -> None:
        self.collate = collate

    def __call__(self, samples) -> TokenizedBatch:
        batch = self.collate(samples)
        if get_worker_info() is not None:
            ForkingPickler.dumps(batch)
        return batch


class EpochBatches(Sampler[list[int]]):
    """This rank's index batches of one epoch, from batch `start` on.

    The epoch is a permutation of range(size) drawn from (seed, epoch), cut into global batches
    of `batch_size` (the incomplete last one is dropped); rank r takes the r-th of `world_size`
    equal slices of each.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UsageError(f"--batch-size {batch_size} must be divisible by the number of processes {world_size}")
        if size < batch_size:
            raise UsageError(f"--batch-size {batch_size} is larger than the training set ({size} samples)")
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.start, self.rank, self.per_rank = start, rank, batch_size // world_size

    def __len__(self) -> int:
        return max(0, self.size // self.batch_size - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        for batch in range(self.start, self.size // self.batch_size):
            first = batch * self.batch_size + self.rank * self.per_rank
            yield order[first:first + self.per_rank].tolist()


@dataclass
class TrainData:
    """Resumable epochs of tokenized batches for one rank."""

    dataset: Dataset
    collate: Callable[[Any], TokenizedBatch]
    batch_size: int
    runtime: Runtime
    seed: int
    workers: int
    num_samples: Optional[int] = None  # --train-num-samples: the samples of one epoch

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Global batches in one epoch (None for a stream of unknown length)."""
        if isinstance(self.dataset, IterableDataset):
            return None if self.num_samples is None else self.num_samples // self.batch_size
        return min(len(self.dataset), self.num_samples or len(self.dataset)) // self.batch_size

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped so far (real data), over all DataLoader workers of this rank."""
        counter = getattr(self.dataset, "skipped", None)
        return 0 if counter is None else counter.value

    def epoch(self, epoch: int, start: int = 0) -> Iterator[TokenizedBatch]:
        """This rank's batches of `epoch`, from batch `start` on."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # The loader's own generator seeds its workers: creating it must not draw from the global
        # RNG, or a run resumed mid-epoch would drift from the uninterrupted one.
        common = dict(collate_fn=WorkerCollate(self.collate), num_workers=self.workers,
                      pin_memory=self.runtime.device.type == "cuda",
                      generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if isinstance(self.dataset, IterableDataset):
            loader = DataLoader(self.dataset, batch_size=self.batch_size // self.runtime.world_size,
                                drop_last=True, **common)
            batches = iter(loader)
            for _ in range(start):  # replay the stream up to where the interrupted run stopped
                next(batches, None)
            yield from itertools.islice(batches, None if self.num_samples is None else self.batches_per_epoch - start)
            return
        sampler = EpochBatches(len(self.dataset), self.batch_size, seed=self.seed, epoch=epoch, start=start,
                               rank=self.runtime.rank, world_size=self.runtime.world_size)
        yield from itertools.islice(DataLoader(self.dataset, batch_sampler=sampler, **common),
                                    max(0, self.batches_per_epoch - start))


def dataset_type(cfg: TrainConfig) -> str:
    """The kind of training data: synthetic, csv or webdataset."""
    if cfg.dataset_type != "auto":
        return cfg.dataset_type
    if cfg.train_data is None:
        return "synthetic"
    return "webdataset" if ".tar" in cfg.train_data or "::" in cfg.train_data else "csv"


def _real_dataset(path: str, kind: str, cfg: TrainConfig, image_size: int, flag: str) -> Dataset:
    """A CsvCaptions or WebDatasetCaptions reader; errors name the flag they come from."""
    transform = ResizeCropNormalize(image_size)
    try:
        if kind == "csv":
            return CsvCaptions(path, transform, sep=cfg.csv_separator, img_key=cfg.csv_img_key,
                               caption_key=cfg.csv_caption_key)
        training = flag == "--train-data"
        return WebDatasetCaptions(path, transform, shuffle_buffer=1_000 if training else 0, seed=cfg.seed,
                                  split_by_node=training, resampled=training and cfg.dataset_resampled)
    except (FileNotFoundError, ValueError, OSError) as error:
        message = str(error)
        for argument, option in (("img_key", "--csv-img-key"), ("caption_key", "--csv-caption-key")):
            message = message.replace(f"{argument}:", f"{option}:")
        raise UsageError(f"{flag} {path!r}: {message}") from error


def caption_noise(cfg: TrainConfig) -> Optional[CaptionNoise]:
    """The misalignment of --omit / --perturb (None without them)."""
    if cfg.omit is None and cfg.perturb is None:
        return None
    return CaptionNoise(omit=parse_rates("--omit", cfg.omit), perturb=parse_rates("--perturb", cfg.perturb))


def synthetic_split(cfg: TrainConfig, split: str, image_size: int) -> SyntheticScenes:
    """The synthetic split used for training ("train", with the caption noise) or evaluation ("val", faithful)."""
    size = cfg.train_size if split == "train" else cfg.val_size
    noise = caption_noise(cfg) if split == "train" else None
    return SyntheticScenes(split, size, seed=cfg.seed, image_size=image_size, caption_noise=noise,
                           cache_images=split == "val")


def build_train_data(cfg: TrainConfig, tokenizer: Tokenizer, image_size: int, runtime: Runtime) -> TrainData:
    """The training batches of `cfg`: synthetic scenes by default, else the CSV or shards of --train-data."""
    kind = dataset_type(cfg)
    if kind == "synthetic":
        scenes = synthetic_split(cfg, "train", image_size)
        dataset = SyntheticClipDataset(scenes, captions=caption_choice(cfg.caption))
        collate = SyntheticCollate(tokenizer)
    else:
        dataset = _real_dataset(cfg.train_data, kind, cfg, image_size, "--train-data")
        collate = PairCollate(tokenizer)
    if cfg.batch_size % runtime.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                         f"{runtime.world_size}")
    if isinstance(dataset, WebDatasetCaptions) and not dataset.resampled and len(dataset.shards) < runtime.world_size:
        # Every rank sees the same shard list and stops here with the same message: none is left waiting.
        raise UsageError(f"--train-data {cfg.train_data!r}: {len(dataset.shards)} shard(s) for {runtime.world_size} "
                         f"processes; each process reads whole shards of its own, so split the data into at least "
                         f"{runtime.world_size} shards, or draw them with --dataset-resampled")
    if not isinstance(dataset, IterableDataset) and len(dataset) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(dataset)} samples)")
    return TrainData(dataset, collate, cfg.batch_size, runtime, cfg.seed, cfg.workers, cfg.train_num_samples)


def real_val_pairs(cfg: TrainConfig, tokenizer: Tokenizer, image_size: int) -> Optional[DataLoader]:
    """Batches of the --val-data pairs for retrieval evaluation (None without --val-data)."""
    if cfg.val_data is None:
        return None
    kind = "webdataset" if ".tar" in cfg.val_data or "::" in cfg.val_data else "csv"
    dataset = _real_dataset(cfg.val_data, kind, cfg, image_size, "--val-data")
    return DataLoader(dataset, batch_size=256, collate_fn=PairCollate(tokenizer), num_workers=cfg.workers)


# ---------------------------------------------------------------------------------------------- several processes

def _concat(parts: Sequence[Any]) -> Any:
    """The per-rank parts of one batch field joined in rank order (None stays None)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return tuple(item for part in parts for item in part)


def gather_batch(batch: TokenizedBatch, runtime: Runtime) -> TokenizedBatch:
    """The global batch, every rank's shard joined in rank order: what one process would hold.

    All fields travel (torch.distributed.all_gather_object): the batch transforms and the methods'
    loss terms need the whole batch, images included, to act as they would in one process.
    """
    if runtime.world_size == 1:
        return batch
    import torch.distributed as dist

    shards: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(shards, batch._replace(extra=dict(batch.extra)))
    fields = {name: _concat([getattr(shard, name) for shard in shards])
              for name in ("images", "tokens", "image_ids", "text_ids", "texts")}
    extra = {key: torch.cat([shard.extra[key] for shard in shards]) for key in shards[0].extra}
    return TokenizedBatch(**fields, extra=extra)


def shard_of(batch: TokenizedBatch, runtime: Runtime) -> TokenizedBatch:
    """This rank's equal slice of a global batch (image rows, text rows; `extra` tensors by their length)."""
    if runtime.world_size == 1:
        return batch
    world, rank = runtime.world_size, runtime.rank
    images, texts = batch.images.shape[0] // world, batch.tokens.shape[0] // world

    def rows(value, per_rank):
        return None if value is None else value[rank * per_rank:(rank + 1) * per_rank]

    def extra_rows(value):  # a tensor per image or per text (equal counts: the same slice)
        return rows(value, images if len(value) == batch.images.shape[0] else texts)

    return TokenizedBatch(rows(batch.images, images), rows(batch.tokens, texts), rows(batch.image_ids, images),
                          rows(batch.text_ids, texts), rows(batch.texts, texts),
                          {key: extra_rows(value) for key, value in batch.extra.items()})


def trim_to_common_size(batch: TokenizedBatch, runtime: Runtime) -> TokenizedBatch:
    """The first k pairs of a one-caption-per-image batch, k the smallest batch over the ranks.

    A CSV batch loses its unreadable rows; the global batch must still split evenly over the ranks.
    """
    if runtime.world_size == 1:
        return batch
    import torch.distributed as dist

    count = torch.tensor([batch.images.shape[0]], dtype=torch.int64, device=runtime.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    k = int(count)
    if k == batch.images.shape[0]:
        return batch
    return batch._replace(images=batch.images[:k], tokens=batch.tokens[:k], texts=batch.texts[:k])
