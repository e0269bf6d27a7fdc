"""pyclipfast.distributed on real process groups: gloo on the CPU, 2 and 4 ranks, loopback only.

One spawn per world size: every rank runs all the cases below on its shard of one global batch and
saves what it got (losses and gradients); the tests then compare, in this process,
  * the drop-in modules with open_clip's modules run in the same ranks with the same options, and
  * everything with the single-process float64 reference on the concatenated batch.
Starting a rank costs seconds (it imports torch), so all checks share the two spawns.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from types import ModuleType
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyclipfast as pcf
from benchmarks.bench_distributed import counted_peak
from helpers import TOLERANCE, features, fresh_seed, rel_err
from pyclipfast import distributed as pcd

WORLD_SIZES = [2, 4]
SPAWN_TIMEOUT_S = 240
SHARD, DIM = 37, 20                          # image rows per rank, feature dim
TRITON_SHARD, TRITON_DIM = 10, 16            # Triton runs interpreted on the CPU: keep it tiny,
TRITON_WORLD = 2                             # and in one of the spawns
SCALE, BIAS, TEACHER_SCALE, TEACHER_DIM = 14.3, -5.0, 20.0, 12
MEMORY_WORLDS, MEMORY_SHARD, MEMORY_DIM = (2, 4, 8), 24, 8   # one spawn of 8 ranks, groups of 2, 4 and 8
SIGLIP_MEMORY_WORLDS, SIGLIP_MEMORY_SHARD, SIGLIP_MEMORY_DIM = (2, 4), 192, 32   # one spawn of 4 ranks

# name: (module, options, with bias, backend, dtype)
MODULE_CASES = {
    "clip-global": ("ClipLoss", {}, False, "torch", torch.float64),
    "clip-global-gather-with-grad": ("ClipLoss", dict(gather_with_grad=True), False, "torch", torch.float64),
    "clip-local": ("ClipLoss", dict(local_loss=True), False, "torch", torch.float64),
    "clip-local-gather-with-grad": ("ClipLoss", dict(local_loss=True, gather_with_grad=True), True, "torch",
                                    torch.float64),
    "siglip-bidir": ("SigLipLoss", dict(dist_impl="bidir"), True, "torch", torch.float64),
    "siglip-shift": ("SigLipLoss", dict(dist_impl="shift"), True, "torch", torch.float64),
    "siglip-reduce": ("SigLipLoss", dict(dist_impl="reduce"), True, "torch", torch.float64),
    "siglip-gather": ("SigLipLoss", dict(dist_impl="gather"), True, "torch", torch.float64),
    "clip-local-gather-with-grad-triton": ("ClipLoss", dict(local_loss=True, gather_with_grad=True), False,
                                           "triton", torch.float32),
    "siglip-bidir-triton": ("SigLipLoss", dict(dist_impl="bidir"), True, "triton", torch.float32),
    "distill-global": ("DistillClipLoss", {}, False, "torch", torch.float64),
    "distill-global-gather-with-grad": ("DistillClipLoss", dict(gather_with_grad=True), False, "torch",
                                        torch.float64),
    "distill-local": ("DistillClipLoss", dict(local_loss=True), False, "torch", torch.float64),
    "distill-local-gather-with-grad": ("DistillClipLoss", dict(local_loss=True, gather_with_grad=True), False,
                                       "torch", torch.float64),
    "distill-local-gather-with-grad-triton": ("DistillClipLoss", dict(local_loss=True, gather_with_grad=True),
                                              False, "triton", torch.float32),
    "coca-local-gather-with-grad": ("CoCaLoss", dict(local_loss=True, gather_with_grad=True), False, "torch",
                                    torch.float64),
}
COCA_WEIGHTS, VOCAB, CAPTION_LENGTH, PAD_ID = dict(caption_loss_weight=2.0, clip_loss_weight=1.0), 11, 5, 0

# Drop-ins with ids (no open_clip counterpart): name: (module, options, with bias); compared with the
# single-process float64 reference of the global batch through MODULE_SEMANTICS-like relations.
MODULE_ID_CASES = {
    "clip-local-gather-with-grad-ids": ("ClipLoss", dict(local_loss=True, gather_with_grad=True), False),
    "clip-global-ids": ("ClipLoss", {}, True),
    "clip-global-gather-with-grad-ids": ("ClipLoss", dict(gather_with_grad=True), False),
    "clip-local-ids": ("ClipLoss", dict(local_loss=True), False),
    "siglip-bidir-ids": ("SigLipLoss", dict(dist_impl="bidir"), True),
    "distill-local-gather-with-grad-ids": ("DistillClipLoss", dict(local_loss=True, gather_with_grad=True), False),
    "distill-global-ids": ("DistillClipLoss", {}, False),
    "distill-global-gather-with-grad-ids": ("DistillClipLoss", dict(gather_with_grad=True), False),
    "distill-local-ids": ("DistillClipLoss", dict(local_loss=True), False),
}

# How open_clip's module relates to the single-process loss L of the global batch:
# (each rank's loss is L | the mean over ranks is L, feature-gradient factor or None (only a part),
#  each rank's scale gradient is ∂L/∂s | the sum over ranks is W·∂L/∂s).
MODULE_SEMANTICS = {
    "clip-global": ("every", 1, "every"),
    "clip-global-gather-with-grad": ("every", "W", "every"),
    "clip-local": ("mean", None, "sum"),
    "clip-local-gather-with-grad": ("mean", "W", "sum"),
    "siglip-bidir": ("mean", "W", "sum"),
    "siglip-shift": ("mean", "W", "sum"),
    "siglip-reduce": ("mean", "W", "sum"),
    "siglip-gather": ("mean", "W", "sum"),
}

MODULE_ID_SEMANTICS = {
    "clip-local-gather-with-grad-ids": ("mean", "W", "sum"),
    "clip-global-ids": ("every", 1, "every"),
    "clip-global-gather-with-grad-ids": ("every", "W", "every"),
    "clip-local-ids": ("mean", None, "sum"),
    "siglip-bidir-ids": ("mean", "W", "sum"),
    "distill-local-gather-with-grad-ids": ("mean", "W", "sum"),
    "distill-global-ids": ("every", 1, "every"),
    "distill-global-gather-with-grad-ids": ("every", "W", "every"),
    "distill-local-ids": ("mean", None, "sum"),
}

# name: (loss, with ids, backend, dtype)
FUNCTIONAL_CASES = {
    "clip": ("clip", False, "torch", torch.float64),
    "clip-ids": ("clip", True, "torch", torch.float64),
    "siglip": ("siglip", False, "torch", torch.float64),
    "siglip-ids": ("siglip", True, "torch", torch.float64),
    "clip-ids-triton": ("clip", True, "triton", torch.float32),
    "clip-ids-reference": ("clip", True, "reference", torch.float64),
}

# name: (exception type, words the message must contain)
ERROR_CASES = {
    "uneven-shards": (ValueError, ["image_features", "same number of rows"]),
    "uneven-shards-unchecked": (ValueError, ["image_features", "same number of rows", "rank 0: 36", "rank 1: 37"]),
    "module-uneven-shards-unchecked": (ValueError, ["image_features", "same number of rows", "rank 0: 36",
                                                    "rank 1: 37"]),
    "non-finite-on-one-rank": (ValueError, ["text_features", "non-finite", "rank(s) [1]"]),
    "image-without-positive": (ValueError, ["image row", "no positive"]),
    "module-rank-mismatch": (ValueError, ["rank="]),
}


# --------------------------------------------------------------------------- the global batch

def _global_batch(world: int, seed: int, *, rows: int = SHARD, text_rows: Optional[int] = None, dim: int = DIM,
                  dtype=torch.float64, ids: bool = False) -> Dict[str, torch.Tensor]:
    """Features of world·rows images and world·text_rows texts, teacher features of the images, scale,
    bias and (optionally) ids.

    The ids are shuffled over the whole batch, some repeated, every id on both sides: captions of one
    image sit on several ranks, and every row and column has a positive.
    """
    text_rows = rows if text_rows is None else text_rows
    n, m = world * rows, world * text_rows
    batch = dict(image=features(n, dim, dtype=dtype, device="cpu", seed=seed),
                 text=features(m, dim, dtype=dtype, device="cpu", seed=seed + 1),
                 teacher_image=features(n, TEACHER_DIM, dtype=dtype, device="cpu", seed=seed + 3),
                 teacher_text=features(m, TEACHER_DIM, dtype=dtype, device="cpu", seed=seed + 4),
                 scale=torch.tensor(SCALE, dtype=dtype), bias=torch.tensor(BIAS, dtype=dtype))
    if ids:
        g = torch.Generator().manual_seed(seed + 2)
        distinct = (2 * min(n, m)) // 3
        for key, size in (("image_ids", n), ("text_ids", m)):
            repeats = torch.randint(0, distinct, (size - distinct,), generator=g)
            batch[key] = torch.cat([torch.arange(distinct), repeats])[torch.randperm(size, generator=g)]
    return batch


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def _leaves(batch: Dict[str, torch.Tensor], rank: int, world: int, with_bias: bool):
    image, text = (_shard(batch[k], rank, world).clone().requires_grad_() for k in ("image", "text"))
    scale = batch["scale"].clone().requires_grad_()
    bias = batch["bias"].clone().requires_grad_() if with_bias else None
    return image, text, scale, bias


def _loss_and_grads(loss: torch.Tensor, image, text, scale, bias) -> List[Optional[torch.Tensor]]:
    inputs = [t for t in (image, text, scale, bias) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs))
    return [loss.detach()] + [None if t is None else next(grads) for t in (image, text, scale, bias)]


# --------------------------------------------------------------------------- what every rank runs

def _open_clip_loss() -> ModuleType:
    """open_clip/loss.py loaded alone: importing the whole open_clip package costs each rank ~4 s of CPU."""
    package = importlib.util.find_spec("open_clip")
    spec = importlib.util.spec_from_file_location(
        "open_clip_loss", os.path.join(package.submodule_search_locations[0], "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _caption_batch(world: int, seed: int, dtype) -> Dict[str, torch.Tensor]:
    """CoCa's decoder logits (B, T, V) and token labels (B, T), some of them padding."""
    g = torch.Generator().manual_seed(seed + 5)
    return dict(logits=torch.randn(world * SHARD, CAPTION_LENGTH, VOCAB, generator=g, dtype=dtype),
                labels=torch.randint(0, VOCAB, (world * SHARD, CAPTION_LENGTH), generator=g))


