"""k-NN evaluation (models/knn.py): the vectorised classifier against a direct loop, tie rules,
chunking, feature extraction over loaders, and the same result over two gloo processes as one."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from models.knn import (extract_features, knn_accuracy, knn_evaluate, knn_predict, nearest_neighbours,
                        topk_correct, unpadded_mask)


def naive_knn(train, train_labels, queries, num_classes, k, temperature):
    """One query at a time, straight from the definition: the k most similar training samples (ties:
    smaller index first) vote exp(sim / T) for their class. Returns (votes, class rankings)."""
    all_votes, rankings = [], []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, t)) for t in train.tolist()]
        nearest = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(train_labels[j])] += math.exp(sims[j] / temperature)
        all_votes.append([v / sum(votes) for v in votes])
        rankings.append(sorted(range(num_classes), key=lambda c: (-votes[c], c)))
    return torch.tensor(all_votes, dtype=torch.float64), rankings


def naive_accuracy(rankings, labels, t):
    return 100.0 * sum(int(y) in r[:t] for r, y in zip(rankings, labels.tolist())) / len(rankings)


def tied_features(seed=0, n_train=40, n_query=25, dim=3):
    """Small integer coordinates: dot products are exact, so equal similarities really tie; duplicated
    training rows with different labels make ties at the k-th place."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(-2, 3, (n_train, dim), generator=g).double()
    train[n_train // 2:] = train[: n_train - n_train // 2]  # every row twice
    labels = torch.randint(0, 6, (n_train,), generator=g)
    queries = torch.randint(-2, 3, (n_query, dim), generator=g).double()
    query_labels = torch.randint(0, 6, (n_query,), generator=g)
    return train, labels, queries, query_labels


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (5, 2.0), (7, 0.07), (20, 0.5), (40, 1.0), (60, 1.0)])
def test_matches_naive_loop_with_ties(k, temperature):
    train, labels, queries, query_labels = tied_features()
    sims = queries @ train.T
    kth = sims.sort(dim=1, descending=True).values[:, min(k, train.shape[0]) - 1:min(k, train.shape[0]) + 1]
    if k < train.shape[0]:
        assert (kth[:, 0] == kth[:, 1]).any(), "the data should tie at the k-th place for some query"
    votes = knn_predict(train, labels, queries, 6, k, temperature)
    expected, rankings = naive_knn(train, labels, queries, 6, k, temperature)
    torch.testing.assert_close(votes, expected, rtol=1e-9, atol=1e-12)
    acc = knn_accuracy(train, labels, queries, query_labels, k, temperature, num_classes=6)
    assert acc["top1"] == pytest.approx(naive_accuracy(rankings, query_labels, 1))
    assert acc["top5"] == pytest.approx(naive_accuracy(rankings, query_labels, 5))


def test_tie_rules_by_hand():
    # query (1, 0): sims 1 (class 0), 0.5 (class 1), 0.5 (class 2), 0.5 (class 3), -1 (class 4)
    train = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, -0.5], [0.5, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 3, 4])
    query = torch.tensor([[1.0, 0.0]])
    values, indices = nearest_neighbours(query @ train.T, 3)
    assert indices.tolist() == [[0, 1, 2]]  # of the three tied at 0.5, the two smaller indices
    votes = knn_predict(train, labels, query, 5, k=3, temperature=0.1)
    w = math.exp(-0.5 / 0.1)  # relative to the best neighbour's weight
    torch.testing.assert_close(votes, torch.tensor([[1, w, w, 0, 0]]) / (1 + 2 * w))
    # classes 1 and 2 tie: class 1 ranks first, so label 2 is a top-2 miss and label 1 a hit
    assert topk_correct(votes, torch.tensor([1]), (1, 2)).tolist() == [0, 1]
    assert topk_correct(votes, torch.tensor([2]), (1, 2, 3)).tolist() == [0, 0, 1]
    # a small temperature: exp(sim / 0.001) overflows in float32, the votes must not
    votes = knn_predict(train, labels, query, 5, k=3, temperature=1e-3)
    assert torch.isfinite(votes).all() and votes.argmax().item() == 0


