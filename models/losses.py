"""VICRegL losses: the global VICReg loss and the local loss on matched feature-map positions.

Built from three small pieces that both losses share:
- ``invariance``: mean squared error between matched embeddings (this process's batch);
- ``variance_covariance``: the variance hinge and the off-diagonal covariance penalty of embeddings
  gathered over all processes and centred over the batch, computed for many "slots" at once;
- ``match``: nearest-neighbour matching of feature-map positions, in feature space or image space.

All losses run in float32 or float64 even under autocast (the reference let the covariance matmuls
run in float16). Inputs are per-process tensors; gathering over processes happens inside.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import gather_batch

__all__ = ["global_loss", "local_loss", "match", "variance_covariance", "off_diagonal_sq_sum",
           "check_num_matches"]

VAR_EPS = 1e-4


def _full_precision(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def off_diagonal_sq_sum(x: Tensor, col_sq: Tensor) -> Tensor:
    """Sum of squared off-diagonal entries of xᵀx for a batch of centred matrices.

    x: (S, N, D); col_sq: (S, D) = the diagonal of xᵀx (sum over N of x²). Returns (S,).
    Exact identity: ‖xᵀx‖²_F = ‖xxᵀ‖²_F, so when N < D the N×N Gram matrix is the cheaper route
    (N²·D instead of N·D² multiply-adds); the diagonal's squares are subtracted either way.
    """
    n, d = x.shape[-2], x.shape[-1]
    if n < d:
        full = torch.matmul(x, x.transpose(-1, -2)).pow(2).sum(dim=(-2, -1))  # via (S, N, N)
    else:
        full = torch.matmul(x.transpose(-1, -2), x).pow(2).sum(dim=(-2, -1))  # via (S, D, D)
    return full - col_sq.pow(2).sum(dim=-1)


def variance_covariance(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Variance hinge and covariance penalty per slot.

    x: (S, N, D): S independent slots (views, or matched positions), N samples gathered over all
    processes, D channels; centred here over N.
    Returns (var, cov), each (S,): var = mean_d relu(1 - sqrt(Var_n x + 1e-4)) with the unbiased
    variance, cov = (sum of squared off-diagonal entries of xᵀx / (N - 1)) / D.
    """
    n, d = x.shape[-2], x.shape[-1]
    x = x - x.mean(dim=-2, keepdim=True)
    col_sq = x.pow(2).sum(dim=-2)  # (S, D): (N - 1) * variance, also the diagonal of xᵀx
    std = torch.sqrt(col_sq / (n - 1) + VAR_EPS)
    var = F.relu(1 - std).mean(dim=-1)
    cov = off_diagonal_sq_sum(x, col_sq) / ((n - 1) ** 2 * d)
    return var, cov


def _gathered_slots(x: Tensor) -> Tensor:
    """(B, K, C) per process -> (K, N, C): gathered over processes, slots first."""
    return gather_batch(x).transpose(0, 1)


def global_loss(embeddings: Sequence[Tensor], inv_coeff: float = 25.0, var_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg loss on the expanded pooled embeddings of all views.

    embeddings: V tensors (B, D); views 0 and 1 are the large crops. Invariance is averaged over the
    2(V - 1) ordered pairs (i, j), i in {0, 1}, j != i; variance and covariance over the V views.
    Returns (inv, var, cov), already multiplied by their coefficients.
    """
    z = [_full_precision(e) for e in embeddings]
    pairs = _view_pairs(len(z))
    inv = sum(F.mse_loss(z[i], z[j]) for i, j in pairs) / len(pairs)
    var = cov = 0.0
    for e in z:  # one view at a time: a (V, N, D) stack would double the memory at large N·D
        v, c = variance_covariance(gather_batch(e).unsqueeze(0))
        var, cov = var + v[0], cov + c[0]
    return inv_coeff * inv, var_coeff * var / len(z), cov_coeff * cov / len(z)


def _view_pairs(num_views: int) -> List[Tuple[int, int]]:
    if num_views < 2:
        raise ValueError(f"VICRegL needs at least 2 views (the two large crops), got {num_views}")
    return [(i, j) for i in range(2) for j in range(num_views) if j != i]


# ----------------------------------------------------------------------------- matching

@torch.no_grad()
def _nearest(a: Tensor, b: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Indices of the k positions of ``a`` closest to ``b`` and of their nearest neighbours.

    a: (B, La, F), b: (B, Lb, F) -> kept (B, k) in increasing position order, nn (B, k).
    Ties go to the smaller index, both for the nearest neighbour and for the kept positions.
    """
    dist = torch.cdist(a.float() if a.dtype != torch.float64 else a,
                       b.float() if b.dtype != torch.float64 else b)  # (B, La, Lb)
    d, nn_idx = dist.min(dim=2)  # first minimum wins ties
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]  # k smallest distances, stable
    kept = torch.sort(order, dim=1).values  # slots in increasing position order (see SPEC §3)
    return kept, nn_idx.gather(1, kept)