def _module_case(oc: ModuleType, name: str, rank: int, world: int, seed: int) -> dict:
    module, options, with_bias, backend, dtype = MODULE_CASES[name]
    triton = backend == "triton"
    batch = _global_batch(world, seed, rows=TRITON_SHARD if triton else SHARD,
                          dim=TRITON_DIM if triton else DIM, dtype=dtype)
    extra = COCA_WEIGHTS if module == "CoCaLoss" else {}
    ours = getattr(pcf, module)(rank=rank, world_size=world, backend=backend, **options, **extra)
    theirs = getattr(oc, module)(rank=rank, world_size=world, **options, **extra)
    out = {}
    for key, loss_module in (("ours", ours), ("theirs", theirs)):
        image, text, scale, bias = _leaves(batch, rank, world, with_bias)
        if module == "DistillClipLoss":
            teacher = (_shard(batch[k], rank, world) for k in ("teacher_image", "teacher_text"))
            contrastive, distill = loss_module(image, text, scale, *teacher, TEACHER_SCALE)
            got = _loss_and_grads(contrastive + distill, image, text, scale, bias)
            out[key] = [torch.stack([contrastive, distill]).detach(), *got[1:]]
        elif module == "CoCaLoss":  # the caption logits' gradient in the bias slot
            caption = _caption_batch(world, seed, dtype)
            logits = _shard(caption["logits"], rank, world).clone().requires_grad_()
            contrastive, caption_loss = loss_module(image, text, logits, _shard(caption["labels"], rank, world), scale)
            got = _loss_and_grads(contrastive + caption_loss, image, text, scale, logits)
            out[key] = [torch.stack([contrastive, caption_loss]).detach(), *got[1:]]
        else:
            out[key] = _loss_and_grads(loss_module(image, text, scale, bias), image, text, scale, bias)
    return out


