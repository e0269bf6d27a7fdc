"""clip_row_lse (rows-only InfoNCE log-sum-exp under a pair rule on the ids): every backend against
the float64 reference, and the reference against the formula written out."""
import pytest
import torch

import pyclipfast as pcf
from helpers import (
    DEVICE, TOLERANCE, as_reference, assert_close_to_reference, backend_dtype_params, fast_backends, features, fresh_seed,
    leaves,
)
from pyclipfast import _validation
from pyclipfast.clip import PAIR_RULES, clip_row_lse

RULES = list(PAIR_RULES)
PENALTY = 4.5

# id, N, M, D, scale, feature options
CASES = [
    ("N1-D8", 1, 1, 8, 10.0, {}),
    ("N37xM53-D20", 37, 53, 20, 14.3, {}),
    ("N70-D48-strided", 70, 70, 48, 20.0, {"layout": "strided"}),
    ("N33xM41-D24-colmajor", 33, 41, 24, 5.0, {"layout": "colmajor"}),
    ("N50-D32-scale100", 50, 50, 32, 100.0, {}),
    ("N60-D16-duplicate-rows", 60, 60, 16, 30.0, {"duplicate_rows": True}),
]


def _ids(n: int, m: int, seed: int):
    """Owner-style ids: rows 0..n-1, columns drawn from them (several columns per row, some rows
    with none) plus -1 (no row), so every rule selects some pairs and leaves some. Row 0 always keeps
    a pair (a column with another id), so no row is left with every pair excluded unless n == 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    cols = torch.randint(-1, n, (m,), generator=g)
    if n > 1:
        cols[0] = n - 1
    return rows.to(DEVICE), cols.to(DEVICE)


def _weights(n: int, seed: int) -> torch.Tensor:
    """Upstream gradient of r: random signs and sizes, the same values for every backend."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(backend, a, b, scale, row_ids, col_ids, rule, weights, penalty=PENALTY):
    """[r, dA, dB, ds] for the upstream gradient `weights` on the rows whose r is finite."""
    a, b, scale = leaves(a, b, scale)
    r = clip_row_lse(a, b, scale, row_ids, col_ids, rule=rule, penalty=penalty, backend=backend)
    finite = torch.isfinite(r)
    objective = (torch.where(finite, r, torch.zeros_like(r)) * weights.to(r)).sum()
    return [r, *torch.autograd.grad(objective, (a, b, scale))]


