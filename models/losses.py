"""VICRegL losses: the global VICReg loss and the local loss on matched feature-map positions.

Built from small pieces that both losses share:
- ``variance_covariance``: the variance hinge and the off-diagonal covariance penalty of many
  "slots" at once (views for the global loss, matched positions for the local loss), each slot's
  statistics taken over the batch gathered from all processes;
- ``match`` / ``nearest``: nearest-neighbour matching of feature-map positions, in feature space or
  in image space.

Exact reformulations keep the cost low without changing the result:
- the sum of squared off-diagonal covariance entries is taken from the N x N Gram matrix when the
  batch N is smaller than the width D (‖XᵀX‖_F = ‖XXᵀ‖_F), else from the D x D covariance;
- every matching of every view pair is gathered into one (slots, batch, channels) tensor, so the
  local loss is a handful of large tensor operations; feature matching that keeps every position
  (``l2_all_matches``) uses the view itself as one side, whose statistics are computed once per
  view instead of once per pair;
- in a process group the variance/covariance work is sharded (see ``_distributed_vc``): the local
  loss's thousands of slots are split over the processes (one all_to_all each way); the global
  loss's few views use, when the gathered batch N is smaller than the width D, only each
  process's own rows of the Gram matrix, with no collective in the backward; otherwise 1/W of
  the covariance columns. Where a process computes a share, the value it returns is its share
  times W (the mean over processes, which logging takes, is the loss). Either way the gradients,
  once DDP averages them over processes, are exactly those of the unsharded loss.

All losses run in float32 (float64 inputs stay float64) with autocast disabled: the reference let
the covariance matmuls run in float16.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from utils import gather_batch, get_rank, get_world_size

__all__ = ["global_loss", "local_loss", "match", "nearest", "variance_covariance", "check_num_matches"]

VAR_EPS = 1e-4
Shard = Optional[Tuple[int, int]]  # (this process's index, number of processes)


def _full_precision(fn):
    """Run a loss in float32 (float64 stays float64) with autocast off."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = {t.device.type for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)}
        with torch.autocast(devices.pop() if len(devices) == 1 else "cpu", enabled=False):
            args = [[_upcast(t) for t in a] if isinstance(a, (list, tuple)) else a for a in args]
            return fn(*args, **kwargs)
    return wrapper