def _id_batch(world: int, seed: int) -> Dict[str, torch.Tensor]:
    """Shuffled, repeated ids over the whole batch, more texts than images per rank."""
    return _global_batch(world, seed + 20, text_rows=SHARD + 3, ids=True)


def _module_id_case(name: str, rank: int, world: int, seed: int) -> dict:
    module, options, with_bias = MODULE_ID_CASES[name]
    batch = _id_batch(world, seed)
    image, text, scale, bias = _leaves(batch, rank, world, with_bias)
    ids = {k: _shard(batch[k], rank, world) for k in ("image_ids", "text_ids")}
    loss_module = getattr(pcf, module)(rank=rank, world_size=world, backend="torch", **options)
    if module == "DistillClipLoss":
        teacher = (_shard(batch[k], rank, world) for k in ("teacher_image", "teacher_text"))
        contrastive, distill = loss_module(image, text, scale, *teacher, TEACHER_SCALE, **ids)
        got = _loss_and_grads(contrastive + distill, image, text, scale, bias)
        return {"ours": [torch.stack([contrastive, distill]).detach(), *got[1:]]}
    return {"ours": _loss_and_grads(loss_module(image, text, scale, bias, **ids), image, text, scale, bias)}


def _functional_batch(name: str, world: int, seed: int) -> Dict[str, torch.Tensor]:
    """With ids, the ranks hold more texts than images."""
    _, with_ids, backend, dtype = FUNCTIONAL_CASES[name]
    rows, dim = (TRITON_SHARD, TRITON_DIM) if backend == "triton" else (SHARD, DIM)
    return _global_batch(world, seed, rows=rows, dim=dim, text_rows=rows + 3 if with_ids else None, dtype=dtype,
                         ids=with_ids)


def _functional_case(name: str, rank: int, world: int, seed: int) -> dict:
    loss_name, _, backend, _ = FUNCTIONAL_CASES[name]
    batch = _functional_batch(name, world, seed)
    image, text, scale, bias = _leaves(batch, rank, world, loss_name == "siglip")
    ids = {k: _shard(batch[k], rank, world) for k in ("image_ids", "text_ids") if k in batch}
    loss = getattr(pcd, f"{loss_name}_loss")(image, text, scale, bias, backend=backend, **ids)
    return {"ours": _loss_and_grads(loss, image, text, scale, bias)}


def _pair_batch(seed: int, pair: int) -> Dict[str, torch.Tensor]:
    """The global batch of ranks 2·pair and 2·pair + 1."""
    return _global_batch(2, seed + 10 * pair, ids=True)


