"""Two random crops of one image with their location matches (nearest cell centres in image
coordinates, as the local loss pairs them) and feature-space matches (nearest neighbours between the
crops' feature maps), as a picture (``python visualize.py matches``)."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from models.losses import nearest
from transforms import location_grid, sample_crop
from utils import UserError

from .draw import GREY, INK, _canvas, _dot, _font, _label, _panel_xy, _resized, _to_tensor, _wrap

__all__ = ["matched_pairs", "CropMatches", "compute_matches", "render_matches"]

CROP_COLOURS = ((40, 110, 255), (225, 40, 190))  # crop 1, crop 2 (boxes and frames)
LOCATION_COLOURS = ((0, 165, 70), (130, 215, 160))  # crop 1 -> 2 (num_matches[0]), 2 -> 1 (lighter)
FEATURE_COLOURS = ((240, 110, 0), (255, 195, 120))


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
