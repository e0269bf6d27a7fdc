"""Readers for real image–caption data: open_clip's CSV format and webdataset tar shards.

Both yield (image, caption) with the user's image transform applied to an RGB PIL image, and
never crash on bad data: an unreadable image (or, in shards, a sample without image or
caption, or an unreadable tar member or shard) is skipped, logged and counted in
`reader.skipped.value`, a counter shared with DataLoader worker processes.

    CsvCaptions: map-style. A row whose image cannot be read gives None, which the trainer's
        collate functions drop (`drop_unreadable`); its warning is logged once.
    WebDatasetCaptions: iterable. Unreadable samples are dropped from the stream; shards are
        split across distributed ranks and DataLoader workers.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import webdataset as wds
from PIL import Image
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# What a missing, truncated, corrupt or oversized image (PIL) or a bad caption (utf-8, json) raises.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

ImageTransform = Callable[[Image.Image], Any]


class SkipCounter:
    """Counts skipped data across the processes that inherit it (DataLoader workers, fork or spawn)."""

    def __init__(self) -> None:
        self._count = multiprocessing.Value("q", 0)

    def add(self, reason: str | None = None) -> None:
        """Count one skipped sample (or unreadable shard) and log why (None: the caller logs)."""
        with self._count.get_lock():
            self._count.value += 1
        if reason is not None:
            logger.warning("skipped: %s", reason)

    @property
    def value(self) -> int:
        """The number of skips so far, in all processes."""
        return int(self._count.value)


def load_rgb(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Open and fully decode an image file (path or encoded bytes) as RGB."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.convert("RGB")


PROBED_ROWS = 16  # rows whose image paths decide how relative paths resolve


def resolve_image_paths(paths: Sequence[str], csv_path: Path) -> tuple[list[str], str]:
    """The CSV's image paths resolved as open_clip resolves them, and how they were resolved.

    open_clip opens each path as given: absolute, or relative to the working directory. A CSV
    whose relative paths instead name files beside it (none of the first PROBED_ROWS exists from
    the working directory, some do from the CSV's folder) is resolved against its folder. When
    neither finds a file among the first rows, ValueError names the first path tried and how it
    was resolved, before any training starts.
    """
    probe = list(paths[:PROBED_ROWS])
    if any(os.path.isfile(p) for p in probe):
        return list(paths), "as given (relative to the working directory, as open_clip does)"
    beside = [p if os.path.isabs(p) else str(csv_path.parent / p) for p in paths]
    if any(os.path.isfile(p) for p in beside[:PROBED_ROWS]):
        return beside, f"relative to the CSV's folder {csv_path.parent}"
    first = probe[0]
    raise ValueError(
        f"none of the first {len(probe)} image paths is a file; the first, {first!r}, was tried as given "
        f"({os.path.abspath(first)}, relative to the working directory {os.getcwd()}, as open_clip does) and "
        f"relative to the CSV's folder ({os.path.abspath(beside[0])})"
    )


class CsvCaptions(Dataset[tuple[Any, str] | None]):
    """open_clip's CSV format: one row per (image path, caption).

    Image paths resolve as in open_clip (relative to the working directory), or against the
    CSV's folder when that is where they point (`resolve_image_paths`). A row whose image cannot
    be read gives None (a collate function drops it: a stand-in row could repeat a pair already
    in the batch, a false negative), is counted in `skipped`, and is logged once per row however
    many epochs and workers read it.

    Args:
        path: the CSV/TSV file.
        transform: applied to each RGB PIL image (None: the PIL image itself).
        sep, img_key, caption_key: open_clip's --csv-separator, --csv-img-key, --csv-caption-key.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        transform: ImageTransform | None = None,
        *,
        sep: str = "\t",
        img_key: str = "filepath",
        caption_key: str = "title",
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}")
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        for argument, column in (("img_key", img_key), ("caption_key", caption_key)):
            if column not in table.columns:
                found = f"columns: {list(table.columns)}, sep={sep!r}"
                raise ValueError(f"{argument}: column {column!r} not in {path} ({found})")
        if table.empty:
            raise ValueError(f"CSV file has no rows: {path}")
        self.path = path
        self.images, self.resolution = resolve_image_paths(table[img_key].tolist(), path)
        self.captions = table[caption_key].tolist()
        self.transform = transform
        self.skipped = SkipCounter()
        self._warned = multiprocessing.Array("B", (len(self.images) + 7) // 8, lock=False)

    def __len__(self) -> int:
        return len(self.images)

    def _warn_once(self, index: int, error: Exception) -> None:
        byte, bit = divmod(index, 8)
        if self._warned[byte] & (1 << bit):
            return
        self._warned[byte] |= 1 << bit
        logger.warning("skipped: unreadable image %s (row %d of %s, paths resolved %s): %r", self.images[index],
                       index, self.path, self.resolution, error)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        """(transformed image, caption) of row `index`, or None if its image cannot be read."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        try:
            image = load_rgb(self.images[index])
        except UNREADABLE_ERRORS as error:
            self.skipped.add()
            self._warn_once(index, error)
            return None
        return (image if self.transform is None else self.transform(image)), self.captions[index]


def drop_unreadable(samples: Sequence[Any]) -> list[Any]:
    """The samples of a batch without the None that CsvCaptions gives for an unreadable image."""
    return [sample for sample in samples if sample is not None]


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand a shard pattern ("data/{000..003}.tar", "::"-separated lists allowed) or take a list.

    Local shards must exist (FileNotFoundError names the first missing one); URLs and "pipe:"
    sources are left to webdataset.
    """
    shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not shards:
        raise ValueError(f"urls matched no shard: {urls!r}")
    for shard in shards:
        if "://" not in shard and not shard.startswith("pipe:") and not os.path.isfile(shard):
            raise FileNotFoundError(f"webdataset shard not found: {shard}")
    return shards


def _caption_of(sample: dict[str, Any]) -> str:
    """The caption of a webdataset sample: its "txt" member, or the "caption" of its "json" member."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        metadata = json.loads(sample["json"])
        caption = metadata.get("caption") if isinstance(metadata, dict) else None
        if isinstance(caption, str):
            return caption.strip()
    raise ValueError("no caption (txt, or json with a 'caption' string)")


def _image_of(sample: dict[str, Any]) -> Image.Image:
    """The decoded image of a webdataset sample (first of IMAGE_EXTENSIONS present)."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return load_rgb(sample[extension])
    raise ValueError(f"no image member (one of {IMAGE_EXTENSIONS})")


class WebDatasetCaptions(IterableDataset[tuple[Any, str]]):
    """webdataset shards whose samples hold an image (jpg/jpeg/png/webp) and a caption (txt or json).

    Args:
        urls: a brace pattern ("data/{000..003}.tar") or a list of shard paths/URLs.
        transform: applied to each RGB PIL image (None: the PIL image itself).
        shuffle_buffer: 0 reads shards and samples in order; n > 0 shuffles the shard order and
            samples through a buffer of n, reproducibly from (seed, epoch).
        seed: base seed of the shuffle.
        split_by_node: each torch.distributed rank reads its own shards (training); False: every
            rank reads them all (evaluation on the whole set).
        resampled: open_clip's --dataset-resampled: each rank and worker draws shards with
            replacement, endlessly (an epoch is then --train-num-samples long).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: ImageTransform | None = None,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_node: bool = True,
        resampled: bool = False,
    ) -> None:
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be a non-negative int, got {shuffle_buffer!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.shards = expand_shards(urls)
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split_by_node = split_by_node
        self.resampled = resampled
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle is used."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def _handle(self, error: Exception) -> bool:
        """webdataset error handler: count an unreadable shard or member and go on."""
        self.skipped.add(f"unreadable webdataset data: {error!r}")
        return True

    def _shard_stream(self, rng: random.Random) -> Iterator[dict[str, str]]:
        """This rank's and this worker's shards, as webdataset expects them."""
        if self.resampled:
            worker = get_worker_info()
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            draws = random.Random(f"{self.seed}:{self.epoch}:{rank}:{0 if worker is None else worker.id}")
            while True:
                yield {"url": draws.choice(self.shards)}
        shards = list(self.shards)
        if self.shuffle_buffer:
            rng.shuffle(shards)
        for shard in wds.split_by_worker(wds.split_by_node(shards) if self.split_by_node else shards):
            yield {"url": shard}

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        samples = wds.tarfile_samples(self._shard_stream(rng), handler=self._handle)
        if self.shuffle_buffer:
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            try:
                image, caption = _image_of(sample), _caption_of(sample)
            except UNREADABLE_ERRORS as error:
                self.skipped.add(f"{sample.get('__key__')} in {sample.get('__url__')}: {error!r}")
                continue
            yield (image if self.transform is None else self.transform(image)), caption