def _no_autocast(backward):
    """A hand-written backward that runs in its tensors' precision even when ``.backward()`` is
    called inside an autocast region (autocast would otherwise recast its matmuls to 16 bits)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device = next((g.device.type for g in grads if torch.is_tensor(g)), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return wrapper


def _upcast(t):
    return t.float() if torch.is_tensor(t) and t.dtype in (torch.float16, torch.bfloat16) else t


def _default_shard() -> Shard:
    world = get_world_size()
    return (get_rank(), world) if world > 1 else None


# ----------------------------------------------------------------------------- variance / covariance

class _VarCov(torch.autograd.Function):
    """Per-slot variance hinge and covariance penalty with a hand-written backward.

    Autograd would keep and revisit several (S, N, D) intermediates and run two matmuls for the
    Gram term's backward; the closed-form gradient needs one matmul and a few passes:
    with x centred, G = x xᵀ (or C = xᵀx with zeroed diagonal), the off-diagonal sum
    f = ‖G‖² - Σ_d col_sq_d² has ∂f/∂x = 4 (G x - x ⊙ col_sq) (or 4 x C), and the variance
    hinge depends on x only through col_sq (∂col_sq/∂x = 2x). Centring's backward subtracts the
    gradient's mean over N. With a shard (r, W) only rows (Gram) or columns (covariance) r are
    computed and the gradient has both the block's and its transpose's contributions.
    On CPUs the slots are processed a few at a time, so that each piece stays in the cache; the
    D x D blocks of the covariance form are recomputed in the backward rather than kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shard: Shard):
        s, n, d = x.shape
        r, w = shard or (0, 1)
        lo, hi = _bounds(n if n < d else d, r, w)
        xc = torch.empty_like(x)
        col_sq, off = x.new_empty(s, d), x.new_empty(s)
        blocks = x.new_empty(s, hi - lo, n) if n < d else None
        for c in _chunks(x):
            torch.sub(x[c], x[c].mean(dim=-2, keepdim=True), out=xc[c])
            torch.sum(xc[c].square(), dim=-2, out=col_sq[c])  # (N - 1)·variance, also the diagonal of xᵀx
            if n < d:  # N x N Gram rows [lo, hi): ‖XXᵀ‖² = ‖XᵀX‖², minus the diagonal's squares
                torch.matmul(xc[c][:, lo:hi], xc[c].transpose(-1, -2), out=blocks[c])
                off[c] = blocks[c].square().sum(dim=(-2, -1)) - col_sq[c].square().sum(dim=-1) / w
            else:  # D x D covariance columns [lo, hi), diagonal zeroed exactly (no cancellation)
                off[c] = _cov_block(xc[c], lo, hi).square().sum(dim=(-2, -1))
        std = torch.sqrt(col_sq / (n - 1) + VAR_EPS)
        var = F.relu(1 - std).mean(dim=-1)
        ctx.save_for_backward(xc, col_sq, std, *([blocks] if blocks is not None else []))
        ctx.lo, ctx.hi, ctx.w = lo, hi, w
        return var, off * w / ((n - 1) ** 2 * d)

    @staticmethod
    @_no_autocast
    def backward(ctx, g_var: Tensor, g_cov: Tensor):
        xc, col_sq, std, *blocks = ctx.saved_tensors
        lo, hi, w = ctx.lo, ctx.hi, ctx.w
        n, d = xc.shape[-2], xc.shape[-1]
        g_cov = (g_cov * w / ((n - 1) ** 2 * d))[..., None, None]  # (S, 1, 1)
        # ∂var/∂col_sq = -[std < 1] / (2·std·(N - 1)·D); ∂col_sq/∂x = 2x
        d_col = -(std < 1).to(xc.dtype) / (2 * std * (n - 1) * d) * g_var[..., None]  # (S, D)
        if n < d:
            d_col = d_col - 2 * col_sq * g_cov[..., 0] / w
        grad = torch.empty_like(xc)
        for c in _chunks(xc):
            x, gc, g = xc[c], g_cov[c], grad[c]
            torch.mul(x, (2 * d_col[c]).unsqueeze(-2), out=g)  # the one full-size elementwise pass
            # Rows or columns of xc sum to zero, so G·xc, xc·C and xc ⊙ d_col already have zero
            # mean over N and centring's backward is the identity; only the sharded Gram rows need it.
            if n < d:
                block = blocks[0][c]
                if w == 1:
                    g.baddbmm_(block * (4 * gc), x)
                else:
                    g.baddbmm_(block.transpose(-1, -2) * (2 * gc), x[:, lo:hi])
                    g[:, lo:hi].baddbmm_(block * (2 * gc), x)
                    g -= g.mean(dim=-2, keepdim=True)
            else:
                block = _cov_block(x, lo, hi)
                if w == 1:
                    g.baddbmm_(x, block * (4 * gc))
                else:
                    g.baddbmm_(x[..., lo:hi], block * (2 * gc))
                    g[..., lo:hi].baddbmm_(x, block.transpose(-1, -2) * (2 * gc))
        return grad, None


