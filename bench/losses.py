"""Time the VICRegL losses (forward + backward) against a plain formulation run in the same process.

    python bench/losses.py                         # N 64 (plus the sweep, precision and processes below)
    python bench/losses.py --sweep --processes     # only the default shapes

The plain formulation is models/losses_reference.py, the losses written as the paper's equations:
a D x D (or C x C per slot) covariance matrix for every view and matched slot, pairs in Python
loops. Ratios are plain / ours; the reference implementation's timings on a 2-core CPU (12.7 s
local, 10.5 s global at the default shapes) are printed for scale.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.losses import global_loss, local_loss  # noqa: E402
from models.losses_reference import directions, matched_terms, view_pairs  # noqa: E402
# the plain formulation, also used by bench/train_step.py
from models.losses_reference import global_loss as plain_global, local_loss as plain_local  # noqa: E402,F401

REFERENCE_SECONDS = {"local": 12.7, "global": 10.5}


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


def _time_plain_local_streaming(maps, locs, repeat, num_matches=(20, 4)):
    """The plain local loss with a backward per matching direction, so that its per-slot covariance
    matrices never all sit in memory at once (the same arithmetic and result as plain_local)."""
    best = float("inf")
    grids = [g.flatten(1, 2) for g in locs]
    pairs = view_pairs(len(maps))
    for _ in range(repeat):
        for t in maps:
            t.grad = None
        start = time.perf_counter()
        for i, j in pairs:
            for x, y in directions(maps, grids, i, j, num_matches, l2_all_matches=True):
                inv, var, cov = matched_terms(x, y)
                # each direction is half of its matching's average, then the mean over pairs
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
