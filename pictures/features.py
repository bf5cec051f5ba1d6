"""Dense features as pictures: the first three principal components of a backbone's feature maps as
RGB, next to each image (``python visualize.py features``)."""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from utils import UserError

from .draw import _canvas, _label, _panel_xy, _resized, _to_tensor

__all__ = ["preprocess", "dense_features", "pca_rgb", "render_features"]


def backbone_stride(backbone: nn.Module) -> int:
    """Input pixels per feature-map cell (32, or 8 for a small-input ResNet)."""
    return max(1, round(224 / backbone.map_size(224)))


def preprocess(img: Image.Image, size: int) -> Tuple[Tensor, Image.Image]:
    """Resize the shorter side to ``size`` (bicubic), centre-crop size x size, normalise.
    Returns (tensor (3, size, size), the cropped PIL image that the tensor shows)."""
    scale = size / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return _to_tensor(img), img


@torch.no_grad()
def dense_features(backbone: nn.Module, x: Tensor, stage: int = 4) -> Tensor:
    """Feature maps of a batch x (B, 3, S, S) -> (B, h, w, C).

    stage 4 is the backbone's ``maps`` output (for ConvNeXt after its final LayerNorm); stages 1-3
    are earlier stage outputs (``forward_stages``), 2x finer per stage back, less semantic.
    """
    if stage == 4:
        maps, _ = backbone(x)  # (B, h*w, C), row-major
        side = math.isqrt(maps.shape[1])
        return maps.reshape(maps.shape[0], side, side, maps.shape[2]).float()
    if not hasattr(backbone, "forward_stages"):
        raise UserError(f"{type(backbone).__name__} has no forward_stages: only --stage 4 is available")
    return backbone.forward_stages(x)[stage - 1].permute(0, 2, 3, 1).float()  # (B, h, w, C)


def pca_rgb(features: Sequence[Tensor], clip_percent: float = 1.0, joint: bool = True) -> List[np.ndarray]:
    """The first three principal components of dense features as colours.

    features: a list of (h, w, C) maps. With ``joint`` one PCA over all positions of all maps (a
    colour means the same thing in every image), else one per map. Each component is scaled to
    [0, 255] between its ``clip_percent`` and 100 - ``clip_percent`` percentiles (outliers saturate)
    and its sign is chosen so that its third moment is positive (a small distinct region comes out
    bright, and the colours do not flip between runs). Missing components (C < 3, or no variance
    beyond rounding) are a flat 128.
    Returns a list of (h, w, 3) uint8 arrays.
    """
    if not joint:
        return [pca_rgb([f], clip_percent, True)[0] for f in features]
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).double()  # (N, C)
    x = flat - flat.mean(dim=0)
    proj = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    if x.shape[0] > 1 and x.abs().max() > 0:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # rows of vh: principal directions
        vh = vh[:3][s[:3] > 1e-6 * s[0]]  # directions of rounding noise only would show as colour noise
        p = x @ vh.T  # (N, <=3)
        sign = torch.sign(p.pow(3).sum(dim=0))
        proj[:, :p.shape[1]] = p * torch.where(sign == 0, torch.ones_like(sign), sign)
    q = min(max(clip_percent, 0.0), 49.0) / 100
    lo, hi = torch.quantile(proj, q, dim=0), torch.quantile(proj, 1 - q, dim=0)  # (3,)
    span = hi - lo
    flat_span = span <= 1e-12 * (1 + hi.abs())
    scaled = ((proj - lo) / torch.where(flat_span, torch.ones_like(span), span)).clamp(0, 1)
    scaled[:, flat_span] = 0.5 if x.abs().max() > 0 else 0.0
    rgb = (scaled * 255).round().to(torch.uint8).numpy()
    out, start = [], 0
    for f in features:
        n = f.shape[0] * f.shape[1]
        out.append(rgb[start:start + n].reshape(f.shape[0], f.shape[1], 3))
        start += n
    return out


def render_features(backbone: nn.Module, images: Sequence, size: Optional[int] = None, stage: int = 4,
                    upsample: str = "nearest", joint: bool = True, clip_percent: float = 1.0,
                    panel: int = 224, overlay: bool = False, title: str = "",
                    compare: Sequence[Tuple[str, nn.Module]] = (), label: str = "") -> Image.Image:
    """Each image next to its dense features' first three principal components as RGB.

    images: PIL images or (name, PIL image) pairs, one figure row each. size: the side the images
    are resized and centre-cropped to before the backbone (default 14 cells: 448 for stride 32,
    112 for a small-input ResNet). upsample: 'nearest' (shows the cells) or 'bilinear'. With
    ``overlay`` a panel blends image and colours. ``compare``: (name, backbone) pairs shown in
    further columns with their own PCA (e.g. a randomly initialised baseline of the same arch);
    ``label`` names the first backbone's column.
    Panels are ``panel`` pixels square. Returns the figure, laid out as
    ``figure_size(len(images), 2 + overlay + len(compare), panel, panel)``.
    """
    if upsample not in ("nearest", "bilinear"):
        raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
    if stage not in (1, 2, 3, 4):
        raise UserError(f"--stage must be 1, 2, 3 or 4, got {stage}")
    named = [im if isinstance(im, tuple) else (f"image {k}", im) for k, im in enumerate(images)]
    if not named:
        raise UserError("no image to show")
    size = size or 14 * backbone_stride(backbone)
    if backbone.map_size(size) < 1:
        raise UserError(f"--size {size} is too small for this backbone (its feature map would be empty)")
    tensors, shown = zip(*(preprocess(im, size) for _, im in named))
    columns = []  # per backbone: (label, one (h, w, 3) colour map per image)
    for name, net in [(label, backbone), *compare]:
        x = torch.stack(tensors).to(next(net.parameters()).device)
        feats = dense_features(net, x, stage).cpu()  # (B, h, w, C)
        h, w, c = feats.shape[1:]
        columns.append((f"{name or 'PCA'}, stage {stage}, {h}x{w}x{c}",
                        pca_rgb(list(feats), clip_percent, joint)))
    cols = 1 + len(columns) + overlay
    fig, draw = _canvas(len(named), cols, panel, panel, title or "first three principal components of the "
                        "dense features as RGB")
    resample = Image.NEAREST if upsample == "nearest" else Image.BILINEAR
    for row, ((name, _), img) in enumerate(zip(named, shown)):
        img = _resized(img, (panel, panel))
        tiles = [(img, f"{name}, {size} px")]
        for n, (label, colours) in enumerate(columns):
            pca = Image.fromarray(colours[row], "RGB").resize((panel, panel), resample)
            tiles.append((pca, label))
            if overlay and n == 0:
                tiles.append((Image.blend(img, pca, 0.6), "overlay"))
        for col, (tile, text) in enumerate(tiles):
            xy = _panel_xy(row, col, panel, panel)
            fig.paste(tile, xy)
            _label(draw, xy, text, panel)
    return fig