def _subgroup_case(rank: int, world: int, seed: int) -> dict:
    """Process groups of two ranks each, every pair its own global batch: the functional loss (with
    ids) and the drop-ins (default ids) on the pair's group."""
    groups = [dist.new_group([2 * p, 2 * p + 1]) for p in range(world // 2)]
    pair, member = divmod(rank, 2)
    batch = _pair_batch(seed, pair)
    image, text, scale, _ = _leaves(batch, member, 2, False)
    ids = {k: _shard(batch[k], member, 2) for k in ("image_ids", "text_ids")}
    loss = pcd.clip_loss(image, text, scale, group=groups[pair], backend="torch", **ids)
    out = {"ours": _loss_and_grads(loss, image, text, scale, None)}
    image, text, scale, _ = _leaves(batch, member, 2, False)
    clip = pcf.ClipLoss(local_loss=True, gather_with_grad=True, rank=member, world_size=2, group=groups[pair],
                        backend="torch")
    out["clip-module"] = _loss_and_grads(clip(image, text, scale), image, text, scale, None)
    image, text, scale, bias = _leaves(batch, member, 2, True)
    siglip = pcf.SigLipLoss(rank=member, world_size=2, dist_impl="bidir", group=groups[pair], backend="torch")
    out["siglip-module"] = _loss_and_grads(siglip(image, text, scale, bias), image, text, scale, bias)
    return out


@contextlib.contextmanager
def _data_checks_off():
    """As on a GPU without PYCLIPFAST_VALIDATE: only the metadata checks run."""
    saved = pcd.data_checks_on
    pcd.data_checks_on = lambda t: False
    try:
        yield
    finally:
        pcd.data_checks_on = saved


def _error_case(name: str, rank: int, world: int, seed: int) -> dict:
    batch = _global_batch(world, seed, ids=True)
    image, text, scale, _ = _leaves(batch, rank, world, False)
    ids = {k: _shard(batch[k], rank, world) for k in ("image_ids", "text_ids")}
    try:
        rows = SHARD - 1 if rank == 0 else SHARD
        if name == "uneven-shards":
            pcd.clip_loss(image[:rows], text[:rows], scale, backend="torch")
        elif name == "uneven-shards-unchecked":
            with _data_checks_off():
                pcd.clip_loss(image[:rows], text[:rows], scale, backend="torch")
        elif name == "module-uneven-shards-unchecked":
            with _data_checks_off():
                pcf.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                             backend="torch")(image[:rows], text[:rows], scale)
        elif name == "non-finite-on-one-rank":
            text = text.detach().clone()
            if rank == 1:
                text[3, 1] = float("nan")
            pcd.clip_loss(image, text, scale, backend="torch", **ids)
        elif name == "image-without-positive":
            ids["text_ids"] = torch.where(ids["text_ids"] == 0, -1, ids["text_ids"])  # no caption has id 0
            pcd.clip_loss(image, text, scale, backend="torch", **ids)
        elif name == "module-rank-mismatch":
            pcf.ClipLoss(rank=(rank + 1) % world, world_size=world, backend="torch")(image, text, scale)
    except Exception as error:  # noqa: BLE001 - recorded and checked by the test
        return {"error": (type(error).__name__, str(error))}
    return {"error": None}


def _memory_case(rank: int) -> dict:
    """Counted peak bytes of one forward + backward of ClipLoss(local_loss, gather_with_grad) at a fixed
    per-rank batch, on the groups of the first 2, 4 and 8 ranks; and of the same loss with
    materialised n×N logits (open_clip's computation) for contrast."""
    peaks = {}
    for world in MEMORY_WORLDS:
        group = dist.new_group(list(range(world)))
        if rank >= world:
            continue
        batch = _global_batch(world, 0, rows=MEMORY_SHARD, dim=MEMORY_DIM)
        fused = pcf.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group=group,
                             backend="torch")
        image, text, scale, _ = _leaves(batch, rank, world, False)
        peaks[("fused", world)] = counted_peak(fused, image, text, scale)

        def materialised(image, text, scale):
            all_image, all_text = pcd.all_gather_with_grad(image, group), pcd.all_gather_with_grad(text, group)
            labels = torch.arange(rank * MEMORY_SHARD, (rank + 1) * MEMORY_SHARD)
            return 0.5 * (torch.nn.functional.cross_entropy(scale * image @ all_text.T, labels)
                          + torch.nn.functional.cross_entropy(scale * text @ all_image.T, labels))

        image, text, scale, _ = _leaves(batch, rank, world, False)
        peaks[("materialised", world)] = counted_peak(materialised, image, text, scale)
    return peaks


