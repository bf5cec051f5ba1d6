"""Joint image/mask transforms for segmentation (the mmsegmentation pipeline, re-implemented).

Training (``TrainTransform``), in this order, as in mmsegmentation's VOC/ADE20K/Cityscapes configs:
1. random rescale: a ratio r is drawn uniformly in ``ratio_range`` (0.5, 2.0) and the image is
   resized, keeping its aspect ratio, to the largest size fitting in (long r·L, short r·S) for the
   base ``scale`` (L, S) = (2048, 512) (Cityscapes (2048, 1024));
2. random crop of ``crop_size`` (smaller images give a smaller crop, padded in step 6); with
   ``cat_max_ratio`` < 1 the crop is redrawn up to 10 times until no single class covers
   ``cat_max_ratio`` or more of its labelled pixels and it holds at least two classes;
3. horizontal flip with probability 0.5;
4. optional photometric distortion (each with probability 0.5: brightness ±32, contrast ×[0.5, 1.5]
   before or after (at random) saturation ×[0.5, 1.5] and hue ±18/180 of the colour circle);
5. to a float tensor normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225);
6. padding at the bottom and right to ``crop_size``: image 0 (the mean colour after
   normalisation), mask 255 (ignored by the loss).
The image is resized bilinearly, the mask with nearest neighbours (labels are never blended).
Randomness comes from torch's global generator, which ``datasets.build_loader`` seeds per
(seed, epoch, index): a resumed run sees the crops of the uninterrupted one.

Evaluation (``EvalTransform``): the image is resized to fit the test ``scale`` (no randomness) and
normalised; the mask keeps its original size, since the logits are resized to it.

Both take ``(PIL image, mask)`` with mask a PIL image or an (H, W) uint8 array, and return
``(image (3, h, w) float32, mask (H, W) int64)``.
"""
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

__all__ = ["MEAN", "STD", "IGNORE_INDEX", "rescale_size", "TrainTransform", "EvalTransform",
           "random_crop_box", "normalize"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)  # evaluation statistics (pretraining normalised red with std 0.228)
IGNORE_INDEX = 255

Mask = Union[Image.Image, np.ndarray]


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _coin(p: float = 0.5) -> bool:
    return bool(torch.rand(()) < p)


def rescale_size(width: int, height: int, scale: Sequence[int]) -> Tuple[int, int]:
    """(new_width, new_height): the largest size with the same aspect ratio whose long side is at
    most max(scale) and short side at most min(scale) (mmcv's ``keep_ratio`` rescale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _as_mask_image(mask: Mask) -> Image.Image:
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "P"):
            raise ValueError(f"a label image must hold class indices (mode L or P), got mode {mask.mode}; "
                             f"colour-coded (RGB) label files need converting to index PNGs first")
        return mask
    return Image.fromarray(np.asarray(mask, dtype=np.uint8))


def _mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.uint8)).long()  # P images give their indices


def normalize(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 normalised with MEAN and STD."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return TF.normalize(x, MEAN, STD)


def random_crop_box(mask: np.ndarray, crop_size: Tuple[int, int], cat_max_ratio: float = 1.0,
                    ignore_index: int = IGNORE_INDEX, tries: int = 10) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of at most ``crop_size`` (h, w) inside ``mask``.

    With ``cat_max_ratio`` < 1 the crop is redrawn (up to ``tries`` times, the last draw is kept)
    until it holds two or more classes and the most frequent covers less than ``cat_max_ratio`` of
    its labelled pixels: crops of pure background teach a linear head little.
    """
    h, w = mask.shape
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    for _ in range(tries if cat_max_ratio < 1.0 else 1):
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        if cat_max_ratio >= 1.0:
            break
        counts = np.bincount(mask[top:top + ch, left:left + cw].ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left, ch, cw


def photometric_distortion(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> the same, distorted (mmsegmentation's PhotoMetricDistortion,
    with torchvision's saturation/hue operations instead of OpenCV's HSV arithmetic)."""
    if _coin():
        x = (x + _uniform(-32, 32) / 255).clamp_(0, 1)
    contrast_first = _coin()

    def contrast(x):
        return (x * _uniform(0.5, 1.5)).clamp_(0, 1) if _coin() else x

    if contrast_first:
        x = contrast(x)
    if _coin():
        x = TF.adjust_saturation(x, _uniform(0.5, 1.5))
    if _coin():
        x = TF.adjust_hue(x, int(torch.randint(-18, 19, ())) / 180)
    if not contrast_first:
        x = contrast(x)
    return x


class TrainTransform:
    """Random rescale, crop, flip, photometric distortion, normalise, pad (module docstring).

    Args:
        scale: base (long, short) size the random ratio multiplies, e.g. (2048, 512).
        crop_size: (height, width) of the training crops, e.g. (512, 512) or (512, 1024).
        ratio_range: range of the random rescale ratio.
        cat_max_ratio: largest share of one class in a crop (1 disables the check).
        flip_prob: probability of a horizontal flip.
        photometric: apply the photometric distortion.
    """

    def __init__(self, scale: Sequence[int], crop_size: Sequence[int], ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 ignore_index: int = IGNORE_INDEX):
        self.scale, self.crop_size = tuple(scale), tuple(crop_size)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.flip_prob, self.photometric, self.ignore_index = flip_prob, photometric, ignore_index

    def __call__(self, image: Image.Image, mask: Mask) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = image.convert("RGB"), _as_mask_image(mask)
        if image.size != mask.size:
            raise ValueError(f"image size {image.size} and label size {mask.size} differ")
        r = _uniform(*self.ratio_range)
        size = rescale_size(*image.size, (r * self.scale[0], r * self.scale[1]))
        image = image.resize(size, Image.BILINEAR)
        mask = mask.resize(size, Image.NEAREST)
        m = np.array(mask, dtype=np.uint8)
        top, left, h, w = random_crop_box(m, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image = image.crop((left, top, left + w, top + h))
        m = m[top:top + h, left:left + w]
        if _coin(self.flip_prob):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            m = m[:, ::-1]
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        if self.photometric:
            x = photometric_distortion(x)
        x = TF.normalize(x, MEAN, STD)
        y = torch.from_numpy(np.ascontiguousarray(m)).long()
        pad_h, pad_w = self.crop_size[0] - h, self.crop_size[1] - w
        if pad_h or pad_w:  # bottom/right; 0 is the mean colour after normalisation
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = torch.nn.functional.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return x, y

    def __repr__(self):
        return (f"TrainTransform(scale={self.scale}, crop_size={self.crop_size}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric})")


class EvalTransform:
    """Resize the image to fit ``scale`` (long, short) keeping its aspect ratio (None: keep its
    size), normalise; the mask keeps its original size."""

    def __init__(self, scale: Optional[Sequence[int]]):
        self.scale = tuple(scale) if scale else None

    def __call__(self, image: Image.Image, mask: Mask) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = image.convert("RGB"), _as_mask_image(mask)
        if image.size != mask.size:
            raise ValueError(f"image size {image.size} and label size {mask.size} differ")
        if self.scale is not None:
            size = rescale_size(*image.size, self.scale)
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
        return normalize(image), _mask_to_tensor(mask)

    def __repr__(self):
        return f"EvalTransform(scale={self.scale})"