def _inputs(case, dtype, seed):
    _, n, m, d, s, opts = case
    a = features(n, d, dtype=dtype, seed=seed, **opts)
    b = features(m, d, dtype=dtype, seed=seed + 1, **opts)
    scale = torch.tensor(s, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    return a, b, scale


def check_against_reference(backend, dtype, case, rule):
    seed = fresh_seed()
    a, b, scale = _inputs(case, dtype, seed)
    row_ids, col_ids = _ids(a.shape[0], b.shape[0], seed)
    if case[1] == 1 and rule == "exclude_equal":
        col_ids = col_ids + 5  # one row, one column: keep the pair (the empty row has its own test)
    w = _weights(a.shape[0], seed)
    out = run(backend, a, b, scale, row_ids, col_ids, rule, w)
    ref = run("reference", *as_reference(a, b, scale), row_ids.cpu(), col_ids.cpu(), rule, w)
    plain = run("reference", a, b, scale, row_ids, col_ids, rule, w)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_close_to_reference(out[:3], ref[:3], dtype, ["row_lse", "d_rows", "d_cols"], baseline=plain[:3])
    # d_scale = Σ_ij G_ij⟨A_i, B_j⟩ sums terms of both signs (random upstream signs, duplicate rows):
    # its rounding error scales with Σ_ij |G_ij⟨A_i, B_j⟩|, not with the (possibly cancelled) total.
    magnitude = _scale_grad_magnitude(*as_reference(a, b, scale), row_ids.cpu(), col_ids.cpu(), rule, w)
    err = (out[3].double().cpu() - ref[3].cpu()).abs().item()
    limit = max(TOLERANCE[dtype] * max(magnitude, ref[3].abs().item()),
                2 * (plain[3].double().cpu() - ref[3].cpu()).abs().item())
    assert err <= limit, f"d_scale: error {err:.3g} > {limit:.3g} ({dtype}; Σ|terms| = {magnitude:.3g}, seed {seed})"


def _scale_grad_magnitude(a, b, scale, row_ids, col_ids, rule, weights, penalty=PENALTY) -> float:
    """Σ_ij |w_i·P_ij·⟨A_i, B_j⟩| in float64, P the row softmax of the rule's logits."""
    dots = a.detach() @ b.detach().T
    equal = row_ids[:, None] == col_ids[None, :]
    logits = dots * scale.detach()
    if rule == "exclude_equal":
        logits = logits.masked_fill(equal, float("-inf"))
    else:
        logits = logits + penalty * dots * (equal if rule == "penalise_equal" else ~equal)
    p = torch.softmax(logits, dim=1).nan_to_num(0.0)
    return (weights[:, None].abs() * p * dots.abs()).sum().item()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_float64_reference_float32(backend, case, rule):
    check_against_reference(backend, torch.float32, case, rule)


OTHER_DTYPE_CASES = [c for c in CASES if c[0] in ("N37xM53-D20", "N60-D16-duplicate-rows")]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", OTHER_DTYPE_CASES, ids=[c[0] for c in OTHER_DTYPE_CASES])
@pytest.mark.parametrize("backend,dtype", [p for p in backend_dtype_params() if "float32" not in p.id])
def test_matches_float64_reference_other_dtypes(backend, dtype, case, rule):
    check_against_reference(backend, dtype, case, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_float64_reference(backend, rule, small_blocks):
    """16×16 tiles, many forward row groups, 3-tile gradient blocks: the ids read at every tile and
    block offset, rows merged across column groups."""
    check_against_reference(backend, torch.float32, ("N45xM70-D24", 45, 70, 24, 10.0, {}), rule)


@pytest.mark.parametrize("rule", RULES)
def test_reference_is_the_formula(rule):
    """The reference against the logits written out: −∞ on excluded pairs, + α·⟨A_i, B_j⟩ (no
    gradient through it) on penalised ones, in float64."""
    seed = fresh_seed()
    n, m, d, s = 9, 14, 6, 7.0
    a, b = features(n, d, dtype=torch.float64, seed=seed, device="cpu"), features(m, d, dtype=torch.float64,
                                                                                  seed=seed + 1, device="cpu")
    row_ids, col_ids = (x.cpu() for x in _ids(n, m, seed))
    w = _weights(n, seed)
    got = run("reference", a, b, torch.tensor(s, dtype=torch.float64), row_ids, col_ids, rule, w)

    a, b, scale = leaves(a, b, torch.tensor(s, dtype=torch.float64))
    logits = torch.empty(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            dot = (a[i] * b[j]).sum()
            equal = bool(row_ids[i] == col_ids[j])
            if rule == "exclude_equal" and equal:
                logits[i, j] = float("-inf")
            elif (rule == "penalise_equal" and equal) or (rule == "penalise_unequal" and not equal):
                logits[i, j] = scale * dot + PENALTY * dot.detach()
            else:
                logits[i, j] = scale * dot
    r = torch.logsumexp(logits, 1)
    expected = [r, *torch.autograd.grad((r * w).sum(), (a, b, scale))]
    for name, x, y in zip(["row_lse", "d_rows", "d_cols", "d_scale"], got, expected):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
@pytest.mark.parametrize("n", [1, 21])
def test_row_with_every_pair_excluded(backend, n):
    """A row whose every column has its id (query_to_query with one query): r = −∞ and a zero
    gradient, never NaN; the other rows are unchanged."""
    seed = fresh_seed()
    a, b = features(n, 12, seed=seed), features(n + 3, 12, seed=seed + 1)
    row_ids = torch.arange(n, device=DEVICE)
    col_ids = torch.zeros(n + 3, dtype=torch.long, device=DEVICE)  # row 0 owns every column
    a_, b_, scale = leaves(a, b, torch.tensor(10.0, device=DEVICE))
    r = clip_row_lse(a_, b_, scale, row_ids, col_ids, rule="exclude_equal", backend=backend)
    excluded_everywhere = (col_ids[None, :] == row_ids[:, None]).all(1)
    assert torch.equal(torch.isneginf(r), excluded_everywhere)
    # what sentence-transformers does with it: logaddexp with a finite term of another direction
    other = (a_ * b_[:n]).sum(-1) * 3.0
    loss = torch.logaddexp(other, r).sum()
    grads = torch.autograd.grad(loss, (a_, b_, scale))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    if n == 1:
        # r = −∞ contributes nothing: the gradient is that of `other` alone
        other = (a_ * b_[:n]).sum(-1) * 3.0
        expected = torch.autograd.grad(other.sum(), (a_, b_, scale), allow_unused=True, materialize_grads=True)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)
    else:
        ref = run("reference", *as_reference(a, b, torch.tensor(10.0)), row_ids.cpu(), col_ids.cpu(),
                  "exclude_equal", _weights(n, seed))
        out = run(backend, a, b, torch.tensor(10.0, device=DEVICE), row_ids, col_ids, "exclude_equal",
                  _weights(n, seed))
        assert torch.isneginf(out[0][0]) and torch.isneginf(ref[0][0])
        assert_close_to_reference([out[0][1:], *out[1:]], [ref[0][1:], *ref[1:]], torch.float32,
                                  ["row_lse", "d_rows", "d_cols", "d_scale"])


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_input_gives_nan_even_behind_an_excluded_pair(backend, rule, monkeypatch):
    """Unvalidated, a NaN feature in a column makes every row NaN, also where that pair is excluded."""
    monkeypatch.setattr(_validation, "_validation_on", False)
    a, b = features(20, 8, seed=1), features(30, 8, seed=2)
    b[5, 3] = float("nan")
    row_ids = torch.arange(20, device=DEVICE)
    col_ids = torch.arange(30, device=DEVICE) % 20
    r = clip_row_lse(a, b, 10.0, row_ids, col_ids, rule=rule, penalty=PENALTY, backend=backend)
    assert torch.isnan(r).all()


def test_bad_arguments_name_the_argument():
    a, b = features(4, 8), features(5, 8)
    rows, cols = torch.arange(4, device=DEVICE), torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match="rule must be one of"):
        clip_row_lse(a, b, 10.0, rows, cols, rule="exclude")
    with pytest.raises(ValueError, match="needs both row_ids and col_ids"):
        clip_row_lse(a, b, 10.0, rows, None, rule="exclude_equal")
    with pytest.raises(ValueError, match=r"col_ids must have shape \(5,\)"):
        clip_row_lse(a, b, 10.0, rows, cols[:4], rule="exclude_equal")
    with pytest.raises(ValueError, match="penalty must be a finite number"):
        clip_row_lse(a, b, 10.0, rows, cols, rule="penalise_equal", penalty=float("inf"))
    with pytest.raises(ValueError, match="cols has feature dimension"):
        clip_row_lse(a, features(5, 7), 10.0, rows, cols, rule="penalise_equal")


@pytest.mark.parametrize("backend", fast_backends())
def test_compiles_into_one_graph(backend, monkeypatch):
    """The pair-rule operator has fake implementations: torch.compile(fullgraph=True) traces it."""
    monkeypatch.setattr(_validation, "_validation_on", False)
    torch._dynamo.reset()
    a, b = leaves(features(20, 8, seed=3), features(26, 8, seed=4))
    rows, cols = torch.arange(20, device=DEVICE), torch.arange(26, device=DEVICE) % 20

    def f(a, b):
        return clip_row_lse(a, b, 10.0, rows, cols, rule="penalise_unequal", penalty=2.0, backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(a, b)
    grads = torch.autograd.grad(value, (a, b))
    expected = f(a, b)
    torch.testing.assert_close(value, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (a, b))):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", fast_backends())
def test_operator_schema_fake_and_autograd_agree(backend):
    from pyclipfast._ops import ops

    a, b = features(12, 8, seed=5).requires_grad_(), features(15, 8, seed=6).requires_grad_()
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    rows, cols = torch.arange(12, device=DEVICE), torch.arange(15, device=DEVICE) % 12
    pcf.clip_loss(a.detach(), b.detach()[:12], 10.0, backend=backend)  # registers the operators
    op = ops("clip_pairs", backend)["forward"]
    torch.library.opcheck(op, (a, b, scale, rows, cols, 1, 0.0), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, (a, b, scale, rows, cols, 3, 2.5), test_utils=("test_schema", "test_faketensor"))