def allocated_peak(fn) -> int:
    """Peak bytes held at once by every tensor the CPU allocator hands out while fn() runs (the
    profiler's allocation events): the inner temporaries of fused ops and the tensors autograd
    keeps for the backward included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = os.path.join(tempfile.mkdtemp(prefix="trace"), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    live = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def _siglip_memory_case(rank: int) -> dict:
    """Allocated peak of one forward + backward of SigLipLoss, every dist_impl, on the groups of the
    first 2 and 4 ranks, in units of one n×D shard (float64), the inputs and their gradients not counted."""
    peaks = {}
    n, d = SIGLIP_MEMORY_SHARD, SIGLIP_MEMORY_DIM
    for world in SIGLIP_MEMORY_WORLDS:
        group = dist.new_group(list(range(world)))
        if rank >= world:
            continue
        batch = _global_batch(world, 0, rows=n, dim=d)
        for impl in ("bidir", "shift", "reduce", "gather"):
            loss = pcf.SigLipLoss(rank=rank, world_size=world, dist_impl=impl, group=group, backend="torch")
            image, text, scale, bias = _leaves(batch, rank, world, True)
            loss(image, text, scale, bias).backward()   # gradients allocated before the count
            peaks[(impl, world)] = allocated_peak(lambda: loss(image, text, scale, bias).backward()) / (n * d * 8)
    return peaks


ONLY_CASES = {"memory": _memory_case, "siglip-memory": _siglip_memory_case}


def _runs_in(backend: str, world: int) -> bool:
    return backend != "triton" or world == TRITON_WORLD


def _worker(rank: int, world: int, seed: int, rendezvous: str, out_dir: str, only: Optional[str] = None) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated torch.distributed.nn
    torch.set_num_threads(1)  # more ranks than cores: idle OpenMP threads would spin on the busy ones' cores
    from pyclipfast.chunked import _tiles
    _tiles.TILE_ROWS, _tiles.TILE_COLS = 32, 48  # as in conftest: small shapes still span ragged tiles
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {only: ONLY_CASES[only](rank)} if only else _run_cases(rank, world, seed)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down its connections while a peer still uses them
    finally:
        dist.destroy_process_group()


def _run_cases(rank: int, world: int, seed: int) -> dict:
    oc = _open_clip_loss()
    results = {}
    for name, case in MODULE_CASES.items():
        if _runs_in(case[3], world):
            results[f"module/{name}"] = _module_case(oc, name, rank, world, seed)
    for name in MODULE_ID_CASES:
        results[f"module-ids/{name}"] = _module_id_case(name, rank, world, seed)
    for name, case in FUNCTIONAL_CASES.items():
        if _runs_in(case[2], world):
            results[f"functional/{name}"] = _functional_case(name, rank, world, seed)
    if world % 2 == 0 and world > 2:
        results["subgroup"] = _subgroup_case(rank, world, seed)
    for name in ERROR_CASES:
        results[f"error/{name}"] = _error_case(name, rank, world, seed)
    results["after-errors"] = _functional_case("clip", rank, world, seed)
    return results


def _spawn(world: int, seed: int, out_dir: str, only: Optional[str] = None) -> None:
    """Run the ranks, failing (and killing them) after SPAWN_TIMEOUT_S."""
    context = mp.start_processes(_worker, args=(world, seed, os.path.join(out_dir, "rendezvous"), out_dir,
                                                only), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"world{w}" for w in WORLD_SIZES])
def run(request, tmp_path_factory):
    """(world size, seed, per-rank results) of one spawn."""
    world, seed = request.param, fresh_seed()  # fresh inputs every run
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    try:
        _spawn(world, seed, str(out_dir))
    except mp.ProcessRaisedException as error:
        pytest.fail(f"a rank raised:\n{error}")
    except mp.ProcessExitedException as error:
        pytest.fail(f"a rank died: {error}\n{traceback.format_exc()}")
    return world, seed, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


# --------------------------------------------------------------------------- comparisons

def _single_process(loss_name: str, batch: Dict[str, torch.Tensor], with_bias: bool) -> list:
    """Loss and gradients of the concatenated batch in one process: the float64 reference.
    DistillClipLoss's objective is open_clip's (kd="ce", no margin, no normalisation)."""
    image, text, scale, bias = (batch[k].double().clone().requires_grad_() for k in ("image", "text", "scale", "bias"))
    bias = bias if with_bias else None
    ids = {k: batch[k] for k in ("image_ids", "text_ids") if k in batch}
    if loss_name == "distill":
        teacher = (batch[k].double() for k in ("teacher_image", "teacher_text"))
        contrastive, distill = pcf.distill_loss(image, text, *teacher, scale, TEACHER_SCALE, kd="ce", normalize=False,
                                                backend="reference", **ids)
        got = _loss_and_grads(contrastive + distill, image, text, scale, bias)
        return [torch.stack([contrastive, distill]).detach(), *got[1:]]
    fn = pcf.clip_loss if loss_name == "clip" else pcf.siglip_loss
    loss = fn(image, text, scale, bias, backend="reference", **ids)
    return _loss_and_grads(loss, image, text, scale, bias)


def _without_ids(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if not k.endswith("_ids")}


def _assert_close(name: str, out: Optional[torch.Tensor], ref: Optional[torch.Tensor], tol: float) -> None:
    """Relative error ≤ tol; a reference that vanishes (a bias gradient in InfoNCE) is held absolutely."""
    assert (out is None) == (ref is None), f"{name}: one side has no gradient"
    if out is None:
        return
    if float(ref.double().norm()) < 1e-12:
        assert float((out.double() - ref.double()).norm()) < 1e-12, f"{name}: {out} vs {ref}"
        return
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


GRAD_NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")  # DistillClipLoss: (contrastive, distill)


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_matches_open_clip(run, case):
    """Rank by rank: the loss and every gradient, the logit scale's included."""
    world, _, ranks = run
    _, _, _, backend, dtype = MODULE_CASES[case]
    if not _runs_in(backend, world):
        pytest.skip(f"Triton runs (interpreted) with {TRITON_WORLD} ranks only")
    tol = TOLERANCE[dtype]
    for rank, result in enumerate(ranks):
        got = result[f"module/{case}"]
        for name, ours, theirs in zip(GRAD_NAMES, got["ours"], got["theirs"]):
            _assert_close(f"rank {rank} {name}", ours, theirs, tol)


def _open_clip_scale_grads(module: str, options: dict, batch: Dict[str, torch.Tensor], world: int) -> torch.Tensor:
    """Each rank's ∂(its loss)/∂s as open_clip defines the loss, written out on the float64 global batch
    (positives by ids where the batch has them): with local_loss rank r's loss is
    ½[mean_{i∈r} row term + mean_{j∈r} column term] of the global batch, without it the global loss.
    DistillClipLoss adds open_clip's KD term, −Σ softmax(teacher)·log softmax(student), rows and columns."""
    image, text = batch["image"].double(), batch["text"].double()
    n, m = image.shape[0], text.shape[0]
    image_ids = batch.get("image_ids", torch.arange(n))
    text_ids = batch.get("text_ids", torch.arange(m))
    positive = (image_ids[:, None] == text_ids[None, :]).double()
    teacher = TEACHER_SCALE * batch["teacher_image"].double() @ batch["teacher_text"].double().T
    grads = []
    for rank in range(world):
        scale = batch["scale"].double().clone().requires_grad_()
        logits = scale * image @ text.T
        rows = logits.logsumexp(1) - (logits * positive).sum(1) / positive.sum(1)
        cols = logits.logsumexp(0) - (logits * positive).sum(0) / positive.sum(0)
        if module == "DistillClipLoss":
            rows = rows - (teacher.softmax(1) * logits.log_softmax(1)).sum(1)
            cols = cols - (teacher.softmax(0) * logits.log_softmax(0)).sum(0)
        if options.get("local_loss", False):
            rows, cols = rows.chunk(world)[rank], cols.chunk(world)[rank]
        grads.append(torch.autograd.grad(0.5 * (rows.mean() + cols.mean()), scale)[0])
    return torch.stack(grads)


SCALE_CASES = ([("module", c) for c, v in MODULE_CASES.items() if v[0] in ("ClipLoss", "DistillClipLoss")]
               + [("module-ids", c) for c, v in MODULE_ID_CASES.items() if v[0] in ("ClipLoss", "DistillClipLoss")])