class _VarCovOwnRows(torch.autograd.Function):
    """The Gram form (N < D) across processes, each process differentiating its own rows only.

    Input: this process's rows x_r (S, B, D). The rows of all processes are gathered (no autograd),
    the statistics are taken on all N = B·W rows, but the Gram matrix is formed for the own rows
    only (B x N per slot, 1/W of the work), and its squared sum is summed over processes: the
    returned (var, cov) are the full values, the same on every process. The gradient of the own
    rows needs nothing else — ∂f/∂x_k = 4 Σ_j G_kj x_j uses row k of G — so the backward makes no
    collective at all; it is returned times W, which is what the gather layer's summed backward
    gives the unsharded loss (then DDP averages over processes).
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world: int):
        s, b, d = x.shape
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous())
        full = torch.cat(pieces, dim=1)  # (S, N, D)
        n = full.shape[1]
        lo, hi = rank * b, (rank + 1) * b
        xc = torch.empty_like(full)
        col_sq, off = full.new_empty(s, d), full.new_empty(s)
        blocks = full.new_empty(s, b, n)
        for c in _chunks(full):
            torch.sub(full[c], full[c].mean(dim=-2, keepdim=True), out=xc[c])
            torch.sum(xc[c].square(), dim=-2, out=col_sq[c])
            torch.matmul(xc[c][:, lo:hi], xc[c].transpose(-1, -2), out=blocks[c])
            off[c] = blocks[c].square().sum(dim=(-2, -1)) - col_sq[c].square().sum(dim=-1) / world
        dist.all_reduce(off)
        std = torch.sqrt(col_sq / (n - 1) + VAR_EPS)
        var = F.relu(1 - std).mean(dim=-1)
        ctx.save_for_backward(xc, col_sq, std, blocks)
        ctx.lo, ctx.hi, ctx.world = lo, hi, world
        return var, off / ((n - 1) ** 2 * d)

    @staticmethod
    @_no_autocast
    def backward(ctx, g_var: Tensor, g_cov: Tensor):
        xc, col_sq, std, blocks = ctx.saved_tensors
        lo, hi, world = ctx.lo, ctx.hi, ctx.world
        n, d = xc.shape[-2], xc.shape[-1]
        g_cov = (g_cov / ((n - 1) ** 2 * d))[..., None, None]
        d_col = -(std < 1).to(xc.dtype) / (2 * std * (n - 1) * d) * g_var[..., None] - 2 * col_sq * g_cov[..., 0]
        grad = xc.new_empty(xc.shape[0], hi - lo, d)
        for c in _chunks(xc):
            torch.mul(xc[c][:, lo:hi], (2 * d_col[c]).unsqueeze(-2), out=grad[c])
            grad[c].baddbmm_(blocks[c] * (4 * g_cov[c]), xc[c])
        return grad * world, None, None


def _cov_block(xc: Tensor, lo: int, hi: int) -> Tensor:
    """Columns [lo, hi) of xcᵀxc with the diagonal entries zeroed: (S, hi - lo, D)."""
    block = torch.matmul(xc[..., lo:hi].transpose(-1, -2), xc)
    block.diagonal(offset=lo, dim1=-2, dim2=-1).zero_()
    return block


def _chunks(x: Tensor) -> List[slice]:
    """Slices of the slot dimension: about 2 MB of x each on a CPU (cache-sized), all at once on a GPU."""
    s = x.shape[0]
    step = s if x.device.type != "cpu" else max(1, (1 << 19) // max(1, x[0].numel()))
    return [slice(i, min(s, i + step)) for i in range(0, s, step)]


def _bounds(size: int, r: int, w: int) -> Tuple[int, int]:
    """This process's share [lo, hi) of ``size`` rows or columns (as even as possible)."""
    return size * r // w, size * (r + 1) // w


