"""The frozen feature extractor, the linear head and inference (whole image or sliding window).

Shapes: images (B, 3, H, W) -> features (B, C, h, w) -> logits (B, K, h, w), upsampled bilinearly
(align_corners=False) to the label size. ConvNeXt: its four stages (before the final norm) resized
to the stride-4 map and concatenated (C = 96+192+384+768 = 1440 for small); dilated ResNet-50:
the last stage at stride 8 (C = 2048).
"""
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["stage_channels", "FrozenBackbone", "LinearHead", "Segmenter", "slide_inference",
           "window_boxes", "predict"]


def stage_channels(backbone: nn.Module) -> List[int]:
    """Channels of the four outputs of ``backbone.forward_stages`` (read from the modules)."""
    if hasattr(backbone, "dims"):  # ConvNeXt
        return list(backbone.dims)
    layers = [getattr(backbone, f"layer{k}") for k in range(1, 5)]
    return [layer[-1].last_bn().num_features for layer in layers]


class FrozenBackbone(nn.Module):
    """A backbone that never trains: no gradients, always in eval mode (BatchNorm running
    statistics, no stochastic depth), even when the enclosing module is put in training mode.

    ``stages``: 0-based indices of the ``forward_stages`` outputs to use; they are resized
    bilinearly to the largest selected map and concatenated along channels.
    ``autocast``: a context factory (e.g. float16 autocast) for the backbone's forward; the
    features are returned as float32 for the head.
    """

    def __init__(self, backbone: nn.Module, stages: Sequence[int], autocast: Optional[Callable] = None):
        super().__init__()
        if not stages or any(not 0 <= s < 4 for s in stages):
            raise ValueError(f"stages must be indices in 0..3, got {list(stages)}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.stages = list(stages)
        self.out_channels = sum(stage_channels(backbone)[s] for s in self.stages)
        self.autocast = autocast or nullcontext

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        with self.autocast():
            outs = self.backbone.forward_stages(x)
        maps = [outs[s].float() for s in self.stages]  # each (B, C_s, H_s, W_s)
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return torch.cat(maps, dim=1)  # (B, sum C_s, H_0, W_0)


class LinearHead(nn.Module):
    """BatchNorm -> (Dropout2d) -> 1x1 convolution: a linear classifier of every position.

    The BatchNorm standardises the frozen features, whose scales differ widely between stages; at
    test time it is a fixed affine map, so the whole head stays linear in the features.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.bn(features)))  # (B, K, h, w)


class Segmenter(nn.Module):
    """Frozen backbone + linear head. ``forward(x)`` gives logits at the feature resolution;
    ``logits(x, size)`` upsamples them bilinearly to ``size`` (the label's)."""

    def __init__(self, features: FrozenBackbone, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def logits(self, x: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
        out = self(x)
        size = tuple(size or x.shape[-2:])
        return out if out.shape[-2:] == size else F.interpolate(out, size=size, mode="bilinear",
                                                                align_corners=False)


Box = Tuple[int, int, int, int]  # (top, left, bottom, right)


def window_boxes(height: int, width: int, window: Sequence[int], stride: Sequence[int]) -> List[Box]:
    """(top, left, bottom, right) of the sliding windows covering an image (every pixel at least once).

    Windows start every ``stride`` pixels; the last row/column of windows is shifted back so that it
    ends at the border instead of running past it. An image smaller than the window in a direction
    gives one window of the image's extent in that direction.
    """
    (wh, ww), (sh, sw) = window, stride
    if min(wh, ww, sh, sw) < 1 or sh > wh or sw > ww:
        raise ValueError(f"window {tuple(window)} and stride {tuple(stride)} must be positive, the stride "
                         f"no larger than the window (pixels between windows would get no prediction)")
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * sh + wh, height), min(c * sw + ww, width)
            boxes.append((max(bottom - wh, 0), max(right - ww, 0), bottom, right))
    return boxes


def slide_inference(fn: Callable[[Tensor], Tensor], x: Tensor, window: Sequence[int], stride: Sequence[int],
                    max_batch: int = 8) -> Tensor:
    """Logits of ``x`` (B, 3, H, W) -> (B, K, H, W) as the average, at every pixel, of the logits of
    the windows covering it. ``fn(crops)`` maps (N, 3, h, w) to logits (N, K, h, w) at the window's
    size; up to ``max_batch`` windows go through it together (all windows have the same size)."""
    B, _, H, W = x.shape
    boxes = window_boxes(H, W, window, stride)
    out, count = None, x.new_zeros(1, 1, H, W)
    for start in range(0, len(boxes), max_batch):
        chunk = boxes[start:start + max_batch]
        crops = torch.cat([x[:, :, t:b, l:r] for t, l, b, r in chunk])  # (len(chunk)·B, 3, h, w)
        logits = fn(crops)
        if out is None:
            out = x.new_zeros(B, logits.shape[1], H, W, dtype=logits.dtype)
        for k, (t, l, b, r) in enumerate(chunk):
            out[:, :, t:b, l:r] += logits[k * B:(k + 1) * B]
            count[:, :, t:b, l:r] += 1
    return out / count


@torch.no_grad()
def predict(model: Segmenter, x: Tensor, out_size: Tuple[int, int], mode: str = "whole",
            window: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None) -> Tensor:
    """Logits (B, K, *out_size) for images x (B, 3, H, W) (resized for testing): computed at the input
    size by whole-image or sliding-window inference, then resized bilinearly to the label size."""
    if mode == "slide":
        logits = slide_inference(lambda c: model.logits(c), x, window, stride)
    elif mode == "whole":
        logits = model.logits(x)
    else:
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if logits.shape[-2:] != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits
