"""The chunked sweeps on scores spread wider than float32's exp range (the trained regime: logit
scale 100, each positive far above its negatives), where the CPU sweeps floor the exp's argument
(pyclipfast/chunked/_tiles.py, EXP_FLOOR): values and gradients are those of the sweep without the
floor (to the last bits) and match the float64 reference, excluded pairs stay exactly excluded, and
the usual regime and float64 go without the floor.

At scale 100 float32 itself is the limit: a score of ~50 carries an absolute error of a few 1e-6,
so the scale's gradient (a sum that cancels) is held here to the sweep without the floor, which
tests/test_clip.py holds to the reference elsewhere."""
import math

import pytest
import torch
import torch.nn.functional as F

import pyclipfast as pcf
from helpers import as_reference, assert_close_to_reference, fresh_seed, leaves
from pyclipfast.chunked import _tiles
from pyclipfast.clip import clip_row_lse, clip_stats

SCALE = 100.0


def trained_pair(n: int, m: int, d: int, seed: int, noise: float = 0.3):
    """Image features in near-duplicate twins (2k, 2k+1), and text features with text j a noisy copy
    of image j (j < n), the others fresh: at scale 100 each row's positive and its twin's caption are a
    few units apart (a softmax far from one-hot, gradients far from zero), every other score ~90 below."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn((n + 1) // 2, d, generator=g, dtype=torch.float64)
    image = F.normalize(base.repeat_interleave(2, 0)[:n] + noise * torch.randn(n, d, generator=g,
                                                                               dtype=torch.float64), dim=-1)
    text = torch.randn(m, d, generator=g, dtype=torch.float64)
    k = min(n, m)
    text[:k] = F.normalize(image[:k] + noise * torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    return image.float(), F.normalize(text, dim=-1).float()


def deep_arguments(a, b, scale=SCALE) -> bool:
    """Whether some score lies more than −EXP_FLOOR below its row's max: the floor has work to do."""
    s = scale * a.double() @ b.double().T
    return bool(((s - s.amax(1, keepdim=True)) < _tiles.EXP_FLOOR).any())


@pytest.fixture
def floor_calls(monkeypatch):
    """(lowest, floored) of every floor_ call of the chunked sweeps."""
    calls = []
    real = _tiles.floor_

    def recording(x, lowest):
        calls.append((lowest, _tiles.floored(x, x.dtype, lowest)))
        return real(x, lowest)

    monkeypatch.setattr(_tiles, "floor_", recording)
    return calls


def positive_ids(n: int, m: int, seed: int):
    """Image ids 0..n-1; text j < n is image j's caption, the other texts belong to random images."""
    text = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(seed))
    text[:n] = torch.arange(n)
    return dict(image_ids=torch.arange(n), text_ids=text) if n != m else {}


def clip_run(backend, a, b, scale, **kw):
    a, b, scale = leaves(a, b, scale)
    loss = pcf.clip_loss(a, b, scale, backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, (a, b, scale))]


def siglip_run(backend, a, b, scale, bias):
    a, b, scale, bias = leaves(a, b, scale, bias)
    loss = pcf.siglip_loss(a, b, scale, bias, backend=backend)
    return [loss, *torch.autograd.grad(loss, (a, b, scale, bias))]


def pair_run(backend, a, b, scale, row_ids, col_ids, rule, weights):
    a, b, scale = leaves(a, b, scale)
    r = clip_row_lse(a, b, scale, row_ids, col_ids, rule=rule, penalty=4.5, backend=backend)
    finite = torch.isfinite(r)
    objective = (torch.where(finite, r, torch.zeros_like(r)) * weights.to(r)).sum()
    return [r, *torch.autograd.grad(objective, (a, b, scale))]


def without_floor(monkeypatch, fn, *args):
    """fn(*args) with the floor switched off (no argument is below −∞)."""
    with monkeypatch.context() as m:
        m.setattr(_tiles, "EXP_FLOOR", -math.inf)
        return fn(*args)


def assert_same_as_without_floor(floored, plain, names):
    """The floor only replaces terms below e^−64 by e^−64: invisible at float32 resolution."""
    for name, x, y in zip(names, floored, plain):
        torch.testing.assert_close(x, y, rtol=2 ** -20, atol=1e-24, equal_nan=True, msg=lambda m: f"{name}: {m}")


