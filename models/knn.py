"""Weighted k-nearest-neighbour classification on frozen features (an addition of this project:
the reference implementation had none).

The protocol of Wu et al. (2018), as DINO and others report it: features are L2-normalised, the
similarity of a query to a training sample is their dot product (cosine similarity), the k most
similar training samples vote for their own class with weight exp(similarity / T), and the class
with the largest summed vote is the prediction. Defaults k = 20, T = 0.07.

Functions take tensors (``knn_predict``, ``knn_accuracy``), so that pretraining can call them on
features it already has; ``extract_features`` turns a backbone and a loader into such tensors and
``knn_evaluate`` does both, across processes. Nothing here imports the data modules: a loader is
any iterable of ``(images, labels)`` batches (see ``extract_features`` for nested image entries).

Ties are broken by index, so results do not depend on the top-k implementation or on chunking:
among training samples equally similar at the k-th place the smaller index is kept, and among
classes with equal votes the smaller class index ranks first.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from utils import gather_nograd, get_world_size, is_dist

__all__ = ["nearest_neighbours", "knn_predict", "topk_correct", "knn_accuracy", "extract_features",
           "knn_evaluate", "unpadded_mask"]

# At most this many query-train similarities are held at once (64 MiB in float32); the queries are
# processed in chunks of max(1, MAX_SIMILARITIES // num_train) rows.
MAX_SIMILARITIES = 2 ** 24


# ----------------------------------------------------------------------------- on tensors

def nearest_neighbours(similarity: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``similarity`` (Q, N) -> (values (Q, k), indices (Q, k)).

    When several entries tie for the k-th place, the smaller indices are kept (rows with such a tie
    are re-sorted with a stable sort; the others use topk). ``k >= N`` keeps every entry.
    """
    q, n = similarity.shape
    if k >= n:
        return similarity, torch.arange(n, device=similarity.device).expand(q, n)
    values, indices = similarity.topk(k + 1, dim=1)  # (Q, k + 1), descending
    tied = values[:, k - 1] == values[:, k]  # the k-th and (k+1)-th are equal: topk chose arbitrarily
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        v, i = similarity[rows].sort(dim=1, descending=True, stable=True)  # equal values: index order
        values[rows], indices[rows] = v[:, :k + 1], i[:, :k + 1]
    return values[:, :k], indices[:, :k]


def knn_predict(train_features: Tensor, train_labels: Tensor, queries: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk_size: Optional[int] = None) -> Tensor:
    """Class votes of the k nearest training samples for every query.

    train_features (N, C) and queries (Q, C) are L2-normalised rows; train_labels (N,) int64 in
    [0, num_classes). Returns (Q, num_classes): for each query, the sum over its k most similar
    training samples of exp(sim / T), per class, divided by the row's total (so rows sum to 1;
    the ranking of classes is that of the raw sums). The queries are processed ``chunk_size`` rows
    at a time (default: so that at most MAX_SIMILARITIES similarities are held at once).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    n = train_features.shape[0]
    chunk_size = chunk_size or max(1, MAX_SIMILARITIES // max(n, 1))
    train_labels = train_labels.to(train_features.device)
    out = []
    for chunk in queries.split(chunk_size):
        sim = chunk.to(train_features) @ train_features.T  # (q, N)
        values, indices = nearest_neighbours(sim, k)  # (q, k)
        # exp((s - s_max) / T) instead of exp(s / T): the same ratios, no overflow for a small T.
        weights = ((values - values.max(dim=1, keepdim=True).values) / temperature).exp()  # (q, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[indices], weights)  # (q, num_classes)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes, device=train_features.device, dtype=train_features.dtype)
    return torch.cat(out)


def topk_correct(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> Tensor:
    """How many rows of ``scores`` (Q, K) have their label among their k best classes, for each k
    in ``topk`` -> (len(topk),) int64. Equal scores rank the smaller class first; k is capped at K."""
    order = scores.sort(dim=1, descending=True, stable=True).indices  # (Q, K)
    hit = order == labels.to(order.device)[:, None]  # (Q, K), at most one True per row
    return torch.stack([hit[:, :min(k, scores.shape[1])].sum() for k in topk])


def knn_accuracy(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: Optional[int] = None,
                 topk: Sequence[int] = (1, 5), chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Top-k accuracies (%) of the weighted k-NN classifier: {"top1": .., "top5": ..} for topk (1, 5).

    Features are L2-normalised rows (see ``extract_features``); ``num_classes`` defaults to the
    largest label + 1.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    votes = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, chunk_size)
    correct = topk_correct(votes, val_labels, topk)
    total = max(val_labels.shape[0], 1)
    return {f"top{t}": 100.0 * float(c) / total for t, c in zip(topk, correct)}


# ----------------------------------------------------------------------------- on loaders

def _ordered_sampler(loader) -> Optional[DistributedSampler]:
    """The loader's DistributedSampler, after checking that it keeps the dataset order and every
    sample (what a validation loader does); None for a single-process loader of another kind."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        if sampler.shuffle or sampler.drop_last or getattr(loader, "drop_last", False):
            raise ValueError("k-NN feature extraction needs a loader that keeps the dataset order and "
                             "every sample (no shuffling, no drop_last): build it as a validation loader")
        return sampler
    if get_world_size() > 1:
        raise ValueError("k-NN feature extraction across processes needs a DistributedSampler")
    return None


