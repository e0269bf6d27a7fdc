"""Run sentence-transformers' own tests of the MultipleNegativesRankingLoss family on pyclipfast's classes.

    python tests/run_sentence_transformers_upstream.py SOURCE [pytest arguments]
    python tests/run_sentence_transformers_upstream.py --baseline SOURCE [...]   # the original classes

SOURCE is a sentence-transformers source tree (a git checkout of the installed version, or an
unpacked source distribution that contains tests/). Its tests/ folder is copied to a temporary
directory, without the package source, so the installed sentence-transformers is what runs, and
the test modules below run unmodified with this file as a pytest plugin, which

- replaces MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss,
  MultipleNegativesSymmetricRankingLoss and CachedMultipleNegativesSymmetricRankingLoss in
  ``sentence_transformers.sentence_transformer.losses`` (where the tests import them from) with
  pyclipfast's, before any test module is imported;
- maps the Hub models the tests load to a tiny local BERT (random weights, nothing downloaded;
  hidden size 128 and dropout 0.1 like the sentence-transformers-testing/stsb-bert-tiny model);
- prints, per test, its outcome and whether it built one of pyclipfast's classes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_MODULES = (
    "tests/sentence_transformer/losses/test_cmnrl.py",
    "tests/sentence_transformer/losses/test_cached_mnsrl.py",
    "tests/sentence_transformer/losses/test_gradcache.py",
    "tests/sentence_transformer/losses/test_merged_forward.py",
)
HUB_MODELS = ("sentence-transformers-testing/stsb-bert-tiny-safetensors", "distilbert/distilbert-base-uncased")
_built: list[str] = []


# --------------------------------------------------------------------------- the pytest plugin

def pytest_configure(config) -> None:
    import sentence_transformers
    import sentence_transformers.sentence_transformer.losses as st_losses

    import pyclipfast.sentence_transformers as ours
    from benchmarks.bench_sentence_transformers import tiny_model

    for name in ours.__all__:
        cls = getattr(ours, name)
        cls.__init__ = _recording(cls.__init__, name)
        if not os.environ.get("PYCLIPFAST_UPSTREAM_BASELINE"):
            setattr(st_losses, name, cls)
    model_dir = os.path.join(tempfile.mkdtemp(prefix="tiny-st-"), "model")
    tiny_model(model_dir + "-bert", hidden=128, dropout=0.1).save(model_dir)
    original = sentence_transformers.SentenceTransformer.__init__

    def local_init(self, model_name_or_path=None, *args, **kwargs):
        if model_name_or_path in HUB_MODELS:
            model_name_or_path = model_dir
        original(self, model_name_or_path, *args, **kwargs)

    sentence_transformers.SentenceTransformer.__init__ = local_init


def _recording(init, name):
    def __init__(self, *args, **kwargs):
        if type(self).__name__ == name:
            _built.append(name)
        init(self, *args, **kwargs)
    return __init__


def pytest_runtest_setup(item) -> None:
    _built.clear()


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        uses = "pyclipfast: " + ", ".join(sorted(set(_built))) if _built else "no pyclipfast class"
        print(f"\n[upstream] {report.nodeid} {report.outcome.upper()} ({uses})", flush=True)


# --------------------------------------------------------------------------- the runner

def main(argv: list[str]) -> int:
    baseline = argv[:1] == ["--baseline"]
    argv = argv[1:] if baseline else argv
    if not argv or not (Path(argv[0]) / "tests").is_dir():
        print(__doc__)
        return 2
    source, extra = Path(argv[0]), argv[1:]
    with tempfile.TemporaryDirectory(prefix="st-upstream-") as tmp:
        shutil.copytree(source / "tests", Path(tmp) / "tests")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, str(REPO), str(REPO / "tests")]),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYCLIPFAST_UPSTREAM_BASELINE="1" if baseline else "")
        cmd = [sys.executable, "-m", "pytest", "-p", "run_sentence_transformers_upstream", "-p", "no:cacheprovider",
               "--rootdir", tmp, "-o", "addopts=", "-m", "not slow and not custom", "-s", "-q",
               *TEST_MODULES, *extra]
        return subprocess.call(cmd, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
