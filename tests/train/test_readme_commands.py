"""Every trainer command in README.md runs as written: its flags parse as they stand, then it trains
with tiny sizes appended (the CPU, a micro model, one step); torchrun commands run on 2 gloo ranks."""
import re
import shlex
from pathlib import Path

import pytest

from pyclipfast.train import experiments
from pyclipfast.train.__main__ import main
from pyclipfast.train.config import parse_args
from pyclipfast.train.model import resolve_model_name
from train_helpers import run_on_ranks, write_images

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    """The trainer commands of README.md: lines of its bash blocks and inline `python -m pyclipfast.train ...`."""
    text = README.read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if "pyclipfast.train" in line]
    commands += re.findall(r"`((?:\.venv/bin/)?python -m pyclipfast\.train[^`]*)`", text)
    return [command.split("&&")[-1].strip() for command in commands]


def tiny(out: Path) -> list[str]:
    return ["--model", "pcf-micro-32", "--device", "cpu", "--train-size", "64", "--val-size", "32", "--batch-size",
            "32", "--chunk-size", "16", "--steps", "1", "--workers", "0", "--output-dir", str(out), "--no-progress",
            "--no-plots", "--no-compare-memory", "--no-eval-at-start"]


def test_the_readme_has_the_trainer_commands():
    commands = readme_commands()
    assert len(commands) >= 6 and any(c.startswith("torchrun") for c in commands), commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, monkeypatch, capsys):
    words = shlex.split(command)
    argv = words[words.index("pyclipfast.train") + 1:]
    monkeypatch.chdir(tmp_path)
    if argv[:1] == ["experiments"]:
        grids = []
        monkeypatch.setattr(experiments, "run_grid", lambda *args: grids.append(args))
        assert main(argv) == 0 and len(grids) == 1
        return
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and "experiments" in capsys.readouterr().out
        return
    if "data.csv" in argv:  # the user's open_clip CSV, image paths relative to the working directory
        paths = write_images(tmp_path / "images", 32)
        (tmp_path / "data.csv").write_text("filepath\ttitle\n" + "".join(
            f"images/{p.name}\ta picture number {i}\n" for i, p in enumerate(paths)))
    as_written = parse_args(argv)  # exits on a flag the trainer does not have or a value it refuses
    resolve_model_name(as_written.model)
    if words[0] == "torchrun":
        processes = int(words[words.index("--nproc-per-node") + 1])
        assert processes >= 2
        assert run_on_ranks(parse_args(argv + tiny(tmp_path / "run")), 2) == []
    else:
        assert main(argv + tiny(tmp_path / "run")) == 0
        assert "trained 1 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "open_clip_weights.pt").is_file()