def unpadded_mask(loader, start: int, count: int) -> Tensor:
    """(count,) bool: which of this process's samples ``start .. start + count - 1`` are real.

    A DistributedSampler without shuffling gives process r the samples r, r + W, r + 2W, ... of the
    dataset, repeating the first ones to give every process as many; those repeats are False here,
    so that summed counts over processes count every sample exactly once.
    """
    sampler = _ordered_sampler(loader)
    positions = torch.arange(start, start + count)
    if sampler is None:
        return positions < len(loader.dataset)
    return sampler.rank + positions * sampler.num_replicas < len(sampler.dataset)


def _in_dataset_order(x: Tensor, total: int) -> Tensor:
    """Rows from every process's share (process r holds rows r, r + W, ... of the padded dataset)
    -> (total, ...) in dataset order, the sampler's padding dropped."""
    world = get_world_size()
    if world == 1:
        return x[:total]
    rows = gather_nograd(x)  # (W * n, ...): process 0's rows, then process 1's ...
    n = x.shape[0]
    return rows.view(world, n, *x.shape[1:]).transpose(0, 1).reshape(world * n, *x.shape[1:])[:total]


def _images(batch) -> Tensor:
    images = batch[0]
    while isinstance(images, (list, tuple)):  # e.g. ((val_view, (views, locations)), label)
        images = images[0]
    return images


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device, gather: bool = True,
                     normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """L2-normalised pooled features and labels of every sample of ``loader``'s dataset (with
    ``normalize=False`` the pooled features as the backbone returns them, in float32).

    ``backbone(images)`` returns ``(maps, pooled)`` (or a (B, C) tensor), run in eval mode without
    gradients (its mode is restored afterwards). A batch is ``(images, labels)``; when ``images`` is
    a list or tuple its first entry is taken, recursively (so pretraining's validation samples
    ``((val_view, (views, locations)), label)`` give ``val_view``).
    With ``gather`` (the default) every process returns the whole dataset's features (N, C) float32
    and labels (N,) in dataset order; without, only this process's share, the sampler's padding
    left out. The loader must keep the order and every sample (a validation loader).
    """
    _ordered_sampler(loader)
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in loader:
            out = backbone(_images(batch).to(device, non_blocking=True))
            pooled = out[1] if isinstance(out, (tuple, list)) else out  # (B, C)
            features.append(F.normalize(pooled.float(), dim=1) if normalize else pooled.float())
            labels.append(batch[1].to(device, non_blocking=True))
    finally:
        backbone.train(was_training)
    features, labels = torch.cat(features), torch.cat(labels)
    if gather:
        total = len(loader.dataset)
        return _in_dataset_order(features, total), _in_dataset_order(labels, total)
    keep = unpadded_mask(loader, 0, labels.shape[0]).to(labels.device)
    return features[keep], labels[keep]


@torch.no_grad()
def knn_evaluate(backbone: nn.Module, train_loader, val_loader, device, k: int = 20,
                 temperature: float = 0.07, num_classes: Optional[int] = None, topk: Sequence[int] = (1, 5),
                 chunk_size: Optional[int] = None) -> Dict[str, float]:
    """k-NN top-k accuracies (%) of ``backbone``'s frozen features: the training set is the bank,
    the validation set the queries. Both loaders must keep order and every sample.

    Across processes every process holds the gathered bank and classifies its own share of the
    queries; the counts are summed. Returns {"top1": .., "top5": ..}.
    """
    train_features, train_labels = extract_features(backbone, train_loader, device, gather=True)
    val_features, val_labels = extract_features(backbone, val_loader, device, gather=False)
    if num_classes is None:
        num_classes = getattr(train_loader.dataset, "num_classes", None) or int(train_labels.max()) + 1
    votes = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, chunk_size)
    counts = torch.cat([topk_correct(votes, val_labels, topk),
                        torch.tensor([val_labels.shape[0]], device=votes.device)]).to(torch.float64)
    if is_dist():
        dist.all_reduce(counts)
    total = max(float(counts[-1]), 1.0)
    return {f"top{t}": 100.0 * float(c) / total for t, c in zip(topk, counts[:-1])}
