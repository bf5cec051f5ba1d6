"""Time the VICRegL losses (forward + backward) against a plain formulation run in the same process.

    python bench/losses.py                         # N 64 (plus the sweep, precision and processes below)
    python bench/losses.py --sweep --processes     # only the default shapes

The plain formulation is the textbook one: a D x D (or C x C per slot) covariance matrix for every
view and matched slot, pairs in Python loops. Ratios are plain / ours; the reference
implementation's timings on a 2-core CPU (12.7 s local, 10.5 s global at the default shapes) are
printed for scale.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.losses import global_loss, local_loss, match  # noqa: E402

REFERENCE_SECONDS = {"local": 12.7, "global": 10.5}


# ----------------------------------------------------------------------------- plain formulation

def _plain_vc(x):
    """x (N, D) -> (var, cov) by the covariance matrix itself."""
    x = x - x.mean(0)
    std = torch.sqrt(x.var(0) + 1e-4)
    c = x.T @ x / (x.shape[0] - 1)
    off = c - torch.diag(torch.diagonal(c))
    return F.relu(1 - std).mean(), off.pow(2).sum() / x.shape[1]


def plain_global(z, inv_c=25.0, var_c=25.0, cov_c=1.0):
    pairs = [(i, j) for i in range(2) for j in range(len(z)) if j != i]
    inv = sum(F.mse_loss(z[i], z[j]) for i, j in pairs) / len(pairs)
    vcs = [_plain_vc(e) for e in z]
    return inv_c * inv, var_c * sum(v for v, _ in vcs) / len(z), cov_c * sum(c for _, c in vcs) / len(z)


def _plain_slots(x, y):
    inv = F.mse_loss(x, y)
    var = cov = 0.0
    for s in range(x.shape[1]):  # one C x C covariance per slot
        vx, cx = _plain_vc(x[:, s])
        vy, cy = _plain_vc(y[:, s])
        var, cov = var + (vx + vy) / 2, cov + (cx + cy) / 2
    return inv, var / x.shape[1], cov / x.shape[1]


def plain_local(maps, locs, num_matches=(20, 4), inv_c=25.0, var_c=25.0, cov_c=1.0):
    grids = [g.flatten(1, 2) for g in locs]
    pairs = [(i, j) for i in range(2) for j in range(len(maps)) if j != i]
    inv = var = cov = 0.0
    for i, j in pairs:
        for a_d, b_d, a_f, b_f, k in ((maps[i], maps[j], maps[i], maps[j], maps[i].shape[1]),
                                      (maps[j], maps[i], maps[j], maps[i], maps[j].shape[1]),
                                      (grids[i], grids[j], maps[i], maps[j], num_matches[0]),
                                      (grids[j], grids[i], maps[j], maps[i], num_matches[1])):
            t = _plain_slots(*match(a_d, b_d, a_f, b_f, k))
            inv, var, cov = inv + t[0] / 2, var + t[1] / 2, cov + t[2] / 2
    n = len(pairs)
    return inv_c * inv / n, var_c * var / n, cov_c * cov / n


# ----------------------------------------------------------------------------- timing

def _time(fn, leaves, repeat):
    """Best wall time of forward + backward over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        sum(fn()).backward()
        best = min(best, time.perf_counter() - start)
    return best


def _time_plain_local_streaming(maps, locs, repeat):
    """The plain local loss with a backward per matching direction, so that its per-slot covariance
    matrices never all sit in memory at once (the same arithmetic and result as plain_local)."""
    best = float("inf")
    grids = [g.flatten(1, 2) for g in locs]
    pairs = [(i, j) for i in range(2) for j in range(len(maps)) if j != i]
    for _ in range(repeat):
        for t in maps:
            t.grad = None
        start = time.perf_counter()
        for i, j in pairs:
            for a_d, b_d, a_f, b_f, k in ((maps[i], maps[j], maps[i], maps[j], maps[i].shape[1]),
                                          (maps[j], maps[i], maps[j], maps[i], maps[j].shape[1]),
                                          (grids[i], grids[j], maps[i], maps[j], 20),
                                          (grids[j], grids[i], maps[j], maps[i], 4)):
                inv, var, cov = _plain_slots(*match(a_d, b_d, a_f, b_f, k))
                ((25 * inv + 25 * var + cov) / (2 * len(pairs))).backward()
        best = min(best, time.perf_counter() - start)
    return best