class _SlotShard(torch.autograd.Function):
    """(S, B, D) per process -> (S_r, N, D): process r receives every process's rows of its own
    share of the slots (one all_to_all); the backward sends each process the gradient of its rows."""

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world: int) -> Tensor:
        bounds = [_bounds(x.shape[0], p, world) for p in range(world)]
        send = [x[lo:hi].contiguous() for lo, hi in bounds]
        lo, hi = bounds[rank]
        recv = [x.new_empty(hi - lo, x.shape[1], x.shape[2]) for _ in range(world)]
        dist.all_to_all(recv, send)
        ctx.bounds, ctx.rank = bounds, rank
        return torch.cat(recv, dim=1)

    @staticmethod
    @_no_autocast
    def backward(ctx, g: Tensor):
        world = len(ctx.bounds)
        send = [part.contiguous() for part in g.chunk(world, dim=1)]
        recv = [g.new_empty(hi - lo, g.shape[1] // world, g.shape[2]) for lo, hi in ctx.bounds]
        dist.all_to_all(recv, send)
        return torch.cat(recv, dim=0), None, None


def _distributed_vc(x: Tensor, weights: Tensor, shard: Optional[bool]) -> Tuple[Tensor, Tensor]:
    """Σ_s weights_s · (var_s, cov_s) for this process's x (S, B, D), statistics over all processes' batch.

    Unsharded (``shard=False``) or in one process: gather, then compute everything here. Sharded:
    - many slots (S >= 2W, the local loss): each process receives all rows of 1/W of the slots
      (``_SlotShard``) and returns its share times W;
    - few slots and N = B·W < D (the global loss): own Gram rows (``_VarCovOwnRows``), full values;
    - otherwise: gather, then 1/W of the covariance columns, shares times W.
    A share's mean over processes is the value; the gradients are those of the unsharded loss.
    """
    world = get_world_size()
    sharded = world > 1 and shard in (None, True)
    if sharded and x.shape[0] >= 2 * world:
        rank = get_rank()
        lo, hi = _bounds(x.shape[0], rank, world)
        var, cov = variance_covariance(_SlotShard.apply(x, rank, world))
        w = weights[lo:hi].to(var.dtype)
        return (var * w).sum() * world, (cov * w).sum() * world
    if sharded and x.shape[1] * world < x.shape[2]:
        var, cov = _VarCovOwnRows.apply(x, get_rank(), world)
    else:
        var, cov = variance_covariance(gather_batch(x, dim=1), _default_shard() if sharded else None)
    w = weights.to(var.dtype)
    return (var * w).sum(), (cov * w).sum()


def variance_covariance(x: Tensor, shard: Shard = None) -> Tuple[Tensor, Tensor]:
    """Variance hinge and covariance penalty per slot.

    x: (S, N, D): S independent slots, N samples (gathered over processes), D channels; centred here.
    Returns (var, cov), each (S,): var = mean_d relu(1 - sqrt(Var_n x + 1e-4)) (unbiased variance);
    cov = (sum of squared off-diagonal entries of xᵀx / (N - 1)) / D, or with ``shard = (r, W)``
    process r's share of it times W (see the module docstring).
    """
    if x.shape[-2] < 2:
        raise ValueError(f"variance needs at least 2 samples in the (gathered) batch, got {x.shape[-2]}")
    return _VarCov.apply(x, shard)


# ----------------------------------------------------------------------------- global loss

def _view_pairs(num_views: int) -> List[Tuple[int, int]]:
    """Ordered pairs (i, j), i in {0, 1} (the large crops), j != i: 2(V - 1) pairs."""
    if num_views < 2:
        raise ValueError(f"VICRegL needs at least 2 views (the two large crops), got {num_views}")
    return [(i, j) for i in range(2) for j in range(num_views) if j != i]


@_full_precision
def global_loss(embeddings: Sequence[Tensor], inv_coeff: float = 25.0, var_coeff: float = 25.0,
                cov_coeff: float = 1.0, shard: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg loss on the expanded pooled embeddings of all views.

    embeddings: V tensors (B, D); views 0 and 1 are the large crops. Invariance is the mean MSE
    over the pairs of ``_view_pairs``; variance and covariance the mean over views.
    ``shard``: split the covariance work over processes (default: when there is a process group).
    Returns (inv, var, cov), already multiplied by their coefficients.
    """
    z = torch.stack(list(embeddings))  # (V, B, D)
    num_pairs = len(_view_pairs(len(z)))
    # Σ_{i<2} Σ_{j≠i} ‖z_i - z_j‖²: the j = i term is zero, so no mask is needed.
    inv = sum((z - z[i]).square().sum() for i in range(2)) / (num_pairs * z[0].numel())
    mean = torch.full((len(z),), 1.0 / len(z), dtype=z.dtype, device=z.device)
    var, cov = _distributed_vc(z, mean, shard)  # means over views, statistics over the gathered batch
    return inv_coeff * inv, var_coeff * var, cov_coeff * cov


# ----------------------------------------------------------------------------- matching

@torch.no_grad()
def nearest(a: Tensor, b: Tensor, k: Optional[int]) -> Tuple[Optional[Tensor], Tensor]:
    """Keep the k positions of ``a`` nearest to their nearest neighbour in ``b``.

    a: (B, La, F), b: (B, Lb, F) (features or locations). Returns (kept, nn): kept (B, k) in
    increasing position order — the order matters, variance and covariance are taken per slot —
    and nn (B, k) the neighbour of each kept position. ``k=None`` keeps every position
    (kept is then None, meaning 0..La-1). Ties go to the smaller index at both steps.
    """
    a, b = _distance_dtype(a), _distance_dtype(b)
    if a.shape[-1] <= 4:  # locations: exact differences, so equal distances stay exactly equal
        sq = (a.unsqueeze(2) - b.unsqueeze(1)).square().sum(-1)  # (B, La, Lb)
    else:  # features: ‖a‖² - 2a·b + ‖b‖² through one matmul instead of a (B, La, Lb, C) tensor
        sq = a.square().sum(-1, keepdim=True) - 2 * torch.matmul(a, b.transpose(1, 2)) \
            + b.square().sum(-1).unsqueeze(1)
    dist, nn_idx = sq.min(dim=2)  # (B, La); the first minimum wins ties
    if k is None:
        return None, nn_idx
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    kept = torch.sort(order, dim=1).values
    return kept, nn_idx.gather(1, kept)


def _distance_dtype(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def match(a_dist: Tensor, b_dist: Tensor, a_feat: Tensor, b_feat: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Matched features (x, y), each (B, k, C): the kept positions of a_feat and their neighbours in
    b_feat, distances measured between a_dist (B, La, ·) and b_dist (B, Lb, ·)."""
    kept, nn_idx = nearest(a_dist, b_dist, k)
    c = a_feat.shape[-1]
    x = a_feat.gather(1, kept.unsqueeze(-1).expand(-1, -1, c))
    y = b_feat.gather(1, nn_idx.unsqueeze(-1).expand(-1, -1, c))
    return x, y


def check_num_matches(num_positions: Sequence[int], num_matches: Sequence[int]) -> None:
    """Raise a clear ValueError when location matching would keep more positions than a view has.

    num_positions: L_v of every view (views 0 and 1 are the large crops). In pair (i, j) the
    forward direction keeps num_matches[0] of view i's positions, the reverse num_matches[1] of j's.
    """
    if len(num_matches) != 2 or min(num_matches) < 1:
        raise ValueError(f"--num_matches needs two positive counts, got {list(num_matches)}")
    for i, j in _view_pairs(len(num_positions)):
        for view, k in ((i, num_matches[0]), (j, num_matches[1])):
            if k > num_positions[view]:
                raise ValueError(
                    f"--num_matches {list(num_matches)}: {k} matches requested from view {view}, "
                    f"which has only {num_positions[view]} feature-map positions "
                    f"(positions per view: {list(num_positions)})")


# ----------------------------------------------------------------------------- local loss

class _Slots:
    """Matched positions of all directions as indices into the views' concatenated positions.

    inv_x / inv_y: (B, k) index pairs whose MSE enters invariance, with per-slot weights;
    vc: (B, k) indices whose per-slot statistics enter variance/covariance, with weights;
    whole: per-position weights for slots that are a whole view in position order (the same for
    every sample, so shared by every pair that uses that view).
    Weights live on the host: building them never waits for the device.
    """

    def __init__(self, total_positions: int):
        self.inv_x: List[Tensor] = []
        self.inv_y: List[Tensor] = []
        self.inv_w: List[Tensor] = []
        self.vc: List[Tensor] = []
        self.vc_w: List[Tensor] = []
        self.whole = torch.zeros(total_positions, dtype=torch.float64)

    def add(self, x_idx: Tensor, y_idx: Tensor, weight: float, with_vc: bool, x_whole: Optional[slice]):
        k = x_idx.shape[1]
        self.inv_x.append(x_idx)
        self.inv_y.append(y_idx)
        self.inv_w.append(torch.full((k,), weight / k, dtype=torch.float64))
        if not with_vc:
            return
        w = torch.full((k,), weight / (2 * k), dtype=torch.float64)  # x and y halves
        if x_whole is not None:
            self.whole[x_whole] += w
        else:
            self.vc.append(x_idx)
            self.vc_w.append(w)
        self.vc.append(y_idx)
        self.vc_w.append(w)

    def vc_indices(self, batch: int, device) -> Tuple[Tensor, Tensor]:
        own = torch.nonzero(self.whole).flatten()  # host tensor: no device synchronisation
        idx = torch.cat([own.to(device).unsqueeze(0).expand(batch, -1)] + self.vc, dim=1)
        return idx, torch.cat([self.whole[own]] + self.vc_w)


class _MatchedSqErr(torch.autograd.Function):
    """Per-slot squared error between matched positions: feats (B, L, C), x_idx / y_idx (B, K)
    -> (K,) = Σ_{b,c} (feats[b, x_idx[b,k]] - feats[b, y_idx[b,k]])².

    Nothing of size (B, K, C) is kept: the differences are formed a few slots at a time (cache-sized
    on CPUs) and formed again in the backward, which adds ±2·diff straight into the gradient rows."""

    @staticmethod
    def forward(ctx, feats: Tensor, x_idx: Tensor, y_idx: Tensor) -> Tensor:
        b, l, c = feats.shape
        flat = feats.reshape(b * l, c)
        x_rows, y_rows = _flat_rows(x_idx, l), _flat_rows(y_idx, l)  # (K, B), slot-major
        out = feats.new_empty(x_idx.shape[1])
        for k in _slot_chunks(x_rows, c, feats.device):
            diff = flat.index_select(0, x_rows[k].reshape(-1)) - flat.index_select(0, y_rows[k].reshape(-1))
            out[k] = diff.view(-1, b * c).square().sum(dim=1)
        ctx.save_for_backward(feats, x_rows, y_rows)
        return out

    @staticmethod
    @_no_autocast
    def backward(ctx, g: Tensor):
        feats, x_rows, y_rows = ctx.saved_tensors
        b, l, c = feats.shape
        flat = feats.reshape(b * l, c)
        grad = torch.zeros_like(flat)
        for k in _slot_chunks(x_rows, c, feats.device):
            xr, yr = x_rows[k].reshape(-1), y_rows[k].reshape(-1)
            diff = flat.index_select(0, xr) - flat.index_select(0, yr)  # (k·B, C)
            diff.view(-1, b, c).mul_((2 * g[k]).view(-1, 1, 1))
            grad.index_add_(0, xr, diff)
            grad.index_add_(0, yr, diff.neg_())
        return grad.view(b, l, c), None, None


def _flat_rows(idx: Tensor, length: int) -> Tensor:
    """Positions idx (B, K) -> rows of the flattened (B·L, C) features, slot-major (K, B)."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * length).t().contiguous()


def _slot_chunks(rows: Tensor, channels: int, device) -> List[slice]:
    k, b = rows.shape
    step = k if device.type != "cpu" else max(1, (1 << 19) // max(1, b * channels))
    return [slice(i, min(k, i + step)) for i in range(0, k, step)]


def _take_slots(feats: Tensor, idx: Tensor) -> Tensor:
    """feats (B, L, C), idx (B, K) -> (K, B, C), slot-major and contiguous (one copy)."""
    b, l, c = feats.shape
    flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * l).t().reshape(-1)  # (K·B,)
    return feats.reshape(b * l, c).index_select(0, flat).view(-1, b, c)


@_full_precision
def local_loss(maps: Sequence[Tensor], locations: Sequence[Tensor], num_matches: Sequence[int] = (20, 4),
               l2_all_matches: bool = True, inv_coeff: float = 25.0, var_coeff: float = 25.0,
               cov_coeff: float = 1.0, fast_vc_reg: bool = False,
               shard: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg on matched feature-map positions, averaged over the same view pairs as the global loss.

    maps: V tensors (B, L_v, C), the expanded maps; locations: V grids (B, H_v, W_v, 2) of cell
    centres in image coordinates (L_v = H_v·W_v, same row-major order as the maps).
    For each ordered pair (i, j) two matchings, each in both directions, averaged over the two
    directions and summed over the two matchings: feature space (L2 between the maps; every
    position kept when ``l2_all_matches``, else num_matches) and image space (between the grids;
    num_matches[0] kept for i -> j, num_matches[1] for j -> i). Each direction's term on matched
    (x, y), (B, k, C): inv = MSE(x, y); var and cov = the mean over slots of x's and y's statistics,
    halved. ``fast_vc_reg``: pairs give only invariance; variance and covariance are taken once per
    view on all its positions (the corrected version of the reference's flag).
    Returns (inv, var, cov), already multiplied by their coefficients.
    """
    grids = [g.flatten(1, 2) for g in locations]  # (B, L_v, 2)
    for v, (m, g) in enumerate(zip(maps, grids)):
        if m.shape[1] != g.shape[1]:
            raise ValueError(f"view {v}: the feature map has {m.shape[1]} positions but its location "
                             f"grid has {g.shape[1]} ({tuple(locations[v].shape[1:3])}); the grid size "
                             f"must equal the backbone's map size for that crop size")
    sizes = [m.shape[1] for m in maps]
    check_num_matches(sizes, num_matches)
    offsets = [sum(sizes[:v]) for v in range(len(maps))]
    feats = torch.cat(list(maps), dim=1)  # (B, ΣL, C)
    pairs = _view_pairs(len(maps))
    slots = _Slots(feats.shape[1])
    # Each direction counts 1/2 (average of the two directions), then 1/P over pairs.
    weight = 1.0 / (2 * len(pairs))
    for i, j in pairs:
        for a, b, by_location in ((i, j, False), (j, i, False), (i, j, True), (j, i, True)):
            k = num_matches[0] if a == i else num_matches[1]
            every = not by_location and l2_all_matches
            kept, nn_idx = nearest(grids[a] if by_location else maps[a], grids[b] if by_location else maps[b],
                                   None if every else k)
            if every:
                kept = torch.arange(sizes[a], device=feats.device).expand_as(nn_idx)
            whole = slice(offsets[a], offsets[a] + sizes[a]) if every else None
            slots.add(kept + offsets[a], nn_idx + offsets[b], weight, not fast_vc_reg, whole)
    if fast_vc_reg:
        for v, size in enumerate(sizes):
            slots.whole[offsets[v]: offsets[v] + size] += 1.0 / (size * len(maps))

    x_idx, y_idx = torch.cat(slots.inv_x, 1), torch.cat(slots.inv_y, 1)
    sq_err = _MatchedSqErr.apply(feats, x_idx, y_idx)  # (K,)
    inv_w = torch.cat(slots.inv_w).to(feats.device, sq_err.dtype, non_blocking=True)
    inv = (sq_err * inv_w).sum() / (feats.shape[0] * feats.shape[2])

    vc_idx, vc_w = slots.vc_indices(feats.shape[0], feats.device)
    vc_w = vc_w.to(feats.device, feats.dtype, non_blocking=True)
    var, cov = _distributed_vc(_take_slots(feats, vc_idx), vc_w, shard)  # weighted sums over the slots
    return inv_coeff * inv, var_coeff * var, cov_coeff * cov