@pytest.mark.parametrize("kind, case", SCALE_CASES, ids=[c for _, c in SCALE_CASES])
def test_module_scale_gradient_is_open_clips_on_every_rank(run, kind, case):
    """Each rank's logit-scale gradient is open_clip's on that rank (with ids: open_clip's definition
    with the ids' positives), not only in the sum over ranks: with local_loss, rank r's own
    ∂ℓ_r/∂s; without it, ∂L/∂s on every rank."""
    world, seed, ranks = run
    if kind == "module":
        module, options, _, backend, dtype = MODULE_CASES[case]
        if not _runs_in(backend, world):
            pytest.skip(f"Triton runs (interpreted) with {TRITON_WORLD} ranks only")
        triton = backend == "triton"
        batch = _global_batch(world, seed, rows=TRITON_SHARD if triton else SHARD,
                              dim=TRITON_DIM if triton else DIM, dtype=dtype)
    else:
        (module, options, _), dtype = MODULE_ID_CASES[case], torch.float64
        batch = _id_batch(world, seed)
    expected = _open_clip_scale_grads(module, options, batch, world)
    for rank, result in enumerate(ranks):
        got = result[f"{kind}/{case}"]["ours"][3]
        _assert_close(f"rank {rank} d_scale", got, expected[rank], TOLERANCE[dtype])
    if kind == "module":  # the written-out definition is open_clip's
        theirs = torch.stack([r[f"module/{case}"]["theirs"][3] for r in ranks])
        _assert_close("open_clip d_scale", theirs, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("case", list(MODULE_SEMANTICS))
def test_module_relation_to_the_global_batch(run, case):
    """open_clip's numbers, spelled out: with gather_with_grad every shard's gradient is W·∂L/∂A_r,
    which DDP's gradient averaging turns into ∇L."""
    world, seed, ranks = run
    module, _, with_bias, _, _ = MODULE_CASES[case]
    ref = _single_process("clip" if module == "ClipLoss" else "siglip", _global_batch(world, seed), with_bias)
    _assert_relation([r[f"module/{case}"]["ours"] for r in ranks], ref, MODULE_SEMANTICS[case])


@pytest.mark.parametrize("case", list(MODULE_ID_CASES))
def test_module_with_ids_relation_to_the_global_batch(run, case):
    """Ids through the drop-ins, gathered across ranks: open_clip's relations to the global
    multi-positive loss, with more texts than images per rank."""
    world, seed, ranks = run
    module, _, with_bias = MODULE_ID_CASES[case]
    loss_name = {"ClipLoss": "clip", "SigLipLoss": "siglip", "DistillClipLoss": "distill"}[module]
    ref = _single_process(loss_name, _id_batch(world, seed), with_bias)
    _assert_relation([r[f"module-ids/{case}"]["ours"] for r in ranks], ref, MODULE_ID_SEMANTICS[case])


def _assert_relation(got: list, ref: list, semantics: tuple) -> None:
    """(each rank's loss is L | the mean over ranks is L, feature-gradient factor or None,
    each rank's scale gradient is ∂L/∂s | the sum over ranks is W·∂L/∂s)."""
    loss_is, feature_factor, scale_is = semantics
    world, tol = len(got), TOLERANCE[torch.float64]
    losses = torch.stack([g[0] for g in got])
    every_loss = ref[0].expand(world, *ref[0].shape)
    _assert_close("loss", losses if loss_is == "every" else losses.mean(0),
                  every_loss if loss_is == "every" else ref[0], tol)
    if feature_factor is not None:
        factor = world if feature_factor == "W" else 1
        for k, key in ((1, "image"), (2, "text")):
            _assert_close(f"d_{key}", torch.cat([g[k] for g in got]), factor * ref[k], tol)
    scales = torch.stack([g[3] for g in got])
    _assert_close("d_scale", scales if scale_is == "every" else scales.sum(),
                  ref[3].expand(world) if scale_is == "every" else world * ref[3], tol)


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_equals_the_single_process_global_batch(run, case):
    """Every rank returns L; each shard gets its slice of ∂L/∂A; scale/bias gradients sum to ∂L/∂s."""
    world, seed, ranks = run
    loss_name, with_ids, backend, dtype = FUNCTIONAL_CASES[case]
    if not _runs_in(backend, world):
        pytest.skip(f"Triton runs (interpreted) with {TRITON_WORLD} ranks only")
    batch = _functional_batch(case, world, seed)
    ref = _single_process(loss_name, batch, loss_name == "siglip")
    _assert_functional([r[f"functional/{case}"]["ours"] for r in ranks], ref, TOLERANCE[dtype])


def _assert_functional(got: list, ref: list, tol: float) -> None:
    world = len(got)
    _assert_close("loss on every rank", torch.stack([g[0] for g in got]), ref[0].expand(world), tol)
    _assert_close("d_image", torch.cat([g[1] for g in got]), ref[1], tol)
    _assert_close("d_text", torch.cat([g[2] for g in got]), ref[2], tol)
    _assert_close("d_scale summed over ranks", sum(g[3] for g in got), ref[3], tol)
    if ref[4] is not None:
        _assert_close("d_bias summed over ranks", sum(g[4] for g in got), ref[4], tol)


def test_functional_on_subgroups(run):
    world, seed, ranks = run
    if world < 4:
        pytest.skip("needs two groups of two ranks")
    for pair in range(world // 2):
        ref = _single_process("clip", _pair_batch(seed, pair), False)
        _assert_functional([ranks[2 * pair + m]["subgroup"]["ours"] for m in range(2)], ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("module", ["clip", "siglip"])
def test_modules_on_subgroups(run, module):
    """The drop-ins' `group`: rank and world_size are the pair's, the ring's peers its members."""
    world, seed, ranks = run
    if world < 4:
        pytest.skip("needs two groups of two ranks")
    for pair in range(world // 2):
        ref = _single_process(module, _without_ids(_pair_batch(seed, pair)), module == "siglip")
        got = [ranks[2 * pair + m]["subgroup"][f"{module}-module"] for m in range(2)]
        _assert_relation(got, ref, ("mean", "W", "sum"))


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_the_same_error_on_every_rank(run, case):
    """A rank-local error would leave the other ranks waiting in a collective."""
    _, _, ranks = run
    kind, words = ERROR_CASES[case]
    errors = [r[f"error/{case}"]["error"] for r in ranks]
    assert all(e is not None for e in errors), f"not every rank raised: {errors}"
    assert {e[0] for e in errors} == {kind.__name__}, errors
    if case != "module-rank-mismatch":  # there each rank names its own rank
        assert len({e[1] for e in errors}) == 1, f"ranks disagree: {errors}"
    for word in words:
        assert word in errors[0][1], f"{word!r} not in {errors[0][1]!r}"


def test_ranks_stay_in_step_after_errors(run):
    _, _, ranks = run
    for r in ranks:
        for ours, again in zip(r["functional/clip"]["ours"], r["after-errors"]["ours"]):
            _assert_close("repeat", again, ours, TOLERANCE[torch.float64])


def test_per_rank_memory_has_no_n_by_n_term():
    """At a fixed per-rank batch n, per-rank memory of the fused drop-in grows with W only by the
    gathered texts and their gradient (2·N·D elements) and O(N) column statistics: what remains is
    flat in W. The materialised loss (open_clip's) adds its two n×N logit matrices per rank."""
    out_dir = tempfile.mkdtemp(prefix="memory")
    try:
        _spawn(max(MEMORY_WORLDS), 0, out_dir, only="memory")
    except mp.ProcessRaisedException as error:
        pytest.fail(f"a rank raised:\n{error}")
    peaks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"))["memory"] for r in range(max(MEMORY_WORLDS))]
    n, d, item = MEMORY_SHARD, MEMORY_DIM, 8   # float64
    peak = {key: max(p[key] for p in peaks if key in p) for key in peaks[0]}
    small, large = MEMORY_WORLDS[0], MEMORY_WORLDS[-1]
    added = (large - small) * n                  # columns added to N
    rest = {w: peak[("fused", w)] - 2 * w * n * d * item for w in MEMORY_WORLDS}
    # (measured: 2 values per added column; one n×N matrix would add n = 24)
    assert rest[large] - rest[small] <= 8 * added * item, f"fused, without the gathered texts: {rest}"
    assert peak[("fused", large)] - peak[("fused", small)] >= 2 * added * d * item, peak  # the counter counts
    grew = peak[("materialised", large)] - peak[("materialised", small)]
    assert grew >= 2 * n * added * item, f"materialised: {peak}"


def test_siglip_per_rank_memory_is_a_block_per_rank():
    """Per rank, SigLipLoss keeps one n×D block per rank's texts (its gradient, formed in the fused
    sweep: what open_clip keeps of them is the texts themselves) and a few n×D buffers besides: the
    images' gradient summed over the blocks, the texts in flight, one block's outputs, the tile
    scratch. 'gather' also holds the gathered texts and their gradient. Keeping every block's image
    gradient until the backward (2 blocks per rank) fails the bound."""
    out_dir = tempfile.mkdtemp(prefix="siglip-memory")
    try:
        _spawn(max(SIGLIP_MEMORY_WORLDS), 0, out_dir, only="siglip-memory")
    except mp.ProcessRaisedException as error:
        pytest.fail(f"a rank raised:\n{error}")
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"))["siglip-memory"]
             for r in range(max(SIGLIP_MEMORY_WORLDS))]
    peak = {key: max(r[key] for r in ranks if key in r) for key in ranks[0]}
    for (impl, world), blocks in peak.items():
        bound = 2 * world + 4 if impl == "gather" else world + 5
        assert blocks <= bound, f"{impl} on {world} ranks: {blocks:.2f} n×D blocks > {bound}: {peak}"


# --------------------------------------------------------------------------- without a process group

def _plain_losses(image, text, scale, bias, image_ids, text_ids):
    """Multi-positive InfoNCE and SigLIP written out with plain torch ops."""
    logits = scale * image @ text.T
    positive = (image_ids[:, None] == text_ids[None, :]).to(logits.dtype)
    rows = logits.logsumexp(1) - (logits * positive).sum(1) / positive.sum(1)
    cols = logits.logsumexp(0) - (logits * positive).sum(0) / positive.sum(0)
    sigmoid = -torch.nn.functional.logsigmoid((2 * positive - 1) * (logits + bias)).sum() / image.shape[0]
    return 0.5 * (rows.mean() + cols.mean()), sigmoid


def test_functional_without_process_group_is_the_local_loss():
    batch = _global_batch(1, fresh_seed(), ids=True, text_rows=SHARD + 3)
    ids = {k: batch[k] for k in ("image_ids", "text_ids")}
    expected = _plain_losses(batch["image"], batch["text"], SCALE, BIAS, **ids)
    for fn, value in zip((pcd.clip_loss, pcd.siglip_loss), expected):
        got = fn(batch["image"], batch["text"], SCALE, BIAS, backend="torch", **ids)
        _assert_close(fn.__name__, got, value, TOLERANCE[torch.float64])


@pytest.mark.parametrize("module", [pcf.ClipLoss, pcf.SigLipLoss])
def test_module_world_size_needs_a_process_group(module):
    a, b = features(8, 4, device="cpu", seed=0), features(8, 4, device="cpu", seed=1)
    with pytest.raises(ValueError, match="world_size=2"):
        module(rank=0, world_size=2, backend="torch")(a, b, SCALE, BIAS)


def test_use_horovod_is_not_implemented():
    a, b = features(8, 4, device="cpu", seed=0), features(8, 4, device="cpu", seed=1)
    with pytest.raises(NotImplementedError, match="horovod"):
        pcf.ClipLoss(rank=0, world_size=2, use_horovod=True, backend="torch")(a, b, SCALE)


def test_group_must_be_a_process_group():
    a, b = features(8, 4, device="cpu", seed=0), features(8, 4, device="cpu", seed=1)
    with pytest.raises(TypeError, match="group"):
        pcd.clip_loss(a, b, SCALE, group="world")
