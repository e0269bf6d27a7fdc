"""Helpers shared by the trainer tests: a tiny run's config, image files on disk."""
import io

import numpy as np
from PIL import Image

from pyclipfast.train import TrainConfig


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
