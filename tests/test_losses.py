"""The VICRegL losses: the plain reference module against the original implementation's vectors, the
fast losses against the reference module on random configurations, and their building blocks."""
import pytest
import torch

import models.losses as fast
import models.losses_reference as reference
from models.losses import check_num_matches, global_loss, local_loss, variance_covariance

REL = 1e-9
IMPLEMENTATIONS = {"fast": fast, "reference": reference}
# Weights of (inv, var, cov) in the loss whose gradient is compared: distinct, so that a wrong
# gradient of one term cannot hide behind another's.
TERM_WEIGHTS = (0.3, 1.7, 0.9)


def _close(a, b, rel=REL):
    a, b = torch.as_tensor(a, dtype=torch.float64).detach(), torch.as_tensor(b, dtype=torch.float64).detach()
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale) <= rel


def _weighted(terms):
    return sum(w * t for w, t in zip(TERM_WEIGHTS, terms))


def _global_cases(data_dir):
    return torch.load(data_dir / "global_loss.pt", weights_only=True)


def _local_cases(data_dir):
    return torch.load(data_dir / "local_loss.pt", weights_only=True)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_global_loss_matches_reference(data_dir, impl):
    cases = _global_cases(data_dir)
    assert len(cases) >= 2
    for case in cases:
        views = [v.clone().requires_grad_() for v in case["views"]]
        inv, var, cov = IMPLEMENTATIONS[impl].global_loss(views)
        (inv + var + cov).backward()
        for got, key in ((inv, "inv"), (var, "var"), (cov, "cov")):
            assert got.dtype == torch.float64
            assert _close(got, case[key]), (key, float(got), float(case[key]))
        for v, g in zip(views, case["grads"]):
            assert _close(v.grad, g)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_local_loss_matches_reference(data_dir, impl):
    cases = _local_cases(data_dir)
    assert len(cases) >= 4
    for case in cases:
        cfg = case["config"]
        maps = [m.clone().requires_grad_() for m in case["maps"]]
        inv, var, cov = IMPLEMENTATIONS[impl].local_loss(maps, case["locations"], num_matches=cfg["num_matches"],
                                                         l2_all_matches=bool(cfg["l2_all_matches"]))
        (inv + var + cov).backward()
        for got, key in ((inv, "inv"), (var, "var"), (cov, "cov")):
            assert _close(got, case[key]), (cfg, key, float(got), float(case[key]))
        for m, g in zip(maps, case["grads"]):
            assert _close(m.grad, g), cfg


# ----------------------------------------------------------------------------- fast = reference module

def _random_embeddings(views, batch, dim, seed=0):
    """V embeddings (B, D), channels scaled from 0.3 to 1.5 so the variance hinge is active for some."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 1.5, dim, dtype=torch.float64)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale for _ in range(views)]


def _random_views(b=4, c=6, sizes=(7, 7, 3, 3), seed=0):
    """Maps (B, s², C) with channels scaled from 0.3 to 1.5, and grids (B, s, s, 2) of uniform random
    points in a 100-pixel image: continuous values, so no two distances tie."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 1.5, c, dtype=torch.float64)
    maps = [torch.randn(b, s * s, c, generator=g, dtype=torch.float64) * scale for s in sizes]
    locs = [torch.rand(b, s, s, 2, generator=g, dtype=torch.float64) * 100 for s in sizes]
    return maps, locs