def inputs(batch, dim, channels, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sizes = [7, 7] + [3] * 6
    emb = [torch.randn(batch, dim, generator=g, dtype=dtype).requires_grad_() for _ in sizes]
    maps = [torch.randn(batch, s * s, channels, generator=g, dtype=dtype).requires_grad_() for s in sizes]
    locs = [torch.rand(batch, s, s, 2, generator=g, dtype=dtype) * 224 for s in sizes]
    return emb, maps, locs


def compare(batch, dim, channels, repeat, reference=False):
    emb, maps, locs = inputs(batch, dim, channels)
    rows = [("global", lambda: global_loss(emb), lambda: _time(lambda: plain_global(emb), emb, 1), emb),
            ("local", lambda: local_loss(maps, locs), lambda: _time_plain_local_streaming(maps, locs, 1), maps)]
    for name, ours, plain, leaves in rows:
        t_ours = _time(ours, leaves, repeat)
        t_plain = plain()
        ref = f"{REFERENCE_SECONDS[name] / t_ours:14.1f}x" if reference else ""
        print(f"{batch:6d} {name:8s}{t_plain:10.3f}{t_ours:10.3f}{t_plain / t_ours:12.1f}x{ref}", flush=True)


def precision(batch, dim, channels):
    """Relative difference of float32 results from float64 on the same inputs."""
    e64, m64, l64 = inputs(batch, dim, channels, dtype=torch.float64)
    for name, fn, args in (("global", global_loss, (e64,)), ("local", local_loss, (m64, l64))):
        exact = torch.stack(fn(*args)).detach()
        single = torch.stack(fn(*[[t.float() for t in a] for a in args])).detach().double()
        rel = float(((single - exact).abs() / exact.abs()).max())
        print(f"  {name:8s} max relative difference float32 vs float64 over (inv, var, cov): {rel:.2e}")


def _process(rank, world, init_file, batch, dim, channels, repeat, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    emb, maps, locs = inputs(batch, dim, channels)  # the same global batch everywhere
    part = lambda xs: [x.detach().chunk(world)[rank].clone().requires_grad_() for x in xs]
    emb, maps, locs = part(emb), part(maps), [l.chunk(world)[rank] for l in locs]
    times = []
    for fn, leaves in ((lambda: global_loss(emb), emb), (lambda: local_loss(maps, locs), maps)):
        best = float("inf")
        for _ in range(repeat):
            for t in leaves:
                t.grad = None
            dist.barrier()
            start = time.process_time()  # this process's CPU seconds: its share of the work
            sum(fn()).backward()
            best = min(best, time.process_time() - start)
        times.append(best)
    t = torch.tensor(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(t, out)
    dist.destroy_process_group()


def processes(batch, dim, channels, repeat, worlds):
    import tempfile
    import torch.multiprocessing as mp
    for world in worlds:
        if batch % world:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "t.pt")
            mp.start_processes(_process, args=(world, os.path.join(tmp, "init"), batch, dim, channels, repeat, out),
                               nprocs=world, start_method="spawn")
            g, l = torch.load(out).tolist()
        print(f"  W {world}: per-process CPU seconds (slowest process)  global {g:7.3f}   local {l:7.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="gathered batch N of the default comparison (64)")
    parser.add_argument("--dim", type=int, default=8192, help="global expander width D (default 8192)")
    parser.add_argument("--channels", type=int, default=512, help="local expander width C (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of ours; the best is kept")
    parser.add_argument("--sweep", type=int, nargs="*", default=[256, 1024],
                        help="further N to compare plain and ours at (the plain formulation takes minutes at 1024)")
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4],
                        help="gloo process counts for the sharded per-process timing (empty: skip)")
    parser.add_argument("--processes-batch", type=int, default=256,
                        help="gathered batch N of the sharded timing (the Gram work grows as N², the "
                             "gathering as N: sharding shows at larger N)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"D {args.dim}, C {args.channels}, views 2x7x7 + 6x3x3, {torch.get_num_threads()} threads, "
          f"forward + backward in seconds (ours: best of {args.repeat}; plain: one run)")
    print(f"{'N':>6s} {'loss':8s}{'plain':>10s}{'ours':>10s}{'plain/ours':>13s}{'reference/ours':>15s}")
    compare(args.batch, args.dim, args.channels, args.repeat, reference=(args.batch, args.dim, args.channels) == (64, 8192, 512))
    for n in args.sweep:
        compare(n, args.dim, args.channels, max(1, args.repeat - 2))
    print("precision at the default shapes:")
    precision(args.batch, args.dim, args.channels)
    if args.processes:
        print(f"sharded over W gloo processes (N {args.processes_batch} in all, one thread each):")
        processes(args.processes_batch, args.dim, args.channels, args.repeat, args.processes)


if __name__ == "__main__":
    main()
