"""What the Pillow pictures share: the layout of labelled panels, fonts and text fitting, the canvas,
labels, dots, display resizing, and the PIL image -> normalised tensor conversion for the backbone."""
from functools import lru_cache
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from transforms import EVAL_STD, IMAGENET_MEAN

# Layout (pixels). A figure is a title band, then rows of panels, each panel with a label line above.
PAD = 8
LABEL_H = 18
TITLE_H = 24
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GREY = (150, 150, 150)

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


def _dot(draw: ImageDraw.ImageDraw, xy, radius: float, fill, outline=None) -> None:
    x, y = xy
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=outline)


# ----------------------------------------------------------------------------- images to tensors


def _to_tensor(img: Image.Image) -> Tensor:
    """(3, H, W) float normalised with the evaluation statistics (ImageNet mean, std 0.229...)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(EVAL_STD).view(3, 1, 1)
    return (x - mean) / std