def check(run, args, names, monkeypatch, floor_calls, n_reference):
    """The floored sweep: engaged, equal to the sweep without the floor, and its first n_reference
    values against the float64 reference (with the materialised float32 baseline)."""
    out = run("torch", *args)
    assert floor_calls and all(floored for _, floored in floor_calls)
    assert_same_as_without_floor(out, without_floor(monkeypatch, run, "torch", *args), names)
    ref = run("reference", *[as_reference(x)[0] if torch.is_tensor(x) and x.is_floating_point() else x
                             for x in args])
    plain = run("reference", *args)
    assert_close_to_reference(out[:n_reference], ref[:n_reference], torch.float32, names[:n_reference],
                              baseline=plain[:n_reference])


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("n,m,d", [(50, 50, 32), (45, 70, 24)], ids=["N50", "N45xM70"])
def test_clip(n, m, d, bidirectional, monkeypatch, floor_calls):
    seed = fresh_seed()
    a, b = trained_pair(n, m, d, seed)
    assert deep_arguments(a, b)
    kw = dict(positive_ids(n, m, seed), bidirectional=bidirectional)
    run = lambda backend, *args: clip_run(backend, *args, **kw)
    check(run, (a, b, torch.tensor(SCALE)), ["loss", "d_image", "d_text", "d_scale"], monkeypatch, floor_calls, 3)


def test_clip_dots(monkeypatch, floor_calls):
    """The softmax-mean statistics (the per-rank scale gradient) with the floor."""
    a, b = trained_pair(50, 60, 32, fresh_seed())
    stats = lambda: clip_stats(a, b, torch.tensor(SCALE), None, None, True, "torch", dots=True)
    out = stats()
    assert any(floored for _, floored in floor_calls)
    assert_same_as_without_floor(out, without_floor(monkeypatch, stats), ["row_lse", "col_lse", "row_pos",
                                                                        "col_pos", "row_dot", "col_dot"])
    logits = SCALE * a.double() @ b.double().T
    ref = [logits.logsumexp(1), logits.logsumexp(0), (logits.softmax(1) * logits).sum(1),
           (logits.softmax(0) * logits).sum(0)]
    assert_close_to_reference([out[0], out[1], out[4], out[5]], ref, torch.float32,
                              ["row_lse", "col_lse", "row_dot", "col_dot"])


def test_clip_upstream_weights_of_both_signs(monkeypatch, floor_calls):
    """Per-row losses with weights of both signs: the backward's exp without the log-weight shift."""
    seed = fresh_seed()
    a, b = trained_pair(40, 40, 16, seed)
    w = torch.randn(40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def run(backend, x, y):
        x, y = leaves(x, y)
        per_row = pcf.clip_loss(x, y, SCALE, reduction="none", backend=backend)
        return [per_row, *torch.autograd.grad((per_row * w.to(per_row)).sum(), (x, y))]

    check(run, (a, b), ["per-row loss", "d_image", "d_text"], monkeypatch, floor_calls, 3)


@pytest.mark.parametrize("bias", [-10.0, 0.0])
def test_siglip(bias, monkeypatch, floor_calls):
    a, b = trained_pair(50, 50, 32, fresh_seed())
    check(siglip_run, (a, b, torch.tensor(SCALE), torch.tensor(bias)),
          ["loss", "d_image", "d_text", "d_scale", "d_bias"], monkeypatch, floor_calls, 3)


@pytest.mark.parametrize("rule", ["exclude_equal", "penalise_equal", "penalise_unequal"])
def test_pair_rules(rule, monkeypatch, floor_calls):
    """Each row's positive (far above the rest) has the row's id: excluded or penalised with it."""
    seed = fresh_seed()
    n, m = 30, 45
    a, b = trained_pair(n, m, 24, seed)
    row_ids = torch.arange(n)
    col_ids = torch.randint(-1, n, (m,), generator=torch.Generator().manual_seed(seed))
    col_ids[:n] = row_ids
    weights = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    check(pair_run, (a, b, torch.tensor(SCALE), row_ids, col_ids, rule, weights),
          ["row_lse", "d_rows", "d_cols", "d_scale"], monkeypatch, floor_calls, 3)


@pytest.mark.parametrize("n", [1, 21])
def test_row_with_every_pair_excluded_stays_minus_infinity(n, monkeypatch, floor_calls):
    """With the floor on, an excluded pair's exp is still exactly 0 (not e^−64): a row whose every
    column is excluded keeps r = −∞ and adds nothing to any gradient."""
    a, b = trained_pair(n, n + 3, 12, fresh_seed())
    row_ids = torch.arange(n)
    col_ids = torch.zeros(n + 3, dtype=torch.long)  # row 0 owns every column
    weights = torch.ones(n, dtype=torch.float64)
    weights[0] = 0.0
    args = (a, b, torch.tensor(SCALE), row_ids, col_ids, "exclude_equal", weights)
    out = pair_run("torch", *args)
    assert any(floored for _, floored in floor_calls)
    assert torch.isneginf(out[0][0]) and torch.isfinite(out[0][1:]).all()
    assert_same_as_without_floor(out, without_floor(monkeypatch, pair_run, "torch", *args),
                                 ["row_lse", "d_rows", "d_cols", "d_scale"])
    assert torch.equal(out[1][0], torch.zeros_like(out[1][0]))
    if n > 1:
        ref = pair_run("reference", *as_reference(a, b, torch.tensor(SCALE)), *args[3:])
        assert_close_to_reference([out[0][1:], out[1]], [ref[0][1:], ref[1]], torch.float32, ["row_lse", "d_rows"])


def test_usual_regime_has_no_floor_pass(floor_calls):
    """Unit features at scale 14.3 cannot reach the floor: no sweep floors (no extra pass)."""
    a, b = (F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(k)), dim=-1) for k in (1, 2))
    x, y, s = leaves(a, b, torch.tensor(14.3))
    pcf.clip_loss(x, y, s, backend="torch").backward()
    pcf.siglip_loss(x, y, s, torch.tensor(-10.0), backend="torch").backward()
    assert floor_calls and not any(floored for _, floored in floor_calls)


