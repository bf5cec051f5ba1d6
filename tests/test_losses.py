"""The VICRegL losses against the reference implementation's vectors, and their building blocks."""
import pytest
import torch

from models.losses import check_num_matches, global_loss, local_loss, match, variance_covariance

REL = 1e-9


def _close(a, b, rel=REL):
    a, b = torch.as_tensor(a, dtype=torch.float64).detach(), torch.as_tensor(b, dtype=torch.float64).detach()
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale) <= rel


def _global_cases(data_dir):
    return torch.load(data_dir / "global_loss.pt", weights_only=True)


def _local_cases(data_dir):
    return torch.load(data_dir / "local_loss.pt", weights_only=True)


def test_global_loss_matches_reference(data_dir):
    cases = _global_cases(data_dir)
    assert len(cases) >= 2
    for case in cases:
        views = [v.clone().requires_grad_() for v in case["views"]]
        inv, var, cov = global_loss(views)
        (inv + var + cov).backward()
        for got, key in ((inv, "inv"), (var, "var"), (cov, "cov")):
            assert got.dtype == torch.float64
            assert _close(got, case[key]), (key, float(got), float(case[key]))
        for v, g in zip(views, case["grads"]):
            assert _close(v.grad, g)


def test_local_loss_matches_reference(data_dir):
    cases = _local_cases(data_dir)
    assert len(cases) >= 4
    for case in cases:
        cfg = case["config"]
        maps = [m.clone().requires_grad_() for m in case["maps"]]
        inv, var, cov = local_loss(maps, case["locations"], num_matches=cfg["num_matches"],
                                   l2_all_matches=bool(cfg["l2_all_matches"]))
        (inv + var + cov).backward()
        for got, key in ((inv, "inv"), (var, "var"), (cov, "cov")):
            assert _close(got, case[key]), (cfg, key, float(got), float(case[key]))
        for m, g in zip(maps, case["grads"]):
            assert _close(m.grad, g), cfg


def test_coefficients_scale_terms(data_dir):
    case = _global_cases(data_dir)[0]
    base = global_loss(case["views"])
    scaled = global_loss(case["views"], inv_coeff=1.0, var_coeff=2.0, cov_coeff=3.0)
    assert _close(scaled[0] * 25, base[0])
    assert _close(scaled[1] * 25 / 2, base[1])
    assert _close(scaled[2] / 3, base[2])


def _plain_vc(x):
    """Textbook per-slot statistics through the D x D covariance matrix (float64)."""
    x = x - x.mean(1, keepdim=True)
    n, d = x.shape[1], x.shape[2]
    cov = x.transpose(1, 2) @ x / (n - 1)
    off = cov.pow(2).sum((1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(1)
    var = torch.relu(1 - torch.sqrt(x.var(1) + 1e-4)).mean(1)
    return var, off / d


@pytest.mark.parametrize("n,d", [(6, 40), (40, 6), (16, 16)])
def test_gram_and_covariance_forms_and_shards_equal_the_plain_formula(n, d):
    torch.manual_seed(0)
    x = (torch.randn(3, n, d, dtype=torch.float64) * 0.5 + 0.1).requires_grad_()
    want_var, want_cov = _plain_vc(x)
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


def test_match_keeps_closest_positions_in_position_order():
    # a: 5 positions on a line; b: 2 positions. Distances to nearest b: 0.1, 3, 0.2, 5, 0.05.
    a = torch.tensor([[[0.1], [3.0], [10.2], [15.0], [9.95]]], dtype=torch.float64)
    b = torch.tensor([[[0.0], [10.0]]], dtype=torch.float64)
    feats_a = torch.arange(5, dtype=torch.float64).view(1, 5, 1)
    feats_b = torch.tensor([[[100.0], [200.0]]], dtype=torch.float64)
    x, y = match(a, b, feats_a, feats_b, k=3)
    # kept positions 0, 2, 4 (not distance order 4, 0, 2); their neighbours 0, 1, 1
    assert x.flatten().tolist() == [0.0, 2.0, 4.0]
    assert y.flatten().tolist() == [100.0, 200.0, 200.0]


def test_match_ties_go_to_smaller_index():
    a = torch.tensor([[[1.0], [1.0], [1.0]]])
    b = torch.tensor([[[0.0], [2.0]]])  # every a is at distance 1 of both b positions
    fa = torch.arange(3.0).view(1, 3, 1)
    fb = torch.tensor([[[10.0], [20.0]]])
    x, y = match(a, b, fa, fb, k=2)
    assert x.flatten().tolist() == [0.0, 1.0]
    assert y.flatten().tolist() == [10.0, 10.0]


def _random_views(b=4, c=6, sizes=(7, 7, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, s * s, c, generator=g, dtype=torch.float64) for s in sizes]
    locs = [torch.rand(b, s, s, 2, generator=g, dtype=torch.float64) * 100 for s in sizes]
    return maps, locs


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
    var = cov = 0
    for m in maps:
        v, c = variance_covariance(m.transpose(0, 1))  # slots = positions
        var, cov = var + v.mean(), cov + c.mean()
    assert _close(var_fast, 25 * var / len(maps), 1e-12)
    assert _close(cov_fast, cov / len(maps), 1e-12)
    assert var_fast.ndim == 0 and cov_fast.ndim == 0


def test_losses_run_in_full_precision_under_autocast():
    maps, locs = _random_views()
    maps = [m.float().requires_grad_() for m in maps]
    ref = local_loss([m.double() for m in maps], locs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [m.to(torch.bfloat16) for m in maps]
        out = local_loss(low, locs)
        glob = global_loss([m.flatten(1) for m in low[:2]])
    assert all(t.dtype == torch.float32 for t in out + glob)
    sum(out).backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in maps)
    # bf16 inputs lose precision, but the loss arithmetic itself is float32
    assert _close(out[0], ref[0], 2e-2)


def test_at_least_two_views_are_required():
    with pytest.raises(ValueError, match="at least 2 views"):
        global_loss([torch.randn(4, 3)])
