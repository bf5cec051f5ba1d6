"""Pictures of what a VICRegL backbone learned and how its training went, as PNG files.

    python visualize.py features --checkpoint exp/backbone.pth --image photo.jpg
    python visualize.py matches  --hub convnext_small_alpha0p75 --image photo.jpg
    python visualize.py curves   exp/stats.txt other_exp/

* ``features``: the first three principal components of the dense features of one or more images,
  as RGB, next to each image (one row per image).
* ``matches``: two random crops of one image with the location matches (nearest cell centres in
  image coordinates, as the local loss pairs them) and the feature-space matches (nearest
  neighbours between the two crops' feature maps) drawn between them.
* ``curves``: every loss term and the online probe's accuracy against the step, from one or more
  ``stats.txt`` files written by ``main_vicregl.py``.

The backbone comes from a checkpoint (``--checkpoint``: an exported backbone.pth, a training
model.pth or a published file; the architecture is read from model.pth's arguments or recognised
from the weights' shapes), from a hub entry point (``--hub``, with ``--weights`` to load a local
file instead of downloading) or is randomly initialised (``--random``, a baseline to compare with).
``features`` and ``matches`` are drawn with Pillow and numpy; ``curves`` with matplotlib, which only
that subcommand needs (``pip install matplotlib``). The ``render_*`` functions return ``PIL.Image``
objects for use from other code, ``curves_figure`` the matplotlib Figure.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

import models
from models.checkpoints import CheckpointError, load_backbone as load_checkpoint_backbone
from models.losses import nearest
from transforms import EVAL_STD, IMAGENET_MEAN, location_grid, sample_crop
from utils import UserError, add_trust_argument, exit_on_user_error, resolve_device

__all__ = ["LoadedBackbone", "load_backbone", "load_images", "preprocess", "dense_features", "pca_rgb",
           "render_features", "matched_pairs", "CropMatches", "compute_matches", "render_matches",
           "RunStats", "read_stats", "curves_figure", "render_curves", "main"]

# Layout (pixels). A figure is a title band, then rows of panels, each panel with a label line above.
PAD = 8
LABEL_H = 18
TITLE_H = 24
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GREY = (150, 150, 150)
CROP_COLOURS = ((40, 110, 255), (225, 40, 190))  # crop 1, crop 2 (boxes and frames)
LOCATION_COLOURS = ((0, 165, 70), (130, 215, 160))  # crop 1 -> 2 (num_matches[0]), 2 -> 1 (lighter)
FEATURE_COLOURS = ((240, 110, 0), (255, 195, 120))

# ----------------------------------------------------------------------------- drawing helpers


@lru_cache(maxsize=None)
def _font(size: int = 11) -> ImageFont.ImageFont:
    """PIL's default font at ``size`` (the scalable one when Pillow has FreeType, else the bitmap)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def _fit(text: str, width: int, font) -> str:
    """``text`` shortened with '...' so that it is at most ``width`` pixels wide."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, width: int, font) -> List[str]:
    """Word-wrap ``text`` into lines at most ``width`` pixels wide (long words are shortened)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and _text_width(candidate, font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [_fit(s, width, font) for s in lines + ([line] if line else [])]


def figure_size(rows: int, cols: int, panel_w: int, panel_h: int) -> Tuple[int, int]:
    """(width, height) of a figure of rows x cols labelled panels of panel_w x panel_h."""
    return PAD + cols * (panel_w + PAD), TITLE_H + PAD + rows * (LABEL_H + panel_h + PAD)


def _panel_xy(row: int, col: int, panel_w: int, panel_h: int) -> Tuple[int, int]:
    """Top-left corner of the image area of panel (row, col) (its label sits LABEL_H above)."""
    return PAD + col * (panel_w + PAD), TITLE_H + PAD + row * (LABEL_H + panel_h + PAD) + LABEL_H


def _canvas(rows: int, cols: int, panel_w: int, panel_h: int, title: str) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", figure_size(rows, cols, panel_w, panel_h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((PAD, 5), _fit(title, img.width - 2 * PAD, _font(13)), fill=INK, font=_font(13))
    return img, draw


def _label(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, width: int, fill=INK) -> None:
    draw.text((xy[0], xy[1] - LABEL_H + 3), _fit(text, width, _font(11)), fill=fill, font=_font(11))


def _resized(img: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """Resize for display: nearest when enlarging by 2 or more (pixels stay visible), else bicubic."""
    enlarge = min(size[0] / img.width, size[1] / img.height)
    return img.resize(size, Image.NEAREST if enlarge >= 2 else Image.BICUBIC)


# ----------------------------------------------------------------------------- backbones


@dataclass
class LoadedBackbone:
    backbone: nn.Module  # in eval mode
    arch: str
    small_input: bool
    source: str  # a short description for titles: "random", a path, a hub entry point


def _check_arch(arch: str, small_input: Optional[bool]) -> None:
    try:
        family = models.backbone_family(arch)
    except ValueError as e:
        raise UserError(str(e)) from None
    if small_input and family != "resnet":
        raise UserError("--small-input applies to ResNet backbones only")


def _load_hub(name: str, weights: Optional[str], random_init: bool, trusted: bool) -> LoadedBackbone:
    import hubconf
    if name not in hubconf.__all__:
        raise UserError(f"unknown --hub entry point {name!r}; choose one of: {', '.join(hubconf.__all__)}")
    arch = name.rsplit("_alpha", 1)[0]
    try:
        if random_init:
            backbone = getattr(hubconf, name)(pretrained=False)
        elif weights is not None:
            backbone = getattr(hubconf, name)(weights=weights, trust_checkpoint=trusted)
        else:
            backbone = getattr(hubconf, name)(pretrained=True, trust_checkpoint=trusted)
    except CheckpointError as e:
        hint = "" if weights else "\n  (offline? download the file elsewhere and pass it with --weights)"
        raise UserError(f"{e}{hint}") from None
    source = f"hub {name}" + (" (random init)" if random_init else f" ({weights})" if weights else "")
    return LoadedBackbone(backbone.eval(), arch, False, source)


def load_backbone(checkpoint: Optional[str] = None, *, hub: Optional[str] = None, weights: Optional[str] = None,
                  random_init: bool = False, arch: Optional[str] = None, small_input: Optional[bool] = None,
                  seed: int = 0, trusted: bool = False) -> LoadedBackbone:
    """A backbone in eval mode from exactly one source.

    checkpoint: backbone.pth / model.pth / a published file or URL; ``arch`` and ``small_input``
    default to model.pth's saved arguments, else to what the weights' shapes tell.
    hub: a ``hubconf`` entry point name, with ``weights`` (a local file) instead of the download,
    or ``random_init``. random_init alone: ``build_backbone(arch)`` seeded with ``seed``.
    ``trusted``: unpickle files that hold Python objects (--trust-checkpoint). Mistakes raise UserError.
    """
    if sum([checkpoint is not None, hub is not None, random_init and hub is None]) != 1:
        raise UserError("choose one backbone source: --checkpoint PATH, --hub NAME or --random --arch NAME")
    if weights is not None and hub is None:
        raise UserError("--weights goes with --hub (use --checkpoint PATH for a file on its own)")
    torch.manual_seed(seed)
    if checkpoint is not None:
        if arch is not None:
            _check_arch(arch, small_input)
        try:
            backbone, arch, small_input = load_checkpoint_backbone(checkpoint, arch, small_input, trusted=trusted)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return LoadedBackbone(backbone.eval(), arch, small_input, str(checkpoint))
    if hub is not None:
        if arch is not None or small_input:
            raise UserError("--hub implies the architecture: drop --arch / --small-input")
        if weights is not None and random_init:
            raise UserError("--weights and --random contradict each other")
        return _load_hub(hub, weights, random_init, trusted)
    if arch is None:
        raise UserError("--random needs --arch")
    _check_arch(arch, small_input)
    backbone, _ = models.build_backbone(arch, **({"small_input": True} if small_input else {}))
    return LoadedBackbone(backbone.eval(), arch, bool(small_input), "random init")


def backbone_stride(backbone: nn.Module) -> int:
    """Input pixels per feature-map cell (32, or 8 for a small-input ResNet)."""
    return max(1, round(224 / backbone.map_size(224)))


# ----------------------------------------------------------------------------- images


def load_images(paths: Sequence[str] = (), builtin_indices: Sequence[int] = (), builtin_size: int = 64,
                builtin_split: str = "val", seed: int = 0) -> List[Tuple[str, Image.Image]]:
    """(name, RGB image) for every file in ``paths``, then every sample of the built-in dataset."""
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                out.append((Path(p).name, im.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    if builtin_indices:
        from builtin_data import BuiltinDataset  # entry scripts may import the data modules
        try:
            data = BuiltinDataset(builtin_split, num_images=max(builtin_indices) + 1, image_size=builtin_size,
                                  seed=seed)
        except ValueError as e:
            raise UserError(f"built-in dataset: {e}") from None
        for i in builtin_indices:
            if i < 0:
                raise UserError(f"--builtin-index must be >= 0, got {i}")
            image, _, label = data.sample(i)
            out.append((f"built-in {builtin_split} #{i} (class {label})", image))
    return out


def _to_tensor(img: Image.Image) -> Tensor:
    """(3, H, W) float normalised with the evaluation statistics (ImageNet mean, std 0.229...)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(EVAL_STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess(img: Image.Image, size: int) -> Tuple[Tensor, Image.Image]:
    """Resize the shorter side to ``size`` (bicubic), centre-crop size x size, normalise.
    Returns (tensor (3, size, size), the cropped PIL image that the tensor shows)."""
    scale = size / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return _to_tensor(img), img


# ----------------------------------------------------------------------------- features


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


# ----------------------------------------------------------------------------- matches


def matched_pairs(a: Tensor, b: Tensor, k: Optional[int]) -> Tensor:
    """Pairs (position in a, its nearest position in b) as the local loss keeps them.

    a: (La, F), b: (Lb, F) (grid centres or features of one image's two crops); k: how many
    positions of a to keep (the k whose nearest neighbour is closest), None for all of them.
    Returns (k, 2) long, rows in increasing order of a's position, exactly ``models.losses.nearest``.
    """
    kept, nn_idx = nearest(a.unsqueeze(0), b.unsqueeze(0), k)  # (1, k), (1, k)
    if kept is None:
        kept = torch.arange(a.shape[0]).unsqueeze(0)
    return torch.stack([kept[0], nn_idx[0]], dim=1)


@dataclass
class CropMatches:
    """Two crops of one image and the matches between them.

    crops: (i, j, h, w, H, W) each; sizes: side each crop was resized to for the backbone;
    grids: (N, N, 2) cell centres in image pixels (row, col); views: the resized crops (PIL);
    location / feature: {'1->2': (k0, 2), '2->1': (k1, 2)} rows (cell of crop 1, cell of crop 2),
    cells numbered row-major as in the maps; '1->2' keeps num_matches[0] cells of crop 1, '2->1'
    num_matches[1] of crop 2 (None: all positions).
    """
    crops: List[Tuple[int, ...]]
    sizes: List[int]
    grids: List[Tensor]
    views: List[Image.Image]
    location: Dict[str, Tensor]
    feature: Dict[str, Tensor]
    num_matches: Tuple[Optional[int], Optional[int]]
    feature_num_matches: Tuple[Optional[int], Optional[int]] = (None, None)

    def image_distance(self, pairs: Tensor) -> float:
        """Mean distance in image pixels between the centres of the paired cells."""
        g1, g2 = (g.reshape(-1, 2).double() for g in self.grids)
        return float((g1[pairs[:, 0]] - g2[pairs[:, 1]]).norm(dim=1).mean()) if len(pairs) else float("nan")

    def chance_distance(self) -> float:
        """Mean distance in image pixels between every cell of crop 1 and every cell of crop 2."""
        g1, g2 = (g.reshape(-1, 2).double() for g in self.grids)
        return float(torch.cdist(g1, g2).mean())


@torch.no_grad()
def compute_matches(backbone: nn.Module, image: Image.Image, size_crops: Sequence[int] = (224, 224),
                    scales: Sequence[Tuple[float, float]] = ((0.4, 1.0), (0.4, 1.0)),
                    num_matches: Sequence[int] = (20, 4), all_feature_matches: bool = False,
                    seed: int = 0) -> CropMatches:
    """Sample two crops of ``image`` (``transforms.sample_crop``, seeded), run the backbone on each
    and match them: by location (``location_grid`` centres, k as in the loss) and by features
    (the backbone's maps; k the same, or every position with ``all_feature_matches`` as the loss
    does by default). No flip and no colour distortion: the picture is about geometry."""
    gen = torch.Generator().manual_seed(seed)
    crops = [sample_crop(image.height, image.width, scale=tuple(s), generator=gen) for s in scales]
    device = next(backbone.parameters()).device
    views, grids, maps = [], [], []
    for crop, size in zip(crops, size_crops):
        i, j, h, w = crop[:4]
        view = image.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
        m, _ = backbone(_to_tensor(view).unsqueeze(0).to(device))  # (1, L, C)
        side = math.isqrt(m.shape[1])
        views.append(view)
        maps.append(m[0].float().cpu())
        grids.append(location_grid(crop, side))  # (N, N, 2), same row-major order as the maps
    positions = [m.shape[0] for m in maps]
    for view, k, n in ((1, num_matches[0], positions[0]), (2, num_matches[1], positions[1])):
        if not 1 <= k <= n:
            raise UserError(f"--num_matches {list(num_matches)}: {k} matches asked of crop {view}, which has "
                            f"{n} feature-map positions (crop sizes {list(size_crops)})")
    g1, g2 = (g.reshape(-1, 2) for g in grids)
    location = {"1->2": matched_pairs(g1, g2, num_matches[0]),
                "2->1": matched_pairs(g2, g1, num_matches[1]).flip(1)}
    fk = (None, None) if all_feature_matches else tuple(num_matches)
    feature = {"1->2": matched_pairs(maps[0], maps[1], fk[0]),
               "2->1": matched_pairs(maps[1], maps[0], fk[1]).flip(1)}
    return CropMatches([tuple(c) for c in crops], list(size_crops), grids, views, location, feature,
                       tuple(num_matches), fk)


def _fit_box(img: Image.Image, panel: int) -> Tuple[float, int, int]:
    """(scale, x offset, y offset) that fit ``img`` centred into a panel x panel square."""
    scale = panel / max(img.width, img.height)
    return scale, (panel - round(img.width * scale)) // 2, (panel - round(img.height * scale)) // 2


def _cell_xy(m: CropMatches, view: int, cell: int, origin: Tuple[int, int], panel: int) -> Tuple[float, float]:
    """Where cell ``cell`` of crop ``view`` (0 or 1) lies in its panel at ``origin`` on the figure."""
    i, j, h, w = m.crops[view][:4]
    r, c = m.grids[view].reshape(-1, 2)[cell].tolist()
    return origin[0] + (c - j) / w * panel, origin[1] + (r - i) / h * panel


def _dot(draw: ImageDraw.ImageDraw, xy, radius: float, fill, outline=None) -> None:
    x, y = xy
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=outline)


def _draw_pair_panels(fig: Image.Image, draw: ImageDraw.ImageDraw, m: CropMatches, row: int, panel: int,
                      pairs: Dict[str, Tensor], colours, what: str) -> None:
    origins = [_panel_xy(row, col, panel, panel) for col in (0, 1)]
    for v, origin in enumerate(origins):
        fig.paste(_resized(m.views[v], (panel, panel)), origin)
        draw.rectangle((origin[0] - 1, origin[1] - 1, origin[0] + panel, origin[1] + panel),
                       outline=CROP_COLOURS[v], width=2)
        n = m.grids[v].shape[0]
        for cell in range(n * n):
            _dot(draw, _cell_xy(m, v, cell, origin, panel), 1.5, (255, 255, 255), GREY)
    for direction, colour, width in (("2->1", colours[1], 1), ("1->2", colours[0], 2)):  # strong on top
        for p, q in pairs[direction].tolist():
            a, b = _cell_xy(m, 0, p, origins[0], panel), _cell_xy(m, 1, q, origins[1], panel)
            draw.line((a, b), fill=colour, width=width)
            for xy in (a, b):
                _dot(draw, xy, 3 if width == 2 else 2, colour)
    k = [len(pairs["1->2"]), len(pairs["2->1"])]
    cells = [g.shape[0] * g.shape[1] for g in m.grids]
    _label(draw, origins[0], f"{what}: crop 1 -> 2 ({k[0]} of {cells[0]} cells)", panel, colours[0])
    _label(draw, origins[1], f"crop 2 -> 1 ({k[1]} of {cells[1]} cells), lighter", panel, INK)


def render_matches(image: Image.Image, m: CropMatches, panel: int = 224, title: str = "") -> Image.Image:
    """Figure of two crops and their matches (3 rows x 2 panels, ``figure_size(3, 2, panel, panel)``):
    the image with both crop boxes and a legend; the crops with the location matches; the crops
    with the feature-space matches. Crop 1 -> 2 matches are drawn strong, 2 -> 1 lighter."""
    fig, draw = _canvas(3, 2, panel, panel, title or "location and feature-space matches between two crops")
    origin = _panel_xy(0, 0, panel, panel)
    scale, ox, oy = _fit_box(image, panel)
    shown = _resized(image, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    fig.paste(shown, (origin[0] + ox, origin[1] + oy))
    for v, crop in enumerate(m.crops):
        i, j, h, w = crop[:4]
        x0, y0 = origin[0] + ox + j * scale, origin[1] + oy + i * scale
        draw.rectangle((x0, y0, x0 + w * scale - 1, y0 + h * scale - 1), outline=CROP_COLOURS[v], width=2)
        for r, c in m.grids[v].reshape(-1, 2).tolist():
            _dot(draw, (origin[0] + ox + c * scale, origin[1] + oy + r * scale), 1.5, CROP_COLOURS[v])
    _label(draw, origin, f"image {image.width}x{image.height}: crop boxes, cell centres", panel)
    _draw_legend(draw, m, _panel_xy(0, 1, panel, panel), panel)
    _draw_pair_panels(fig, draw, m, 1, panel, m.location, LOCATION_COLOURS, "location")
    _draw_pair_panels(fig, draw, m, 2, panel, m.feature, FEATURE_COLOURS, "features")
    return fig


def _draw_legend(draw: ImageDraw.ImageDraw, m: CropMatches, origin: Tuple[int, int], panel: int) -> None:
    font = _font(11)
    x, y = origin
    _label(draw, origin, "legend", panel)
    entries = []
    for v, crop in enumerate(m.crops):
        i, j, h, w, H, W = crop
        n = m.grids[v].shape[0]
        entries.append((CROP_COLOURS[v], f"crop {v + 1}: {w}x{h} px at ({j}, {i}), {w * h / (H * W):.0%} of the "
                                         f"image, resized to {m.sizes[v]} px, {n}x{n} cells"))
    fk = ["all" if k is None else k for k in m.feature_num_matches]
    entries += [
        (LOCATION_COLOURS[0], f"location matches: each kept cell joined to the nearest cell centre of the "
                              f"other crop in image coordinates; k = {m.num_matches[0]} / {m.num_matches[1]} "
                              f"(1 -> 2 / 2 -> 1, as the local loss)"),
        (FEATURE_COLOURS[0], f"feature matches: nearest neighbour in the backbone's feature maps; "
                             f"k = {fk[0]} / {fk[1]}"),
        (INK, f"mean image distance of matched cells (1 -> 2): location "
              f"{m.image_distance(m.location['1->2']):.1f} px, features "
              f"{m.image_distance(m.feature['1->2']):.1f} px, any pair {m.chance_distance():.1f} px"),
    ]
    for colour, text in entries:
        lines = _wrap(text, panel - 16, font)
        if y + 12 * len(lines) > origin[1] + panel:
            break
        draw.rectangle((x, y + 3, x + 9, y + 12), fill=colour)
        for line in lines:
            draw.text((x + 14, y), line, fill=INK, font=font)
            y += 12
        y += 5


# ----------------------------------------------------------------------------- training curves

DEFAULT_KEYS = ("l", "inv_l", "var_l", "cov_l", "minv_l", "mvar_l", "mcov_l", "cls_l", "top1", "top1_val")
KEY_NAMES = {
    "l": "total loss", "inv_l": "global invariance", "var_l": "global variance", "cov_l": "global covariance",
    "minv_l": "local invariance", "mvar_l": "local variance", "mcov_l": "local covariance",
    "cls_l": "online probe cross-entropy", "top1": "online probe top-1 % (train)",
    "top5": "online probe top-5 % (train)", "top1_val": "online probe top-1 % (val)",
    "top5_val": "online probe top-5 % (val)", "clsl_val": "online probe cross-entropy (val)",
    "lr": "learning rate", "stdr": "std of normalised representations", "corr": "mean correlation (repr.)",
    "stde": "std of normalised embeddings", "core": "mean correlation (embeddings)",
}


@dataclass
class RunStats:
    """One stats.txt: ``series[key]`` = (steps, values), steps increasing; validation keys
    (``*_val``) are placed at the step that ended their epoch."""
    path: str
    label: str
    commands: List[str] = field(default_factory=list)  # one per start (resumed runs add one)
    series: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    skipped: int = 0  # lines that were neither a command line nor valid JSON (e.g. cut off by a crash)
    first_skipped: int = 0  # the line number (from 1) of the first of them


def _stats_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "stats.txt"
    if not p.is_file():
        raise UserError(f"stats file not found: {p}")
    return p


def read_stats(path: str, label: Optional[str] = None) -> RunStats:
    """Read a ``main_vicregl.py`` stats.txt (or an experiment folder holding one).

    Lines: command lines (one per start), JSON objects with ``ep``, ``st`` and the metrics, and
    ``Val: {...}`` objects with ``ep`` and the validation metrics. A step logged twice (a resumed
    run redoing steps) keeps its last value. A ``Val:`` line of epoch e sits at the last step
    logged in epoch e (else the last step logged before it).
    """
    p = _stats_path(path)
    run = RunStats(str(p), label or (p.parent.name if p.name == "stats.txt" else p.name) or str(p))
    points: Dict[str, Dict[int, float]] = {}
    val_lines, epoch_end, last_step = [], {}, 0
    for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        is_val = text.startswith("Val:")
        body = text[len("Val:"):].strip() if is_val else text
        if not body.startswith("{"):
            if body:
                run.commands.append(body)
            continue
        row = _stats_row(body)
        if row is None:
            run.skipped += 1
            run.first_skipped = run.first_skipped or number
            continue
        if is_val:
            val_lines.append((row, last_step))
            continue
        if not isinstance(row.get("st"), int):
            run.skipped += 1
            run.first_skipped = run.first_skipped or number
            continue
        last_step = row["st"]
        epoch_end[row.get("ep")] = max(epoch_end.get(row.get("ep"), last_step), last_step)
        _add_points(points, row, last_step)
    for row, before in val_lines:
        _add_points(points, row, epoch_end.get(row.get("ep"), before))
    for key, by_step in points.items():
        steps = sorted(by_step)
        run.series[key] = (steps, [by_step[s] for s in steps])
    return run


def _bounded_int(text: str) -> int:
    if len(text) > 19:  # steps and metrics fit in 64 bits; longer would overflow float() or take long to parse
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # a literal such as 1e999 (a diverged loss is written NaN or Infinity)
        raise ValueError(f"number {text[:20]} out of range")
    return value


def _stats_row(body: str) -> Optional[dict]:
    """The JSON object of one stats line, or None when the line is not a flat object of numbers, strings,
    booleans and nulls (cut off by a crash, or not written by main_vicregl.py: huge or deeply nested values
    are refused, not parsed)."""
    try:
        row = json.loads(body, parse_int=_bounded_int, parse_float=_finite_float)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        return None
    if not isinstance(row, dict) or not all(v is None or isinstance(v, (int, float, str)) for v in row.values()):
        return None
    return row


def _add_points(points: Dict[str, Dict[int, float]], row: dict, step: int) -> None:
    for key, value in row.items():
        if key not in ("ep", "st") and isinstance(value, (int, float)) and not isinstance(value, bool):
            points.setdefault(key, {})[step] = float(value)


CURVES_DPI = 100  # --panel-size is in pixels; the text sizes below are points at this resolution


def _matplotlib():
    """matplotlib's Figure, Agg canvas and Line2D, imported only here: ``curves`` is the one subcommand that
    needs matplotlib. The object-oriented API (no pyplot) leaves the global backend and state alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError("visualize.py curves needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg, Line2D


def curves_size(num_panels: int, cols: int, panel_w: int, panel_h: int, legend_lines: int = 1) -> Tuple[int, int]:
    """(width, height) of a curves figure: ``figure_size`` plus one extra band per legend line after the first."""
    rows = math.ceil(num_panels / cols)
    w, h = figure_size(rows, min(cols, num_panels), panel_w, panel_h)
    return w, h + (legend_lines - 1) * LABEL_H


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:max(chars - 3, 1)] + "..."


def _curve_keys(runs: Sequence[RunStats], keys: Optional[Sequence[str]]) -> List[str]:
    present = {k for r in runs for k in r.series}
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if k in present]
    else:
        missing = [k for k in keys if k not in present]
        if missing:
            raise UserError(f"no run logged {', '.join(missing)}; logged keys: {', '.join(sorted(present))}")
    if not keys:
        raise UserError(f"none of {', '.join(DEFAULT_KEYS)} is in {', '.join(r.path for r in runs)}")
    return list(keys)


def _plot_series(ax, steps: List[int], values: List[float], colour: str, label: str, markers: bool) -> None:
    """One run's line; NaN and infinite values (a diverged loss) leave a gap. Validation series get a marker
    on every point, the others only on points with no finite neighbour (no line segment to show them)."""
    y = np.asarray(values, dtype=np.float64)
    y[~np.isfinite(y)] = np.nan
    finite = np.isfinite(y)
    alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
    ax.plot(steps, y, color=colour, linewidth=1.5, label=label, marker="o", markersize=3,
            markevery=list(finite if markers else alone), clip_on=False)  # whole markers at the x limits


def curves_figure(runs: Sequence[RunStats], keys: Optional[Sequence[str]] = None, cols: int = 4,
                  panel_size: Tuple[int, int] = (240, 170)):
    """A matplotlib Figure: a grid of small line plots, one per metric, x = training step (the same range in
    every plot), one colour per run (matplotlib's C0, C1, ...).

    keys: the metrics to show (default: ``DEFAULT_KEYS`` that any run has, in that order; asked-for keys
    that no run has raise UserError). Each plot's left-aligned title is "key: description"; each line's
    label is its run's label. The legend (one column per plot column, "label (last step N)") and, for one
    run, its first command line fill the band at the top. Size at ``CURVES_DPI``:
    ``curves_size(len(keys), cols, *panel_size, legend lines)`` pixels, panels placed as ``_panel_xy``.
    """
    Figure, FigureCanvasAgg, Line2D = _matplotlib()
    if not runs:
        raise UserError("no stats file to plot")
    keys = _curve_keys(runs, keys)
    cols = max(1, min(cols, len(keys)))
    pw, ph = panel_size
    legend_lines = math.ceil(len(runs) / cols)
    width, height = curves_size(len(keys), cols, pw, ph, legend_lines)
    # +0.01: some matplotlib versions' Agg canvas truncates width * dpi to whole pixels (113 / 100 * 100 is
    # 112.99999...), which would make the picture a pixel smaller than curves_size
    fig = Figure(figsize=((width + 0.01) / CURVES_DPI, (height + 0.01) / CURVES_DPI), dpi=CURVES_DPI)
    FigureCanvasAgg(fig)
    steps = [s for r in runs for k in keys if k in r.series for s in r.series[k][0]]
    xlo, xhi = (min(steps), max(steps)) if steps else (0, 1)
    shift = (legend_lines - 1) * LABEL_H
    for n, key in enumerate(keys):
        x, y = _panel_xy(n // cols, n % cols, pw, ph)
        y += shift  # plot area: 46 px left for the y tick labels, 26 below for the x ticks and "step"
        ax = fig.add_axes([(x + 46) / width, 1 - (y + ph - 26) / height, (pw - 54) / width, (ph - 30) / height])
        ax.set_title(_shorten(f"{key}: {KEY_NAMES.get(key, key)}", pw // 6), loc="left", fontsize=8, pad=4,
                     x=-46 / (pw - 54))  # from the panel's left edge, as wide as the panel (~6 px a character)
        for r, run in enumerate(runs):
            if key in run.series:
                _plot_series(ax, *run.series[key], f"C{r}", run.label, key.endswith("_val"))
        if not any(np.isfinite(v) for r in runs if key in r.series for v in r.series[key][1]):
            ax.text(0.04, 0.94, "no finite values", transform=ax.transAxes, fontsize=7, color="0.5", va="top")
        ax.set_xlim(xlo, xhi if xhi > xlo else xlo + 1)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 10000 else f"{v:g}")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.4g}")  # no offset text to collide with the title
        ax.tick_params(labelsize=7, length=3, pad=2)
        ax.set_xlabel("step", fontsize=7, color="0.5", labelpad=1)
        ax.grid(axis="y", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
    suffixes = [f" (last step {max((s for v in run.series.values() for s in v[0]), default=0)})" for run in runs]
    legend = fig.legend([Line2D([], [], color=f"C{r}", linewidth=2.5) for r in range(len(runs))],
                        [_shorten(run.label, (pw - 31) // 6 - len(end)) + end for run, end in zip(runs, suffixes)],
                        loc="upper left", bbox_to_anchor=(PAD / width, 1 - 3 / height), ncol=cols, frameon=False,
                        fontsize=8, borderpad=0, borderaxespad=0, handlelength=1.5, labelspacing=0.6)
    if len(runs) == 1 and runs[0].commands:  # one run: room for how it was started
        right = legend.get_window_extent(fig.canvas.get_renderer()).x1 + 16
        fig.text(right / width, 1 - 5 / height, _shorten(runs[0].commands[0], int((width - PAD - right) / 5.5)),
                 fontsize=7, color="0.5", va="top")
    return fig


def render_curves(runs: Sequence[RunStats], keys: Optional[Sequence[str]] = None, cols: int = 4,
                  panel_size: Tuple[int, int] = (240, 170)) -> Image.Image:
    """``curves_figure`` drawn into an RGB image (at ``CURVES_DPI``)."""
    fig = curves_figure(runs, keys, cols, panel_size)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")


# ----------------------------------------------------------------------------- command line


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to help texts that do not state their default, unless it is empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (one of --checkpoint, --hub, --random)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH",
                     help="backbone weights: an exported backbone.pth, a training model.pth, a published "
                          "<arch>_alpha<a>.pth or _fullckpt.pth file, or an http(s) URL")
    src.add_argument("--hub", metavar="NAME",
                     help="a hubconf.py entry point, e.g. convnext_small_alpha0p75 (downloads the published "
                          "weights unless --weights or --random is given)")
    g.add_argument("--weights", metavar="PATH",
                   help="with --hub: load this local file (backbone or full checkpoint) instead of downloading")
    g.add_argument("--random", action="store_true",
                   help="randomly initialised backbone (seeded by --seed), a baseline to compare with; "
                        "needs --arch, or goes with --hub")
    g.add_argument("--arch", help="architecture, e.g. resnet50 or convnext_small (default with --checkpoint: "
                                  "model.pth's saved --arch, else recognised from the weights' shapes)")
    g.add_argument("--small-input", action="store_true", default=None,
                   help="ResNet with the small-input stem (3x3 stride-1 conv, no max-pool), as pretrained "
                        "with --small-input on 32-64 px images (default with --checkpoint: read from the file)")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seed of --random weights and of the crops of 'matches'")
    add_trust_argument(g)


def _add_image_args(p: argparse.ArgumentParser, default_indices: Sequence[int]) -> None:
    g = p.add_argument_group(f"input images (default: built-in samples {' '.join(map(str, default_indices))})")
    g.add_argument("--image", nargs="+", default=[], metavar="FILE", help="image files (any format Pillow reads)")
    g.add_argument("--builtin-index", nargs="+", type=int, default=None, metavar="I",
                   help="samples of the built-in procedural dataset (no download) to show")
    g.add_argument("--builtin-size", type=int, default=64, help="image side of the built-in samples")
    g.add_argument("--builtin-split", choices=["train", "val"], default="val", help="built-in split to draw from")


def _add_picture_args(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--panel", type=int, default=224, help="side of each panel in the picture, in pixels")
    p.add_argument("--out", help=f"output PNG (default: {default_name} next to --checkpoint, else in the current "
                                 "folder)")
    p.add_argument("--palette", action="store_true",
                   help="save with a 256-colour palette (smaller files, e.g. for documentation)")


def get_args_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        description="PNG pictures of a VICRegL backbone's dense features, of the matches between two crops, "
                    "and of training curves.", formatter_class=fmt,
        epilog="Run 'python visualize.py SUBCOMMAND --help' for each subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="{features,matches,curves}", required=True)

    f = sub.add_parser("features", formatter_class=fmt,
                       help="dense features as their first three principal components in RGB, next to each image",
                       description="Show each image next to its dense features: the first three principal "
                                   "components (PCA over every position of the feature map, jointly over all "
                                   "images) mapped to red, green and blue.")
    _add_backbone_args(f)
    _add_image_args(f, [0, 1, 2, 3])
    f = f.add_argument_group("picture")
    f.add_argument("--size", type=int, default=None,
                   help="side the images are resized (shorter side) and centre-cropped to before the backbone "
                        "(default: 14 cells, i.e. 448 px for stride-32 backbones, 112 for small-input ResNets)")
    f.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=4,
                   help="which feature map: 4 is the backbone's output (the maps the local loss sees); "
                        "3, 2, 1 are earlier stages with 2x, 4x, 8x finer cells but less semantic features")
    f.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest",
                   help="how the colour map is enlarged to the image: nearest shows the cells, bilinear is smoother")
    f.add_argument("--per-image-pca", action="store_true",
                   help="one PCA per image (more contrast) instead of one over all images (comparable colours)")
    f.add_argument("--clip-percent", type=float, default=1.0,
                   help="each component is scaled between its p-th and (100-p)-th percentiles")
    f.add_argument("--overlay", action="store_true", help="add a panel blending the image and the colours")
    f.add_argument("--compare-random", action="store_true",
                   help="add a column for a randomly initialised backbone of the same architecture (seeded by "
                        "--seed): what the colours of an untrained network look like")
    f.add_argument("--compare", nargs="+", default=[], metavar="LABEL=PATH",
                   help="more backbones of the same architecture, a column each with its own PCA: backbone "
                        "files (or URLs) as LABEL=PATH, or PATH (labelled by its folder's name), e.g. "
                        "vicreg=exp/demo-seg/vicreg/backbone.pth")
    f.add_argument("--label", default="", help="column title of the first backbone's features (default: PCA)")
    _add_picture_args(f, "features.png")

    m = sub.add_parser("matches", formatter_class=fmt,
                       help="two random crops of one image with their location and feature-space matches",
                       description="Sample two random-resized crops of one image (the first given) and draw "
                                   "the location matches (each kept cell joined to the cell of the other crop "
                                   "whose centre is nearest in image coordinates, as the local loss pairs them) "
                                   "and the feature-space matches (nearest neighbours between the crops' "
                                   "feature maps). Crops are neither flipped nor colour-distorted.")
    _add_backbone_args(m)
    _add_image_args(m, [0])
    m = m.add_argument_group("crops and matches")
    m.add_argument("--size-crops", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="sides the two crops are resized to for the backbone (default: 224 224, or 32 32 for a "
                        "small-input ResNet)")
    m.add_argument("--min_scale_crops", type=float, nargs=2, default=[0.4, 0.4], metavar=("A1", "A2"),
                   help="smallest area fraction of each crop (transforms.sample_crop)")
    m.add_argument("--max_scale_crops", type=float, nargs=2, default=[1.0, 1.0], metavar=("A1", "A2"),
                   help="largest area fraction of each crop")
    m.add_argument("--num_matches", type=int, nargs=2, default=None, metavar=("K1", "K2"),
                   help="location matches kept from crop 1 -> 2 and from crop 2 -> 1, as the loss's "
                        "--num_matches (default: 20 4, capped at the number of cells)")
    m.add_argument("--l2_all_matches", action="store_true",
                   help="draw the feature match of every cell (what the loss uses with --l2_all_matches 1) "
                        "instead of the best K1 / K2")
    _add_picture_args(m, "matches.png")

    c = sub.add_parser("curves", formatter_class=fmt, help="training curves of every loss term from stats.txt files",
                       description="Plot every loss term and the online probe's accuracy against the training "
                                   "step, one small plot per metric, one colour per run.")
    c.add_argument("stats", nargs="+", help="stats.txt files written by main_vicregl.py, or their experiment folders")
    c.add_argument("--keys", nargs="+", default=None,
                   help=f"metrics to plot (default: those of {' '.join(DEFAULT_KEYS)} that were logged; also "
                        "lr, top5, stdr, corr, stde, core, clsl_val, top5_val)")
    c.add_argument("--labels", nargs="+", default=None, help="legend names of the runs (default: folder names)")
    c.add_argument("--cols", type=int, default=4, help="plots per row")
    c.add_argument("--panel-size", type=int, nargs=2, default=[240, 170], metavar=("W", "H"),
                   help="size of each plot in pixels")
    c.add_argument("--out", help="output PNG (default: curves.png next to the first stats file)")
    c.add_argument("--palette", action="store_true",
                   help="save with a 256-colour palette (smaller files, e.g. for documentation)")
    return parser


def _save(fig: Image.Image, out: Path, palette: bool = False, dpi: Optional[int] = None) -> None:
    if palette:  # 256 colours, no dithering: about 3x smaller for figures with photos or noise
        fig = fig.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.save(out, format="PNG", optimize=True, **({"dpi": (dpi, dpi)} if dpi else {}))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    print(f"wrote {out} ({fig.width}x{fig.height})")


def _default_out(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    if getattr(args, "checkpoint", None) and "://" not in args.checkpoint:
        return Path(args.checkpoint).parent / name
    return Path(name)


def _loaded_from_args(args) -> LoadedBackbone:
    loaded = load_backbone(args.checkpoint, hub=args.hub, weights=args.weights, random_init=args.random,
                           arch=args.arch, small_input=args.small_input, seed=args.seed,
                           trusted=args.trust_checkpoint)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    loaded.backbone.to(device)
    return loaded


def _images_from_args(args, default_indices: Sequence[int]):
    indices = args.builtin_index if args.builtin_index is not None else ([] if args.image else default_indices)
    return load_images(args.image, indices, args.builtin_size, args.builtin_split)


def _run_features(args) -> None:
    loaded = _loaded_from_args(args)
    images = _images_from_args(args, [0, 1, 2, 3])
    compare = []
    if args.compare_random:
        baseline = load_backbone(random_init=True, arch=loaded.arch, small_input=loaded.small_input, seed=args.seed)
        compare.append(("random init", baseline.backbone.to(next(loaded.backbone.parameters()).device)))
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or "://" in label:  # a bare path (or URL): labelled by its folder
            label, path = Path(item).parent.name or item, item
        other = load_backbone(path, arch=loaded.arch, small_input=loaded.small_input, trusted=args.trust_checkpoint)
        compare.append((label, other.backbone.to(next(loaded.backbone.parameters()).device)))
    fig = render_features(loaded.backbone, images, args.size, args.stage, args.upsample, not args.per_image_pca,
                          args.clip_percent, args.panel, args.overlay, compare=compare, label=args.label, title=
                          "dense features, 3 principal components as RGB: "
                          f"{loaded.arch}{' (small input)' if loaded.small_input else ''}, "
                          f"{', '.join([args.label or loaded.source, *(name for name, _ in compare)])}")
    _save(fig, _default_out(args, "features.png"), args.palette)


def _run_matches(args) -> None:
    loaded = _loaded_from_args(args)
    name, image = _images_from_args(args, [0])[0]
    sizes = args.size_crops or ([32, 32] if loaded.small_input else [224, 224])
    for s in sizes:
        if loaded.backbone.map_size(s) < 1:
            raise UserError(f"--size-crops {s} is too small for {loaded.arch}")
    for lo, hi in zip(args.min_scale_crops, args.max_scale_crops):
        if not 0 < lo <= hi <= 1:
            raise UserError(f"crop scales must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    cells = [loaded.backbone.map_size(s) ** 2 for s in sizes]
    k = args.num_matches or [min(20, cells[0]), min(4, cells[1])]
    result = compute_matches(loaded.backbone, image, sizes, list(zip(args.min_scale_crops, args.max_scale_crops)),
                             k, args.l2_all_matches, args.seed)
    fig = render_matches(image, result, args.panel, f"{name}, {loaded.arch} from {loaded.source} (seed {args.seed})")
    _save(fig, _default_out(args, "matches.png"), args.palette)


def _run_curves(args) -> None:
    _matplotlib()  # before any other work: say at once that it is missing
    if args.labels is not None and len(args.labels) != len(args.stats):
        raise UserError(f"--labels names {len(args.labels)} runs but {len(args.stats)} stats files were given")
    if args.cols < 1 or min(args.panel_size) < 80:
        raise UserError("--cols must be >= 1 and --panel-size at least 80 80")
    runs = [read_stats(p, label) for p, label in zip(args.stats, args.labels or [None] * len(args.stats))]
    for run in runs:
        if not run.series:
            raise UserError(f"{run.path} holds no metrics (no JSON line)")
        if run.skipped:
            print(f"warning: {run.path}: skipped {run.skipped} line(s) that are not a flat JSON object of numbers "
                  f"and strings (the first: line {run.first_skipped})", file=sys.stderr, flush=True)
    fig = render_curves(runs, args.keys, args.cols, tuple(args.panel_size))
    out = Path(args.out) if args.out else _stats_path(args.stats[0]).parent / "curves.png"
    _save(fig, out, args.palette, CURVES_DPI)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    {"features": _run_features, "matches": _run_matches, "curves": _run_curves}[args.command](args)


if __name__ == "__main__":
    main()