def match(a_dist: Tensor, b_dist: Tensor, a_feat: Tensor, b_feat: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Keep the k positions of a nearest to their nearest neighbour in b.

    a_dist (B, La, ·), b_dist (B, Lb, ·): what distances are measured on (features or locations).
    a_feat (B, La, C), b_feat (B, Lb, C): what is returned for the kept positions and their
    neighbours -> (x, y), each (B, k, C).
    """
    kept, nn_idx = _nearest(a_dist, b_dist, k)
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

def _slot_terms(x: Tensor, y: Tensor, with_vc: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Uncoefficiented per-slot VICReg terms on matched pairs x, y (B, k, C).

    inv = MSE(x, y); var = (mean var hinge of x + of y) / 2; cov = (mean over slots of x's
    covariance penalty + y's) / 2, each slot's statistics taken across the gathered batch.
    """
    inv = F.mse_loss(x, y)
    if not with_vc:
        return inv, inv.new_zeros(()), inv.new_zeros(())
    var_x, cov_x = variance_covariance(_gathered_slots(x))
    var_y, cov_y = variance_covariance(_gathered_slots(y))
    return inv, (var_x.mean() + var_y.mean()) / 2, (cov_x.mean() + cov_y.mean()) / 2


def local_loss(maps: Sequence[Tensor], locations: Sequence[Tensor], num_matches: Sequence[int] = (20, 4),
               l2_all_matches: bool = True, inv_coeff: float = 25.0, var_coeff: float = 25.0,
               cov_coeff: float = 1.0, fast_vc_reg: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg on matched feature-map positions, averaged over the same view pairs as the global loss.

    maps: V tensors (B, L_v, C), the expanded maps; locations: V grids (B, H_v, W_v, 2) of
    cell centres in image coordinates (L_v = H_v·W_v, same row-major order as the maps).
    For each ordered pair (i, j) two matchings, each in both directions and averaged over them:
    feature space (L2 between the maps; every position kept when ``l2_all_matches``) and image space
    (between the grids; num_matches[0] kept for i -> j, num_matches[1] for j -> i).
    ``fast_vc_reg``: pairs give only invariance; variance and covariance are taken once per view on
    all its positions (the corrected version of the reference's flag).
    Returns (inv, var, cov), already multiplied by their coefficients.
    """
    maps = [_full_precision(m) for m in maps]
    grids = [g.flatten(1, 2) for g in locations]  # (B, L_v, 2)
    for v, (m, g) in enumerate(zip(maps, grids)):
        if m.shape[1] != g.shape[1]:
            raise ValueError(f"view {v}: the feature map has {m.shape[1]} positions but its location "
                             f"grid has {g.shape[1]} ({tuple(locations[v].shape[1:3])}); the grid size "
                             f"must equal the backbone's map size for that crop size")
    positions = [m.shape[1] for m in maps]
    check_num_matches(positions, num_matches)
    pairs = _view_pairs(len(maps))
    with_vc = not fast_vc_reg
    inv = var = cov = 0.0
    for i, j in pairs:
        k_ij, k_ji = (positions[i], positions[j]) if l2_all_matches else tuple(num_matches)
        directions = [  # (a_dist, b_dist, a_feat, b_feat, k): feature matching, then location
            (maps[i], maps[j], maps[i], maps[j], k_ij), (maps[j], maps[i], maps[j], maps[i], k_ji),
            (grids[i], grids[j], maps[i], maps[j], num_matches[0]),
            (grids[j], grids[i], maps[j], maps[i], num_matches[1]),
        ]
        for a_d, b_d, a_f, b_f, k in directions:
            t_inv, t_var, t_cov = _slot_terms(*match(a_d, b_d, a_f, b_f, k), with_vc)
            # each matching averages its two directions; the pair sums the two matchings
            inv, var, cov = inv + t_inv / 2, var + t_var / 2, cov + t_cov / 2
    inv, var, cov = inv / len(pairs), var / len(pairs), cov / len(pairs)
    if fast_vc_reg:
        var, cov = 0.0, 0.0
        for m in maps:
            v, c = variance_covariance(_gathered_slots(m))
            var, cov = var + v.mean(), cov + c.mean()
        var, cov = var / len(maps), cov / len(maps)
    return inv_coeff * inv, var_coeff * var, cov_coeff * cov
