"""The original implementation's training transform, crop by crop on PIL images with torchvision.

About 2x slower than ``transforms.MultiCropTrainDataTransform``, which draws the same distribution
of views: it is kept as the faithful oracle that the statistical test (tests/test_transforms.py) and
``bench/transforms.py`` compare the fast pipeline against. Nothing in training uses it.
"""
from typing import List, Tuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from transforms import (BLUR_SIGMA, GRAYSCALE_P, IMAGENET_MEAN, JITTER, JITTER_P, PRETRAIN_STD, SOLARIZE_THRESHOLD,
                        _MultiCropConfig, _to_rgb, blur_probability, solarize_probability)


class RandomResizedCropWithParams(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (bicubic) that also returns the crop (i, j, h, w, H, W)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=T.InterpolationMode.BICUBIC)

    def forward(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        _, height, width = TF.get_dimensions(img)
        out = TF.resized_crop(img, i, j, h, w, self.size, self.interpolation, antialias=True)
        return out, (i, j, h, w, height, width)


class RandomHorizontalFlipWithFlag(torch.nn.Module):
    """Horizontal flip with probability p that also returns whether it flipped."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        flipped = bool(torch.rand(1) < self.p)
        return (TF.hflip(img) if flipped else img), flipped


class PILGaussianBlur:
    """With probability p, PIL's Gaussian blur with sigma uniform in [0.1, 2.0]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class PILSolarization:
    """With probability p, PIL's solarize (threshold 128)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        return ImageOps.solarize(img, threshold=SOLARIZE_THRESHOLD)


def reference_colour_transform(index_in_group: int, std=PRETRAIN_STD) -> T.Compose:
    """Colour distortion, ToTensor and Normalize of one crop, as the reference composed them."""
    return T.Compose([
        T.RandomApply([T.ColorJitter(**JITTER)], p=JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        PILGaussianBlur(p=blur_probability(index_in_group)),
        PILSolarization(p=solarize_probability(index_in_group)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, std),
    ])


class ReferenceMultiCropTransform(_MultiCropConfig):
    """The reference implementation's training transform, crop by crop on PIL images.

    Same arguments and output as ``MultiCropTrainDataTransform``. It is about 2× slower; it is
    kept as the faithful oracle that the statistical test and the benchmark compare against.
    """

    def __init__(self, size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), no_flip_grid=True, grid_sizes=None,
                 ratio=(3 / 4, 4 / 3)):
        super().__init__(size_crops, num_crops, min_scale_crops, max_scale_crops, no_flip_grid,
                         grid_sizes, ratio)
        self.crop_transforms = [RandomResizedCropWithParams(self.size_crops[g], self.scales[g], ratio)
                                for g, _ in self.view_groups]
        self.flip = RandomHorizontalFlipWithFlag(0.5)
        self.colour_transforms = [reference_colour_transform(k) for _, k in self.view_groups]

    def __call__(self, img: Image.Image) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        img = _to_rgb(img)
        views, crops, flips = [], [], []
        for crop_transform, colour_transform in zip(self.crop_transforms, self.colour_transforms):
            view, crop = crop_transform(img)
            view, flipped = self.flip(view)
            views.append(colour_transform(view))
            crops.append(crop)
            flips.append(flipped)
        return views, self.locations(crops, flips)
