"""VICRegL losses written as the paper's equations, in plain autograd.

The readable twin of ``models/losses.py``: the same values and gradients, computed the textbook way
(a D x D covariance matrix per view and per matched slot, Python loops over view pairs). The tests
hold the fast losses to it, and the benchmarks time it as the plain formulation.

Notation: Z (N, D) a batch of N vectors of width D, gathered from every process; Z̄ its mean over
the batch; ε = 1e-4; λ, μ, ν the invariance, variance and covariance coefficients (25, 25, 1).

    invariance  s(Z, Z') = 1/(N·D) Σ_n ‖z_n − z'_n‖²                        (mean squared error)
    variance    v(Z)     = 1/D Σ_d max(0, 1 − sqrt(Var_n(z_n,d) + ε))      (unbiased variance)
    covariance  c(Z)     = 1/D Σ_{d≠e} C_de²,   C = (Z − Z̄)ᵀ(Z − Z̄) / (N − 1)

Views 0 and 1 are the two large crops; the view pairs are P = {(i, j) : i ∈ {0, 1}, j ≠ i}.

Global loss on the embeddings z_0 … z_{V−1}:

    inv = λ · mean_{(i,j)∈P} s(z_i, z_j),   var = μ · mean_v v(z_v),   cov = ν · mean_v c(z_v)

Local loss on the maps m_v (B, L_v, C) and their location grids g_v (cell centres in the image):
- a matching a → b with count k: for each position p of a, its nearest neighbour nn(p) in b and
  the distance d(p); keep the k positions with the smallest d(p), listed in increasing position
  order, and pair each with nn(p): x, y (B, k, C). The variance and covariance are taken per slot
  (per kept rank) across the batch, which is why the order of the kept positions matters;
- one direction's terms: (λ·s(x, y), μ·(v(x) + v(y))/2, ν·(c(x) + c(y))/2), v and c averaged
  over the k slots;
- for a pair (i, j): feature matching (distances between m_i and m_j) and location matching
  (distances between g_i and g_j, features still from the maps), each averaged over its two
  directions i → j (k = num_matches[0]) and j → i (k = num_matches[1]), then summed; with
  ``l2_all_matches`` feature matching keeps every position;
- inv, var, cov = the means over P of the pairs' terms.
With ``fast_vc_reg`` the pairs give only the invariance, and the variance and covariance are
taken once per view on all its positions: var = μ · mean_v mean_p v(m_v[:, p]), likewise cov.
"""
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import gather_batch

__all__ = ["invariance", "variance", "covariance", "view_pairs", "nearest", "match", "directions", "matched_terms",
           "global_loss",
           "local_loss"]

EPS = 1e-4


# ----------------------------------------------------------------------------- the three terms

def invariance(x: Tensor, y: Tensor) -> Tensor:
    """s(x, y): mean squared error over every entry. x, y: the same shape -> scalar."""
    return F.mse_loss(x, y)


def variance(x: Tensor) -> Tensor:
    """v(x) for every slot: x (N, *slots, D) -> (*slots); statistics over the batch dimension 0."""
    std = torch.sqrt(x.var(dim=0) + EPS)  # (*slots, D), unbiased
    return F.relu(1 - std).mean(dim=-1)


def covariance(x: Tensor) -> Tensor:
    """c(x) for every slot: x (N, *slots, D) -> (*slots); statistics over the batch dimension 0."""
    n, d = x.shape[0], x.shape[-1]
    x = x - x.mean(dim=0)
    cov = torch.einsum("n...d,n...e->...de", x, x) / (n - 1)  # (*slots, D, D)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    return off_diagonal.square().sum(dim=(-2, -1)) / d


def view_pairs(num_views: int) -> List[Tuple[int, int]]:
    """P: the ordered pairs (i, j), i one of the two large crops 0 and 1, j any other view."""
    return [(i, j) for i in (0, 1) for j in range(num_views) if j != i]


# ----------------------------------------------------------------------------- global loss

def global_loss(embeddings: Sequence[Tensor], inv_coeff: float = 25.0, var_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """embeddings: V tensors (B, D), this process's batch -> (inv, var, cov), coefficients applied."""
    pairs = view_pairs(len(embeddings))
    z = [gather_batch(e) for e in embeddings]  # (N, D) each
    inv = sum(invariance(embeddings[i], embeddings[j]) for i, j in pairs) / len(pairs)
    var = sum(variance(v) for v in z) / len(z)
    cov = sum(covariance(v) for v in z) / len(z)
    return inv_coeff * inv, var_coeff * var, cov_coeff * cov


# ----------------------------------------------------------------------------- matching

@torch.no_grad()
def nearest(a: Tensor, b: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """a (B, La, F), b (B, Lb, F) -> kept (B, k) positions of a, in increasing order, and nn (B, k)
    the nearest position of b to each. Equal distances go to the smaller position, at both steps."""
    if k > a.shape[1]:
        raise ValueError(f"cannot keep {k} matches of {a.shape[1]} positions (--num_matches)")
    dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # (B, La, Lb)
    d, nn = dist.min(dim=2)  # (B, La): distance to, and position of, the nearest neighbour
    closest = torch.argsort(d, dim=1, stable=True)[:, :k]  # (B, k), by distance
    kept = closest.sort(dim=1).values  # by position: the slots are positions, not ranks of distance
    return kept, nn.gather(1, kept)


def match(a_dist: Tensor, b_dist: Tensor, a_feat: Tensor, b_feat: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Distances between a_dist (B, La, ·) and b_dist (B, Lb, ·); features a_feat (B, La, C) and
    b_feat (B, Lb, C) -> x, y (B, k, C): the kept positions of a and their nearest neighbours in b."""
    kept, nn = nearest(a_dist, b_dist, k)
    batch = torch.arange(a_feat.shape[0], device=a_feat.device)[:, None]  # (B, 1)
    return a_feat[batch, kept], b_feat[batch, nn]


def directions(maps: Sequence[Tensor], grids: Sequence[Tensor], i: int, j: int, num_matches: Sequence[int],
               l2_all_matches: bool) -> Iterator[Tuple[Tensor, Tensor]]:
    """The four matchings of the pair (i, j): features i → j, j → i, then locations i → j, j → i.
    grids: flattened (B, L_v, 2). Yields x, y (B, k, C) for each."""
    k_ij, k_ji = (maps[i].shape[1], maps[j].shape[1]) if l2_all_matches else num_matches
    yield match(maps[i], maps[j], maps[i], maps[j], k_ij)
    yield match(maps[j], maps[i], maps[j], maps[i], k_ji)
    yield match(grids[i], grids[j], maps[i], maps[j], num_matches[0])
    yield match(grids[j], grids[i], maps[j], maps[i], num_matches[1])


def matched_terms(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """One direction's (s, v, c), no coefficients: x, y (B, k, C), statistics per slot k."""
    xg, yg = gather_batch(x), gather_batch(y)  # (N, k, C)
    var = (variance(xg).mean() + variance(yg).mean()) / 2
    cov = (covariance(xg).mean() + covariance(yg).mean()) / 2
    return invariance(x, y), var, cov


# ----------------------------------------------------------------------------- local loss

def local_loss(maps: Sequence[Tensor], locations: Sequence[Tensor], num_matches: Sequence[int] = (20, 4),
               l2_all_matches: bool = True, inv_coeff: float = 25.0, var_coeff: float = 25.0,
               cov_coeff: float = 1.0, fast_vc_reg: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """maps: V tensors (B, L_v, C); locations: V grids (B, H_v, W_v, 2), L_v = H_v·W_v in the maps'
    row-major order -> (inv, var, cov), coefficients applied."""
    grids = [g.flatten(1, 2) for g in locations]  # (B, L_v, 2)
    pairs = view_pairs(len(maps))
    inv = var = cov = 0.0
    for i, j in pairs:
        for x, y in directions(maps, grids, i, j, num_matches, l2_all_matches):
            if fast_vc_reg:
                s, v, c = invariance(x, y), 0.0, 0.0
            else:
                s, v, c = matched_terms(x, y)
            # each direction is half of its matching's average; the two matchings add up
            inv, var, cov = inv + s / 2, var + v / 2, cov + c / 2
    inv, var, cov = inv / len(pairs), var / len(pairs), cov / len(pairs)
    if fast_vc_reg:  # per view, every position a slot: (N, L_v, C) -> mean over the L_v slots
        gathered = [gather_batch(m) for m in maps]
        var = sum(variance(m).mean() for m in gathered) / len(maps)
        cov = sum(covariance(m).mean() for m in gathered) / len(maps)
    return inv_coeff * inv, var_coeff * var, cov_coeff * cov
