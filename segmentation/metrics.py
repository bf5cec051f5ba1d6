"""Confusion matrix, IoU and mIoU.

Everything is computed from one (K, K) confusion matrix accumulated over the whole evaluation set
(rows: ground truth, columns: prediction), summed over processes with ``all_reduce``. Pixels whose
label is the ignore index (255) are left out.

Which classes count in the mean: a class whose union (ground truth or prediction) is empty over
the *whole set* has an undefined IoU (0/0, NaN) and is left out of the mean, as mmsegmentation does
(``nanmean``). A class that is predicted but never in the ground truth has IoU 0 and counts. Because
the matrix is summed over the set before the division, a class absent from one image is not an
IoU of 0 for that image: images are never averaged one by one.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["confusion_matrix", "iou_from_confusion", "segmentation_scores", "all_reduce_sum"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, ``[t, p]`` = pixels of true class t predicted as p.

    pred and target are integer tensors of the same shape (any: (H, W), (B, H, W)); target pixels
    equal to ``ignore_index`` are skipped. A target value outside [0, K) other than the ignore index
    is an error (a wrong --dataset or a label file in the wrong format), never silently counted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"label values {sorted(set(t.unique().tolist()) - set(range(num_classes)))} are "
                         f"outside [0, {num_classes}) and not the ignore index {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(conf: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN where the union is empty."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return tp / union  # 0/0 = NaN: the class is absent from both ground truth and prediction


def _nanmean(x: Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else float("nan")


def segmentation_scores(conf: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU (all in %) from a confusion matrix.

    ``mIoU`` averages the classes with a non-empty union; ``mAcc`` the classes present in the ground
    truth. Per-class values that are undefined are None (JSON null), keyed by class name.
    """
    conf = conf.double().cpu()
    iou = iou_from_confusion(conf)
    acc = conf.diag() / conf.sum(1)  # NaN for classes without ground-truth pixels
    total = float(conf.sum())
    names: List[str] = list(class_names) if class_names is not None else [str(k) for k in range(len(iou))]
    return {
        "mIoU": round(100 * _nanmean(iou), 4),
        "aAcc": round(100 * float(conf.diag().sum()) / total, 4) if total else float("nan"),
        "mAcc": round(100 * _nanmean(acc), 4),
        "IoU": {n: (None if torch.isnan(v) else round(100 * float(v), 2)) for n, v in zip(names, iou)},
    }


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over processes in place (confusion matrices); the identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
