"""`python -m pyclipfast.train` / `pyclipfast-train`: train a CLIP model with pyclipfast's losses.

    python -m pyclipfast.train --preset cpu-demo          # a few minutes on a CPU, built-in data
    python -m pyclipfast.train --train-data data.csv --csv-img-key filepath --csv-caption-key title \\
        --model ViT-B-32 --batch-size 16384 --chunk-size 512 --precision bf16
    torchrun --nproc-per-node 8 -m pyclipfast.train --preset gpu --batch-size 262144
    python -m pyclipfast.train experiments --preset quick   # the methods' results table (experiments.py)
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import TRAIN_EXTRA_HINT


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:  # the trainer's dependencies (open_clip, Pillow, pandas, webdataset) are an extra
        from .config import UsageError, build_parser, parse_args
    except ImportError as error:
        print(f"pyclipfast-train: {TRAIN_EXTRA_HINT} ({error})", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["experiments"]:
        from .experiments import main as experiments

        return experiments(argv[1:])
    cfg = parse_args(argv)
    from .loop import train  # after parsing: --help and bad flags answer without importing torch models
    from .report import summary_table

    try:
        result = train(cfg)
    except UsageError as error:  # a setting or a data path the run cannot use: name it, no traceback, no usage
        print(f"{build_parser().prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is intact (continue with --resume auto)", file=sys.stderr)
        return 130
    if result.is_main:
        print()
        print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
