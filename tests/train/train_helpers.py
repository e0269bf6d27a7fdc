"""Helpers shared by the trainer tests: a tiny run's config, image files on disk."""
import io
import multiprocessing
import os
import socket
import tarfile

import numpy as np
import torch
from PIL import Image

from pyclipfast.train import TrainConfig, train


def micro(tmp_path, **overrides) -> TrainConfig:
    """A run of the 32×32 test model on a small synthetic split."""
    settings = dict(model="pcf-micro-32", device="cpu", train_size=512, val_size=64, batch_size=64,
                    chunk_size=16, steps=4, lr=3e-3, warmup=2, output_dir=str(tmp_path / "run"),
                    progress=False, plots=False, eval_at_start=False, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def write_images(folder, count, corrupt=()):
    """`count` small PNGs (index i in `corrupt`: a truncated file instead)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), 20 * i % 255, dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        path.write_bytes(data[:30] if i in corrupt else data)
        paths.append(path)
    return paths


def write_shards(folder, shards, per_shard, caption=lambda i: "a grey square"):
    """Webdataset shards shard-<k>.tar of small PNGs (grey levels) with captions (`caption(i)` for sample i)."""
    paths = write_images(folder / "images", shards * per_shard)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                for name, data in ((f"{i:04d}.png", paths[i].read_bytes()), (f"{i:04d}.txt", caption(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _rank_main(rank: int, world_size: int, port: int, settings: dict, errors) -> None:
    """One torchrun-like process: the environment torchrun would set, then train()."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**settings))
    except BaseException as error:  # report to the parent instead of dying silently
        errors.put(f"rank {rank}: {error!r}")


def run_on_ranks(config: TrainConfig, world_size: int, timeout: float = 240,
                 per_rank: dict | None = None) -> list[str]:
    """Train `config` on `world_size` forked gloo processes; returns their errors and non-zero exit codes.

    per_rank: {rank: {field: value}}, settings that differ on that rank (e.g. a node-local output folder).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    settings = [{**config.to_dict(), **(per_rank or {}).get(rank, {})} for rank in range(world_size)]
    ranks = [context.Process(target=_rank_main, args=(rank, world_size, port, settings[rank], errors))
             for rank in range(world_size)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=timeout)
    alive = [p for p in ranks if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {timeout} s"
    messages = [f"rank {rank}: exit code {p.exitcode}" for rank, p in enumerate(ranks) if p.exitcode != 0]
    while not errors.empty():
        messages.append(errors.get())
    return messages
