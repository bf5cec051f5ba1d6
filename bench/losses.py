"""Time the VICRegL losses (forward + backward) against a plain formulation run in the same process.

    python bench/losses.py                 # default shapes: B 64, two 7x7 + six 3x3 views, C 512, D 8192
    python bench/losses.py --batch 256     # another per-process batch

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
    best = float("inf")
    for _ in range(repeat):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        sum(fn()).backward()
        best = min(best, time.perf_counter() - start)
    return best


def inputs(batch, dim, channels, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sizes = [7, 7] + [3] * 6
    emb = [torch.randn(batch, dim, generator=g, dtype=dtype).requires_grad_() for _ in sizes]
    maps = [torch.randn(batch, s * s, channels, generator=g, dtype=dtype).requires_grad_() for s in sizes]
    locs = [torch.rand(batch, s, s, 2, generator=g, dtype=dtype) * 224 for s in sizes]
    return emb, maps, locs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="per-process batch B (default 64)")
    parser.add_argument("--dim", type=int, default=8192, help="global expander width D (default 8192)")
    parser.add_argument("--channels", type=int, default=512, help="local expander width C (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emb, maps, locs = inputs(args.batch, args.dim, args.channels)
    print(f"B {args.batch}, D {args.dim}, C {args.channels}, views 2x7x7 + 6x3x3, "
          f"{torch.get_num_threads()} threads, forward + backward, best of {args.repeat}")
    rows = [("global", lambda: global_loss(emb), lambda: plain_global(emb), emb),
            ("local", lambda: local_loss(maps, locs), lambda: plain_local(maps, locs), maps)]
    print(f"{'loss':8s}{'plain s':>10s}{'ours s':>10s}{'plain/ours':>12s}{'reference/ours':>16s}")
    for name, ours, plain, leaves in rows:
        t_ours = _time(ours, leaves, args.repeat)
        t_plain = _time(plain, leaves, max(1, args.repeat - 2))
        ref = REFERENCE_SECONDS[name] if (args.batch, args.dim, args.channels) == (64, 8192, 512) else float("nan")
        print(f"{name:8s}{t_plain:10.3f}{t_ours:10.3f}{t_plain / t_ours:12.1f}x{ref / t_ours:15.1f}x")


if __name__ == "__main__":
    main()