def test_weighting_decides_against_the_majority():
    # two neighbours of class 1 at sim 0.6 against one of class 0 at sim 0.9
    train = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).argmax().item() == 0  # e^(0.3/0.07) > 2
    assert knn_predict(train, labels, query, 2, k=3, temperature=1.0).argmax().item() == 1  # e^0.3 < 2


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    train = nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    queries = nn.functional.normalize(torch.randn(53, 16, generator=g), dim=1)
    whole = knn_predict(train, labels, queries, 7, k=20, temperature=0.07)
    for chunk in (1, 7, 53, 1000):
        parts = knn_predict(train, labels, queries, 7, k=20, temperature=0.07, chunk_size=chunk)
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)
        assert torch.equal(parts.argmax(1), whole.argmax(1))
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(train, labels, queries, 7, k=0)


class Toy(nn.Module):
    """A 'backbone' returning (maps, pooled) with pooled a fixed linear map of the flattened image."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        pooled = self.bn(self.proj(x.flatten(1)))
        return pooled[:, None], pooled


def _toy_data(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_extract_features_normalises_in_eval_mode_and_keeps_order():
    x, y = _toy_data()
    net = Toy().train()
    net.bn.running_mean.fill_(0.3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    feats, labels = extract_features(net, loader, "cpu")
    assert net.training and net.bn.running_mean.eq(0.3).all()  # mode restored, statistics untouched
    with torch.no_grad():
        expected = nn.functional.normalize(net.eval()(x)[1], dim=1)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labels, y)
    # nested images (pretraining's validation samples): the first entry is taken
    nested = [((xb, (xb, xb)), yb) for xb, yb in zip(x.split(4), y.split(4))]
    nested_loader = type("L", (), {"__iter__": lambda self: iter(nested), "dataset": x, "sampler": None})()
    torch.testing.assert_close(extract_features(net, nested_loader, "cpu")[0], expected)


def test_shares_of_a_padded_sampler_cover_every_sample_once():
    x, _ = _toy_data(n=11)
    data = TensorDataset(x, torch.arange(11))  # the label names the sample
    net = Toy()
    seen = []
    for rank in range(3):  # 11 samples over 3 processes: 4 each, sample 0 repeated by process 2
        sampler = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        loader = DataLoader(data, batch_size=2, sampler=sampler)
        assert unpadded_mask(loader, 0, 4).tolist() == [True, True, True, rank < 2]
        assert unpadded_mask(loader, 2, 2).tolist() == [True, rank < 2]
        feats, labels = extract_features(net, loader, "cpu", gather=False)
        assert feats.shape[0] == labels.shape[0]
        seen += labels.tolist()
    assert sorted(seen) == list(range(11))
    shuffled = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, 3, 0, shuffle=True))
    with pytest.raises(ValueError, match="keeps the dataset order"):
        extract_features(net, shuffled, "cpu")


def _worker(rank, world, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = Toy()
        x, y = _toy_data(n=11)
        xv, yv = _toy_data(n=7, seed=1)
        loaders = [DataLoader(TensorDataset(a, b), batch_size=2,
                              sampler=DistributedSampler(TensorDataset(a, b), world, rank, shuffle=False))
                   for a, b in ((x, y), (xv, yv))]
        feats, labels = extract_features(net, loaders[0], "cpu")
        acc = knn_evaluate(net, loaders[0], loaders[1], "cpu", k=3, temperature=0.1, num_classes=3)
        torch.save(dict(feats=feats, labels=labels, acc=acc), os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = Toy()
    x, y = _toy_data(n=11)
    xv, yv = _toy_data(n=7, seed=1)
    feats, labels = extract_features(net, DataLoader(TensorDataset(x, y), batch_size=2), "cpu")
    vfeats, vlabels = extract_features(net, DataLoader(TensorDataset(xv, yv), batch_size=2), "cpu")
    expected = knn_accuracy(feats, labels, vfeats, vlabels, k=3, temperature=0.1, num_classes=3)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["feats"], feats)  # gathered in dataset order, padding dropped
        assert torch.equal(got["labels"], labels)
        assert got["acc"] == pytest.approx(expected)
