"""W gloo processes, each with 1/W of the batch, must compute what one process computes on all of it.

Values are compared after the mean over processes (what logging reports: sharded covariance terms
are per-process shares), gradients after dividing by W (what DDP's averaging does).
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.losses import global_loss, local_loss


def _inputs(batch, dim):
    g = torch.Generator().manual_seed(0)
    emb = [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(4)]
    sizes = (7, 7, 3, 3)
    maps = [torch.randn(batch, s * s, dim, generator=g, dtype=torch.float64) for s in sizes]
    locs = [torch.rand(batch, s, s, 2, generator=g, dtype=torch.float64) * 100 for s in sizes]
    return emb, maps, locs


LOSSES = {
    "global": lambda e, m, l, sh: (global_loss(e, shard=sh), e),
    "local": lambda e, m, l, sh: (local_loss(m, l, l2_all_matches=False, num_matches=(5, 2), shard=sh), m),
    "local_all": lambda e, m, l, sh: (local_loss(m, l, shard=sh), m),
    "local_fast": lambda e, m, l, sh: (local_loss(m, l, fast_vc_reg=True, shard=sh), m),
}


def _losses(emb, maps, locs, shard=None):
    out = {}
    for name, fn in LOSSES.items():
        e = [t.clone().requires_grad_() for t in emb]
        m = [t.clone().requires_grad_() for t in maps]
        terms, leaves = fn(e, m, locs, shard)
        grads = torch.autograd.grad(sum(terms), leaves)
        out[name] = ([t.detach() for t in terms], grads)
    return out


CONFIGS = [  # (batch, dim, shard)
    (8, 24, None),   # N < D: sharded Gram rows
    (8, 6, None),    # N > D: sharded covariance columns
    (8, 24, False),  # unsharded: every process computes everything
    (12, 5, None),
]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for batch, dim, shard in CONFIGS:
        if batch % world:
            results.append(None)
            continue
        emb, maps, locs = _inputs(batch, dim)
        part = lambda xs: [x.chunk(world)[rank] for x in xs]
        out = _losses(part(emb), part(maps), part(locs), shard)
        for terms, _ in out.values():
            for t in terms:
                dist.all_reduce(t)
                t /= world
        results.append(out)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_processes_equal_one(tmp_path, world):
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    checked = 0
    for c, (batch, dim, shard) in enumerate(CONFIGS):
        if batch % world:
            continue
        full = _losses(*_inputs(batch, dim))
        for name, (terms, grads) in full.items():
            for r, results in enumerate(ranks):
                got_terms, got_grads = results[c][name]
                for got, want in zip(got_terms, terms):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                               msg=f"{name} value, config {c}")
                for got, want in zip(got_grads, grads):
                    torch.testing.assert_close(got / world, want.chunk(world)[r], rtol=1e-10, atol=1e-12,
                                               msg=f"{name} gradient, rank {r}, config {c}")
                checked += 1
    assert checked >= 3 * len(LOSSES) * world


def _agreement_worker(rank, world, init_file, out_dir):
    """Each process has its own opinion; the decisions that run collectives must be shared."""
    import training
    import utils
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    stop = training.StopSignal(signals=())
    results = [stop.agree(rank == 0), stop.agree(False), stop.agree(rank == world - 1),
               utils.any_process(rank == 1), utils.any_process(False), utils.sum_over_processes(rank + 1),
               *utils.max_over_processes([rank, 2 - rank, 7 if rank == 1 else -1]),
               # --time-budget: process 0's clock for everyone, and "spent" when any process says so
               *stop.agree_clock(10.0 + rank, rank == 2), *stop.agree_clock(5.0 + rank, False)]
    torch.save(results, f"{out_dir}/agree{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_processes_agree_on_decisions_taken_on_their_own_clocks(tmp_path):
    world = 3
    mp.spawn(_agreement_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    expected = [True, False, True, True, False, 6, 2, 2, 7, 10.0, True, 5.0, False]
    for r in range(world):
        assert torch.load(tmp_path / f"agree{r}.pt", weights_only=True) == expected
