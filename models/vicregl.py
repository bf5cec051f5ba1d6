"""Expanders and the VICRegL pretraining model (backbone, global and local expanders, online probe)."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import gather_nograd
from . import build_backbone, backbone_family
from .losses import global_loss, local_loss

__all__ = ["parse_mlp", "build_expander", "VICRegLConfig", "VICRegL", "representation_metrics"]


def parse_mlp(spec: str, flag: str = "--mlp") -> List[int]:
    """'8192-8192-8192' -> [8192, 8192, 8192], with a clear error naming the flag."""
    try:
        dims = [int(d) for d in str(spec).split("-")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"{flag} expects positive widths joined by '-', such as 8192-8192-8192; got {spec!r}")
    return dims


def build_expander(d_in: int, spec: str, norm: str = "batch", flag: str = "--mlp") -> nn.Sequential:
    """Linear -> Norm -> ReLU blocks, then a last Linear without bias (indices as in the checkpoints).

    norm: 'batch' (BatchNorm1d, ResNet backbones) or 'layer' (LayerNorm, ConvNeXt backbones).
    Input (N, d_in) -> output (N, last width).
    """
    dims = [d_in] + parse_mlp(spec, flag)
    layers: List[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b) if norm == "batch" else nn.LayerNorm(b), nn.ReLU(True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


@dataclass
class VICRegLConfig:
    """Everything the pretraining model needs; the scripts fill it from their flags."""
    arch: str = "convnext_small"
    mlp: str = "8192-8192-8192"
    maps_mlp: str = "512-512-512"
    alpha: float = 0.75
    num_classes: int = 1000  # 0: no labels, no online classifier
    num_matches: Sequence[int] = (20, 4)
    l2_all_matches: bool = True
    inv_coeff: float = 25.0
    var_coeff: float = 25.0
    cov_coeff: float = 1.0
    fast_vc_reg: bool = False
    backbone_kwargs: Dict = field(default_factory=dict)


class VICRegL(nn.Module):
    """The pretraining model. Submodules, in checkpoint order: backbone, maps_projector (alpha < 1),
    projector (alpha > 0), classifier (when there are labels)."""

    def __init__(self, cfg: VICRegLConfig):
        super().__init__()
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ValueError(f"--alpha must lie in [0, 1], got {cfg.alpha}")
        self.cfg = cfg
        self.backbone, self.num_features = build_backbone(cfg.arch, **cfg.backbone_kwargs)
        norm = "batch" if backbone_family(cfg.arch) == "resnet" else "layer"
        if cfg.alpha < 1:
            self.maps_projector = build_expander(self.num_features, cfg.maps_mlp, norm, "--maps-mlp")
        if cfg.alpha > 0:
            self.projector = build_expander(self.num_features, cfg.mlp, norm, "--mlp")
        if cfg.num_classes > 0:
            self.classifier = nn.Linear(self.num_features, cfg.num_classes)

    def _local_embeddings(self, maps: Tensor) -> Tensor:
        b, l, c = maps.shape
        return self.maps_projector(maps.reshape(b * l, c)).reshape(b, l, -1)  # (B, L, C_local)

    def forward(self, views: Sequence[Tensor], locations: Sequence[Tensor],
                labels: Optional[Tensor] = None, metrics: bool = False) -> Tuple[Tensor, Dict[str, Tensor]]:
        """views: V tensors (B, 3, s_v, s_v); locations: V grids (B, N_v, N_v, 2); labels (B,).

        Returns (loss, logs): loss = alpha·global + (1 - alpha)·local + CE of the online probe;
        logs holds detached scalar tensors (read them only when logging: no host sync here).
        ``metrics`` adds the representation statistics stdr/stde/corr/core.
        """
        cfg = self.cfg
        maps, pooled = self.encode(views)
        logs: Dict[str, Tensor] = {}
        loss = pooled[0].new_zeros((), dtype=torch.float32)
        embeddings = None
        if cfg.alpha > 0:
            embeddings = [self.projector(p) for p in pooled]
            inv, var, cov = global_loss(embeddings, cfg.inv_coeff, cfg.var_coeff, cfg.cov_coeff)
            loss = loss + cfg.alpha * (inv + var + cov)
            logs.update(inv_l=inv.detach(), var_l=var.detach(), cov_l=cov.detach())
        if cfg.alpha < 1:
            local_maps = [self._local_embeddings(m) for m in maps]
            inv, var, cov = local_loss(local_maps, locations, cfg.num_matches, cfg.l2_all_matches,
                                       cfg.inv_coeff, cfg.var_coeff, cfg.cov_coeff, cfg.fast_vc_reg)
            loss = loss + (1 - cfg.alpha) * (inv + var + cov)
            logs.update(minv_l=inv.detach(), mvar_l=var.detach(), mcov_l=cov.detach())
        if cfg.num_classes > 0 and labels is not None:
            cls_loss, top1, top5 = self.classify(pooled[0].detach(), labels)
            loss = loss + cls_loss
            logs.update(cls_l=cls_loss.detach(), top1=top1, top5=top5)
        if metrics:
            logs.update(representation_metrics(pooled[0], "r"))
            if embeddings is not None:
                logs.update(representation_metrics(embeddings[0], "e"))
        logs["l"] = loss.detach()
        return loss, logs

    def encode(self, views: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Backbone outputs of every view: (maps (B, L_v, C), pooled (B, C)) per view.

        A backbone with BatchNorm sees one view at a time, as the reference did: its batch
        statistics are per view. Without BatchNorm (ConvNeXt) views of the same size go through
        together — the same numbers, in fewer and larger kernels.
        """
        if self.has_batchnorm:
            outs = [self.backbone(v) for v in views]
            return [m for m, _ in outs], [p for _, p in outs]
        maps: List[Optional[Tensor]] = [None] * len(views)
        pooled: List[Optional[Tensor]] = [None] * len(views)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for v, x in enumerate(views):
            groups.setdefault(tuple(x.shape[1:]), []).append(v)
        for idx in groups.values():
            m, p = self.backbone(torch.cat([views[v] for v in idx]) if len(idx) > 1 else views[idx[0]])
            for v, mv, pv in zip(idx, m.chunk(len(idx)), p.chunk(len(idx))):
                maps[v], pooled[v] = mv, pv
        return maps, pooled

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules())

    def classify(self, features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Online probe: (cross-entropy, top-1 %, top-5 %) of the classifier on ``features``."""
        logits = self.classifier(features)
        loss = F.cross_entropy(logits.float(), labels)
        top1, top5 = accuracy(logits.detach(), labels, (1, 5))
        return loss, top1, top5

    @torch.no_grad()
    def evaluate(self, val_view: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        """Validation of the online probe on the centre-cropped view: clsl_val, top1_val, top5_val."""
        _, pooled = self.backbone(val_view)
        loss, top1, top5 = self.classify(pooled, labels)
        return {"clsl_val": loss, "top1_val": top1, "top5_val": top5}


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor, topk=(1,)) -> List[Tensor]:
    """Top-k accuracies in percent, as 0-dim tensors (k capped at the number of classes)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    correct = pred.eq(labels.unsqueeze(1))
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean() * 100 for k in topk]


@torch.no_grad()
def representation_metrics(x: Tensor, suffix: str) -> Dict[str, Tensor]:
    """std<suffix>: mean per-dimension std of the L2-normalised rows; cor<suffix>: mean signed
    off-diagonal entry of the correlation matrix. Computed on the batch gathered over processes.

    The correlation sum is O(N·D): sum of all entries of zᵀz is ‖z·1‖², its trace is ‖z‖²_F.
    """
    x = gather_nograd(x if x.dtype == torch.float64 else x.float())  # (N, D)
    n, d = x.shape
    std = F.normalize(x, dim=1).std(dim=0).mean()
    z = (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-5)
    off = (z.sum(dim=1).pow(2).sum() - z.pow(2).sum()) / (n - 1)
    corr = off / (d * (d - 1))
    return {f"std{suffix}": std, f"cor{suffix}": corr}