def _loss_and_grads(fn, leaves, *args, bf16_autocast=False, backward_in_autocast=False):
    """(inv, var, cov) of fn on copies of ``leaves``, and the gradients of their weighted sum. The
    training loop runs the backward outside autocast; ``backward_in_autocast`` runs it inside."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        terms = fn(leaves, *args)
        if backward_in_autocast:
            return terms, torch.autograd.grad(_weighted(terms), leaves)
    return terms, torch.autograd.grad(_weighted(terms), leaves)


def _assert_same(got, want, rel=REL):
    (got_terms, got_grads), (want_terms, want_grads) = got, want
    for name, a, b in zip(("inv", "var", "cov"), got_terms, want_terms):
        assert _close(a, b, rel), (name, float(a), float(b))
    for v, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert _close(a, b, rel), f"gradient of view {v}"


# (views, batch N, width D, (inv, var, cov) coefficients): the Gram form (N < D) and the covariance
# form (N >= D), which the reference vectors (all N < D) do not reach.
GLOBAL_CONFIGS = {
    "2views-gram": (2, 4, 32, (25.0, 25.0, 1.0)),
    "3views-covariance-coeffs": (3, 16, 8, (1.5, 0.7, 3.0)),
    "8views-square": (8, 7, 7, (25.0, 25.0, 1.0)),
    "5views-gram-coeffs": (5, 12, 40, (2.0, 5.0, 0.5)),
}


@pytest.mark.parametrize("config", GLOBAL_CONFIGS)
def test_fast_global_loss_equals_reference_module(config):
    views, batch, dim, coeffs = GLOBAL_CONFIGS[config]
    z = _random_embeddings(views, batch, dim)
    _assert_same(_loss_and_grads(global_loss, z, *coeffs), _loss_and_grads(reference.global_loss, z, *coeffs))


# (batch, channels, map sides (views 0 and 1 first), num_matches, l2_all_matches, fast_vc_reg, coefficients)
LOCAL_CONFIGS = {
    "2+2views-all": (4, 12, (7, 7, 3, 3), (20, 4), True, False, (25.0, 25.0, 1.0)),
    "2+3views-topk": (5, 6, (7, 7, 3, 3, 3), (20, 4), False, False, (25.0, 25.0, 1.0)),
    "2+2views-covariance-coeffs": (9, 4, (5, 5, 2, 2), (7, 3), False, False, (1.5, 0.7, 3.0)),
    "2views-keep-every-position": (6, 8, (4, 4), (16, 16), False, False, (25.0, 25.0, 1.0)),
    "unequal-large-crops": (4, 6, (7, 5, 3), (10, 2), True, False, (2.0, 5.0, 0.5)),
    "fast-vc-all-coeffs": (3, 10, (6, 6, 3), (12, 9), True, True, (2.0, 5.0, 0.5)),
    "fast-vc-topk-covariance": (8, 5, (5, 5, 3, 3), (9, 4), False, True, (25.0, 25.0, 1.0)),
}


@pytest.mark.parametrize("config", LOCAL_CONFIGS)
def test_fast_local_loss_equals_reference_module(config):
    batch, channels, sides, num_matches, l2_all, fast_vc, coeffs = LOCAL_CONFIGS[config]
    maps, locs = _random_views(batch, channels, sides)
    args = (locs, num_matches, l2_all, *coeffs, fast_vc)
    _assert_same(_loss_and_grads(local_loss, maps, *args), _loss_and_grads(reference.local_loss, maps, *args))


# ----------------------------------------------------------------------------- precision under autocast

# Float32 arithmetic is within ~2e-7 of float64 here (values and gradients). Losses computed in
# bfloat16 (8-bit mantissa) are off by 2e-3 or more, and covariance and matching matmuls left to
# autocast by 2e-4 or more (values) and 6e-2 (local gradients); so 1e-5 separates them with margin.
AUTOCAST_REL = 1e-5


def _autocast_case(kind):
    """(fast loss, reference loss, float32 leaves, other float32 arguments)."""
    if kind == "local":
        maps, locs = _random_views(8, 16, (7, 7, 3, 3), seed=3)
        return local_loss, reference.local_loss, [m.float() for m in maps], ([g.float() for g in locs],)
    batch, dim = {"global-gram": (8, 64), "global-covariance": (32, 16)}[kind]
    return global_loss, reference.global_loss, [z.float() for z in _random_embeddings(4, batch, dim, seed=3)], ()


@pytest.mark.parametrize("kind", ["local", "global-gram", "global-covariance"])
def test_losses_match_float64_under_bf16_autocast(kind):
    fn, oracle, leaves, rest = _autocast_case(kind)
    got = _loss_and_grads(fn, leaves, *rest, bf16_autocast=True)
    assert all(t.dtype == torch.float32 for t in got[0] + got[1])
    as64 = lambda ts: [t.double() for t in ts]  # the same values, exactly
    _assert_same(got, _loss_and_grads(oracle, as64(leaves), *map(as64, rest)), AUTOCAST_REL)


@pytest.mark.parametrize("kind", ["local", "global-gram", "global-covariance"])
def test_hand_written_gradients_ignore_an_enclosing_autocast(kind):
    """A user may call .backward() inside the autocast block: the gradients stay float32-accurate."""
    fn, oracle, leaves, rest = _autocast_case(kind)
    got = _loss_and_grads(fn, leaves, *rest, bf16_autocast=True, backward_in_autocast=True)
    as64 = lambda ts: [t.double() for t in ts]
    _assert_same(got, _loss_and_grads(oracle, as64(leaves), *map(as64, rest)), AUTOCAST_REL)


@pytest.mark.parametrize("kind", ["local", "global-gram"])
def test_bfloat16_inputs_are_computed_in_float32(kind):
    fn, oracle, leaves, rest = _autocast_case(kind)
    low = [t.to(torch.bfloat16) for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = fn(low, *rest)
    assert all(t.dtype == torch.float32 for t in terms)
    want = oracle([t.double() for t in low], *[[t.double() for t in r] for r in rest])
    for name, a, b in zip(("inv", "var", "cov"), terms, want):
        assert _close(a, b, AUTOCAST_REL), (name, float(a), float(b))


# ----------------------------------------------------------------------------- building blocks

def test_coefficients_scale_terms(data_dir):
    case = _global_cases(data_dir)[0]
    base = global_loss(case["views"])
    scaled = global_loss(case["views"], inv_coeff=1.0, var_coeff=2.0, cov_coeff=3.0)
    assert _close(scaled[0] * 25, base[0])
    assert _close(scaled[1] * 25 / 2, base[1])
    assert _close(scaled[2] / 3, base[2])


@pytest.mark.parametrize("n,d", [(6, 40), (40, 6), (16, 16)])
def test_gram_and_covariance_forms_and_shards_equal_the_plain_formula(n, d):
    torch.manual_seed(0)
    x = (torch.randn(3, n, d, dtype=torch.float64) * 0.5 + 0.1).requires_grad_()
    # the reference module takes the batch first: (N, slots, D)
    want_var, want_cov = reference.variance(x.transpose(0, 1)), reference.covariance(x.transpose(0, 1))
    want_grad = torch.autograd.grad((want_var * torch.tensor([1., 2., 3.])).sum() + (want_cov * 0.7).sum(), x)[0]
    var, cov = variance_covariance(x)
    assert _close(var, want_var, 1e-12) and _close(cov, want_cov, 1e-12)
    for world in (1, 2, 3, 4):
        # Shares are W times each process's part: their mean over processes is the value.
        shares = [variance_covariance(x, (r, world)) for r in range(world)]
        assert _close(sum(c for _, c in shares) / world, want_cov, 1e-12), world
        loss = sum(((v * torch.tensor([1., 2., 3.])).sum() + (c * 0.7).sum()) / world for v, c in shares)
        assert _close(torch.autograd.grad(loss, x)[0], want_grad, 1e-10), world


@pytest.mark.parametrize("n,d,shard", [(5, 7, None), (7, 4, None), (5, 7, (1, 2)), (7, 4, (0, 3))])
def test_variance_covariance_gradcheck(n, d, shard):
    torch.manual_seed(0)
    x = (torch.randn(2, n, d, dtype=torch.float64) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: variance_covariance(t, shard), (x,))


def test_variance_covariance_plain_definition():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 5, dtype=torch.float64) * torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0], dtype=torch.float64)
    var, cov = variance_covariance(x)
    for s in range(2):
        xs = x[s] - x[s].mean(0)
        std = torch.sqrt(xs.var(0) + 1e-4)
        c = xs.T @ xs / 8
        off = c - torch.diag(torch.diagonal(c))
        assert _close(var[s], torch.relu(1 - std).mean(), 1e-12)
        assert _close(cov[s], off.pow(2).sum() / 5, 1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_match_keeps_closest_positions_in_position_order(impl):
    # a: 5 positions on a line; b: 2 positions. Distances to nearest b: 0.1, 3, 0.2, 5, 0.05.
    a = torch.tensor([[[0.1], [3.0], [10.2], [15.0], [9.95]]], dtype=torch.float64)
    b = torch.tensor([[[0.0], [10.0]]], dtype=torch.float64)
    feats_a = torch.arange(5, dtype=torch.float64).view(1, 5, 1)
    feats_b = torch.tensor([[[100.0], [200.0]]], dtype=torch.float64)
    x, y = IMPLEMENTATIONS[impl].match(a, b, feats_a, feats_b, k=3)
    # kept positions 0, 2, 4 (not distance order 4, 0, 2); their neighbours 0, 1, 1
    assert x.flatten().tolist() == [0.0, 2.0, 4.0]
    assert y.flatten().tolist() == [100.0, 200.0, 200.0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_match_ties_go_to_smaller_index(impl):
    a = torch.tensor([[[1.0], [1.0], [1.0]]])
    b = torch.tensor([[[0.0], [2.0]]])  # every a is at distance 1 of both b positions
    fa = torch.arange(3.0).view(1, 3, 1)
    fb = torch.tensor([[[10.0], [20.0]]])
    x, y = IMPLEMENTATIONS[impl].match(a, b, fa, fb, k=2)
    assert x.flatten().tolist() == [0.0, 1.0]
    assert y.flatten().tolist() == [10.0, 10.0]


def test_invalid_num_matches_names_the_sizes():
    maps, locs = _random_views(sizes=(7, 7, 3))
    with pytest.raises(ValueError, match=r"--num_matches \[20, 10\].*only 9"):
        local_loss(maps, locs, num_matches=(20, 10))
    with pytest.raises(ValueError, match="only 49"):
        check_num_matches([49, 49], [50, 4])
    check_num_matches([49, 49, 9], [20, 4])  # valid: no error


def test_grid_and_map_size_mismatch_is_reported():
    maps, locs = _random_views(sizes=(7, 7))
    locs[1] = locs[1][:, :3, :3]
    with pytest.raises(ValueError, match="view 1.*49 positions.*9"):
        local_loss(maps, locs)


def test_fast_vc_reg_is_per_view_statistics_plus_pair_invariance():
    maps, locs = _random_views()
    inv_fast, var_fast, cov_fast = local_loss(maps, locs, fast_vc_reg=True)
    inv_full, _, _ = local_loss(maps, locs)
    assert _close(inv_fast, inv_full, 1e-12)  # invariance unchanged
    # every position of a view is a slot: mean over positions, then over views
    var = sum(reference.variance(m).mean() for m in maps) / len(maps)
    cov = sum(reference.covariance(m).mean() for m in maps) / len(maps)
    assert _close(var_fast, 25 * var, 1e-12)
    assert _close(cov_fast, cov, 1e-12)
    assert var_fast.ndim == 0 and cov_fast.ndim == 0


def test_at_least_two_views_are_required():
    with pytest.raises(ValueError, match="at least 2 views"):
        global_loss([torch.randn(4, 3)])