def test_float64_is_not_floored(floor_calls):
    """float64 exp has the range for these scores: no floor there."""
    a, b = trained_pair(20, 20, 8, fresh_seed())
    pcf.clip_loss(a.double().requires_grad_(), b.double(), SCALE, backend="torch").backward()
    assert floor_calls and not any(floored for _, floored in floor_calls)


def test_excluded_columns_get_exactly_zero_gradient(floor_calls):
    """Columns excluded from every row (their id is every row's) take no part: their gradient is
    exactly 0, not the e^−64 of a floored term."""
    seed = fresh_seed()
    a, b = trained_pair(24, 30, 16, seed)
    row_ids = torch.zeros(24, dtype=torch.long)
    col_ids = (torch.rand(30, generator=torch.Generator().manual_seed(seed)) < 0.5).long()
    col_ids[:2] = torch.tensor([0, 1])
    out = pair_run("torch", a, b, torch.tensor(SCALE), row_ids, col_ids, "exclude_equal", torch.ones(24))
    assert any(floored for _, floored in floor_calls)
    excluded = col_ids == 0
    assert torch.equal(out[2][excluded], torch.zeros_like(out[2][excluded]))
    assert (out[2][~excluded] != 0).any(1).all()


DISTILL_OPTIONS = [
    dict(margin=0.0, kd="ce"),                                              # open_clip's DistillClipLoss
    dict(margin=0.1, kd="kl", false_negative_threshold=0.8),                # KDMCSE: margin, filter, KL
    dict(margin=0.0, kd="kl", false_negative_threshold=0.5, kd_weight=0.5),
]


@pytest.mark.parametrize("options", DISTILL_OPTIONS, ids=["ce", "margin-filter-kl", "filter-kl"])
def test_distill(options, monkeypatch, floor_calls):
    """Student and teacher both at scale 100 on trained features (the teacher a noisy copy of them)."""
    seed = fresh_seed()
    a, b = trained_pair(40, 40, 24, seed)
    ta, tb = trained_pair(40, 40, 24, seed + 7)

    def run(backend, x, y, s):
        x, y, s = leaves(x, y, s)
        contrastive, distill = pcf.distill_loss(x, y, ta.to(x), tb.to(x), s, SCALE, backend=backend, **options)
        return [contrastive, distill, *torch.autograd.grad(contrastive + distill, (x, y, s))]

    check(run, (a, b, torch.tensor(SCALE)), ["contrastive", "distill", "d_image", "d_text", "d_scale"],
          monkeypatch, floor_calls, 4)
