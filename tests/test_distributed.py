"""Two gloo processes, each with half the batch, must compute what one process computes on all of it."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.losses import global_loss, local_loss

WORLD = 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    b, d, c = 8, 24, 6
    emb = [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(4)]
    sizes = (7, 7, 3, 3)
    maps = [torch.randn(b, s * s, c, generator=g, dtype=torch.float64) for s in sizes]
    locs = [torch.rand(b, s, s, 2, generator=g, dtype=torch.float64) * 100 for s in sizes]
    return emb, maps, locs


def _losses(emb, maps, locs):
    emb = [e.clone().requires_grad_() for e in emb]
    maps = [m.clone().requires_grad_() for m in maps]
    out = {}
    for name, fn, args, leaves in (
            ("global", global_loss, (emb,), emb),
            ("local", lambda m, l: local_loss(m, l, l2_all_matches=False, num_matches=(5, 2)), (maps, locs), maps),
            ("local_all", lambda m, l: local_loss(m, l), (maps, locs), maps),
            ("local_fast", lambda m, l: local_loss(m, l, fast_vc_reg=True), (maps, locs), maps)):
        terms = fn(*args)
        grads = torch.autograd.grad(sum(terms), leaves)
        out[name] = ([t.detach() for t in terms], grads)
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    emb, maps, locs = _inputs()
    half = lambda xs: [x.chunk(WORLD)[rank] for x in xs]
    out = _losses(half(emb), half(maps), half(locs))
    # Invariance is a per-process mean: average it like DDP averages gradients.
    for name, (terms, _) in out.items():
        dist.all_reduce(terms[0])
        terms[0] /= WORLD
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    full = _losses(*_inputs())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, (terms, grads) in full.items():
        for r, out in enumerate(ranks):
            for got, want in zip(out[name][0], terms):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name} value")
            for got, want in zip(out[name][1], grads):
                # DDP averages parameter gradients over processes: grad / W is this slice's share.
                torch.testing.assert_close(got / WORLD, want.chunk(WORLD)[r], rtol=1e-10, atol=1e-12,
                                           msg=f"{name} gradient, rank {r}")
