"""Multi-crop views that remember where they came from.

A VICRegL training sample is a list of V crops of one image together with, for every crop, an
N×N grid of the centres of its feature-map cells in the original image's pixel coordinates; the
local loss matches positions of two views through these grids.

The implementations of one distribution of views:

* ``MultiCropTrainDataTransform``: the fast one used for training. It samples every random
  parameter of all V views with one RNG call, decodes the JPEG at a reduced scale when every crop
  allows it, resizes on uint8 tensors, and runs the colour distortion on one float tensor per crop
  size (batched, in place), or, with ``collate_views``, on all the views of a loader batch at once.
* ``MultiCropValDataTransform`` and the batched path (``BatchOfViews``, ``crop_batch``): the same
  views for images held in memory, a whole batch at once.

The original implementation's crop-by-crop torchvision/PIL pipeline, the oracle that the tests and
``bench/transforms.py`` compare these against, lives in ``bench/reference_transforms.py``.

Randomness comes from torch's global RNG (which the DataLoader seeds per worker) unless a
``torch.Generator`` is given.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

# Normalisation. The red std 0.228 (instead of ImageNet's 0.229) is a quirk of the original
# pretraining code: the published VICRegL models were trained with it, so pretraining keeps it
# for faithfulness; evaluation (linear probe, fine-tuning) uses the usual 0.229.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
PRETRAIN_STD = (0.228, 0.224, 0.225)
EVAL_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# Colour distortion strengths and probabilities, as the published models were trained with.
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128

Crop = Tuple[int, int, int, int, int, int]  # (i, j, h, w, H, W): top, left, height, width, image H, W


def blur_probability(index_in_group: int) -> float:
    """Gaussian blur is always applied to even crops of a group and with p 0.1 to odd ones."""
    return 1.0 if index_in_group % 2 == 0 else 0.1


def solarize_probability(index_in_group: int) -> float:
    """Solarization never touches even crops of a group and has p 0.2 on odd ones."""
    return 0.0 if index_in_group % 2 == 0 else 0.2


# --------------------------------------------------------------------------------------------
# Crop sampling and location grids
# --------------------------------------------------------------------------------------------

# Uniform numbers one random-resized crop consumes: 10 tries × (scale, log-ratio), then (top, left).
_CROP_TRIES = 10
_CROP_UNIFORMS = 2 * _CROP_TRIES + 2


def crop_from_uniforms(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                       u: Sequence[float]) -> Crop:
    """torchvision's RandomResizedCrop sampling, driven by ``_CROP_UNIFORMS`` numbers in [0, 1).

    Up to 10 tries draw an area fraction uniformly in ``scale`` and an aspect ratio log-uniformly
    in ``ratio``; the first try whose rounded box fits is placed uniformly at random. When none
    fits, the central crop with the aspect ratio clamped to ``ratio`` is taken (the fallback).
    Returns (i, j, h, w, height, width).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_CROP_TRIES):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # floor(u·n) is uniform on {0, …, n−1}, as torch.randint(0, n).
            i = int(u[-2] * (height - h + 1))
            j = int(u[-1] * (width - w + 1))
            return i, j, h, w, height, width
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, height, width


def sample_crop(height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3),
                generator: Optional[torch.Generator] = None) -> Crop:
    """Random-resized-crop parameters (i, j, h, w, height, width) for an image of that size."""
    u = torch.rand(_CROP_UNIFORMS, dtype=torch.float64, generator=generator).tolist()
    return crop_from_uniforms(height, width, scale, ratio, u)


def location_grid(crop: Sequence[int], grid_size: int, flip: bool = False) -> torch.Tensor:
    """Centres of the N×N cells of a crop in the original image's pixel coordinates.

    crop: (i, j, h, w, H, W) as returned by ``sample_crop``; grid_size: N.
    Returns (N, N, 2) float32 with grid[k, l] = (i + (k + 0.5)·h/N, j + (l + 0.5)·w/N) as
    (row, col). ``flip=True`` reverses the columns (l → N − 1 − l), so that column l describes
    what the horizontally flipped view shows at column l. ``location_grids`` does many crops at once.
    """
    crops = torch.tensor([[float(v) for v in crop[:4]]], dtype=torch.float64)
    return location_grids(crops, grid_size, torch.tensor([bool(flip)]))[0]


def location_grids(crops: torch.Tensor, grid_size: int, flips: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``location_grid`` of K crops (K, 4+) (i, j, h, w, ...) at once: (K, N, N, 2) float32, columns
    reversed where ``flips`` (K,) bool."""
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    # float64 then float32: exact to float32 rounding (the reference accumulated in float32).
    crops = crops.double()
    centres = torch.arange(grid_size, dtype=torch.float64) + 0.5  # (N,)
    rows = crops[:, 0:1] + centres * (crops[:, 2:3] / grid_size)  # (K, N)
    cols = crops[:, 1:2] + centres * (crops[:, 3:4] / grid_size)
    if flips is not None:
        cols = torch.where(flips.view(-1, 1), cols.flip(1), cols)
    n = grid_size
    grid = torch.stack([rows.unsqueeze(2).expand(-1, n, n), cols.unsqueeze(1).expand(-1, n, n)], dim=-1)
    return grid.float()


def default_grid_size(size: int, stride: int = 32) -> int:
    """Feature-map side of a stride-32 backbone for a crop of side ``size`` (224 → 7, 96 → 3).

    ConvNeXt floors (size // 32); ResNet's padded convolutions round up instead for sizes that
    are not multiples of 32 (e.g. 100 → 4). Pass the backbone's real map sides as
    ``grid_sizes`` when they differ.
    """
    if size // stride < 1:
        raise ValueError(f"--size-crops: a crop of {size} px gives no feature-map cell at "
                         f"stride {stride}; use crops of at least {stride} px or give grid_sizes")
    return size // stride


def check_grid_sizes(size_crops: Sequence[int], grid_sizes: Sequence[int],
                     map_sides: Sequence[int], arch: str = "the backbone") -> None:
    """Fail clearly when the location grids do not match the backbone's feature maps.

    map_sides[g] is the side of the backbone's last feature map for a crop of size_crops[g]
    (e.g. measured with one forward pass of a zero image). The local loss pairs grid cells
    with map positions one to one, so each N² must equal the map's H·W.
    """
    for size, n, side in zip(size_crops, grid_sizes, map_sides):
        if n != side:
            raise ValueError(f"--size-crops {size}: {arch} gives a {side}x{side} feature map but "
                             f"the location grid is {n}x{n}; pass grid_sizes={list(map_sides)} "
                             f"or choose crop sizes that are multiples of 32")


# --------------------------------------------------------------------------------------------
# Per-view random parameters
# --------------------------------------------------------------------------------------------

@dataclass
class ViewParams:
    """Every random choice made for one view.

    crop: (i, j, h, w, H, W); flip: mirrored horizontally; jitter: (brightness, contrast,
    saturation, hue) factors or None when colour jitter is skipped; order: the order in which
    the four jitter operations are applied (0 brightness, 1 contrast, 2 saturation, 3 hue);
    gray: converted to grayscale; blur_sigma: sigma of the Gaussian blur or None; solarize.
    """
    crop: Crop
    flip: bool
    jitter: Optional[Tuple[float, float, float, float]]
    order: Tuple[int, int, int, int]
    gray: bool
    blur_sigma: Optional[float]
    solarize: bool


# Layout of the uniforms one view consumes (one torch.rand call draws them for all views).
_U_FLIP = _CROP_UNIFORMS
_U_JITTER = _U_FLIP + 1  # apply?, then 4 factors, then 4 sort keys for the order
_U_GRAY = _U_JITTER + 9
_U_BLUR = _U_GRAY + 1  # apply?, sigma
_U_SOLARIZE = _U_BLUR + 2
_U_PER_VIEW = _U_SOLARIZE + 1


def view_params_from_uniforms(height: int, width: int, scale: Sequence[float],
                              ratio: Sequence[float], blur_p: float, solarize_p: float,
                              u: Sequence[float]) -> ViewParams:
    """Turn ``_U_PER_VIEW`` uniforms into one view's parameters, with the distributions of the
    reference's torchvision transforms (ColorJitter's factors are uniform in [1 − s, 1 + s],
    hue in [−h, h], and its operation order is a uniformly random permutation)."""
    crop = crop_from_uniforms(height, width, scale, ratio, u[:_CROP_UNIFORMS])
    jitter, order = None, (0, 1, 2, 3)
    if u[_U_JITTER] < JITTER_P:
        ub, uc, us, uh = u[_U_JITTER + 1:_U_JITTER + 5]
        jitter = (1 + JITTER["brightness"] * (2 * ub - 1), 1 + JITTER["contrast"] * (2 * uc - 1),
                  1 + JITTER["saturation"] * (2 * us - 1), JITTER["hue"] * (2 * uh - 1))
        keys = u[_U_JITTER + 5:_U_JITTER + 9]
        order = tuple(sorted(range(4), key=keys.__getitem__))  # argsort of uniforms: a uniform permutation
    sigma = None
    if u[_U_BLUR] < blur_p:
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[_U_BLUR + 1]
    return ViewParams(crop=crop, flip=u[_U_FLIP] < 0.5, jitter=jitter, order=order,
                      gray=u[_U_GRAY] < GRAYSCALE_P, blur_sigma=sigma,
                      solarize=u[_U_SOLARIZE] < solarize_p)


# --------------------------------------------------------------------------------------------
# Colour operations on float tensors in [0, 1], in place
#
# They reproduce torchvision's ColorJitter/Grayscale and PIL's GaussianBlur/solarize on one view
# (3, H, W) or a batch (B, 3, H, W) (per-sample factors then have shape (B, 1, 1, 1)). Values
# stay in float between operations where PIL truncates to uint8 after each (so PIL's results
# are lower by about 0.4 grey level per operation); the tests bound the difference.
# --------------------------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of (..., 3, H, W) -> (..., H, W)."""
    r, g, b = x.unbind(-3)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def adjust_brightness_(x: torch.Tensor, factor) -> torch.Tensor:
    """Scale towards black: clamp(factor·x)."""
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the mean luma of the image: clamp(factor·x + (1 − factor)·mean)."""
    # Mean luma = luma of the per-channel means (linear), which avoids a full gray image.
    means = x.mean(dim=(-2, -1), keepdim=True)  # (..., 3, 1, 1)
    weights = x.new_tensor(GRAY_WEIGHTS).view(3, 1, 1)
    mean_luma = (means * weights).sum(dim=-3, keepdim=True)  # (..., 1, 1, 1)
    return x.mul_(factor).add_(mean_luma * (1 - factor)).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the grayscale image: clamp(factor·x + (1 − factor)·luma)."""
    gray = _gray(x).unsqueeze(-3)  # (..., 1, H, W)
    return x.mul_(factor).add_(gray * (1 - factor)).clamp_(0.0, 1.0)


def adjust_hue_(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns (in [−0.5, 0.5]), keeping HSV saturation and value.

    x: (..., 3, H, W); shift: a number, or a tensor (B, 1, 1, 1) for a batch (B, 3, H, W).
    Uses the closed form of HSV -> RGB: with V = max, C = max − min and the hue h in sectors
    [0, 6), channel c gets V − C·clamp(d − 1, 0, 1), d the circular distance from h to the
    channel's own hue (R 0, G 2, B 4).
    """
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)  # (..., H, W)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # Hue numerator per case of the maximal channel, then divided by the chroma (0 stays 0).
    hue = torch.where(maxc == r, g - b,
                      torch.where(maxc == g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4)))
    hue.div_(chroma.clamp(min=1e-12))
    if isinstance(shift, torch.Tensor) and shift.dim() >= 3:
        shift = shift.reshape(shift.shape[:-3] + (1, 1))  # (B, 1, 1, 1) -> (B, 1, 1)
    hue = torch.remainder(hue.add_(shift * 6.0), 6.0)
    centres = torch.tensor([0.0, 2.0, 4.0], dtype=x.dtype).view(3, 1, 1)
    d = (hue.unsqueeze(-3) - centres).abs_()  # (..., 3, H, W) in [0, 6)
    weight = torch.minimum(d - 1.0, d.neg_().add_(5.0)).clamp_(0.0, 1.0)  # min(d − 1, 5 − d)
    torch.sub(maxc.unsqueeze(-3), weight.mul_(chroma.unsqueeze(-3)), out=x)
    return x


def to_grayscale_(x: torch.Tensor) -> torch.Tensor:
    """Replace every channel by the luma (RandomGrayscale keeps 3 channels)."""
    x.copy_(_gray(x).unsqueeze(-3).expand_as(x))
    return x


def solarize_(x: torch.Tensor, threshold: int = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (in 0..255 units), as PIL's ImageOps.solarize.

    PIL compares rounded uint8 values, hence the threshold half a level lower in float.
    """
    return torch.where(x >= (threshold - 0.5) / 255.0, 1.0 - x, x, out=x)


def gaussian_kernels(sigmas: Sequence[float], dtype=torch.float32) -> torch.Tensor:
    """(len(sigmas), 2R + 1) normalised 1-D Gaussian kernels, kernel b of radius ceil(3·σ_b) (at
    least 1), zero-padded to the largest radius R: a view is blurred the same whatever other views
    share its batch."""
    radii = torch.tensor([max(1, math.ceil(3.0 * s)) for s in sigmas], dtype=torch.float64).unsqueeze(1)
    radius = int(radii.max())
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    sig = torch.tensor(sigmas, dtype=torch.float64).unsqueeze(1)
    kernels = torch.exp(-0.5 * (t / sig) ** 2) * (t.abs() <= radii)  # (B, 2R + 1)
    return (kernels / kernels.sum(dim=1, keepdim=True)).to(dtype)


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a batch (B, 3, H, W) with one sigma per sample.

    Borders repeat the edge pixel, as PIL's blur does. Returns a new (B, 3, H, W) tensor.
    """
    batch, channels, height, width = x.shape
    kernels = gaussian_kernels(sigmas, x.dtype).repeat_interleave(channels, dim=0)  # (B·3, K)
    radius = kernels.shape[1] // 2
    weight = kernels.view(batch * channels, 1, 1, -1)

    def horizontal_pass(planes):  # (1, B·3, h, w) -> same
        padded = F.pad(planes, (radius, radius, 0, 0), mode="replicate")
        # Depthwise convolutions run several times faster on channels-last inputs on CPU.
        return F.conv2d(padded.contiguous(memory_format=torch.channels_last), weight,
                        groups=batch * channels)

    # The vertical pass is a horizontal pass on the transposed planes (also the faster one).
    out = horizontal_pass(x.reshape(1, batch * channels, height, width))
    out = horizontal_pass(out.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(batch, channels, height, width)


_COLOUR_OPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)


def _apply_(x: torch.Tensor, views: List[int], op, *args) -> None:
    """``op(views of x, *args)`` written back into x: in place on x itself when every view takes
    part, else on the gathered views."""
    if len(views) == len(x):
        op(x, *args)
    elif views:
        x[views] = op(x[views], *args)


def _jitter_(x: torch.Tensor, params: Sequence[ViewParams]) -> None:
    """ColorJitter of a batch (B, 3, H, W) in place, each view in its own sampled order.

    Step t applies every view's t-th operation: for each of the four operations, all the views
    doing it at step t together, each with its own factor.
    """
    jittered = [b for b, p in enumerate(params) if p.jitter is not None]
    for step in range(4):
        for op, fn in enumerate(_COLOUR_OPS):
            views = [b for b in jittered if params[b].order[step] == op]
            if views:
                factors = torch.tensor([params[b].jitter[op] for b in views], dtype=x.dtype)
                _apply_(x, views, fn, factors.view(-1, 1, 1, 1))


def distort_colours_(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """Colour distortion of a batch of same-size views (B, 3, H, W) in [0, 1], in the reference's
    order: jitter, grayscale, blur, solarize; each operation runs once on all the views that take
    it. Returns the distorted batch (possibly a new tensor).
    """
    _jitter_(x, params)
    _apply_(x, [b for b, p in enumerate(params) if p.gray], to_grayscale_)
    blurred = [b for b, p in enumerate(params) if p.blur_sigma is not None]
    if len(blurred) == len(params):
        x = gaussian_blur(x, [p.blur_sigma for p in params])
    elif blurred:
        x[blurred] = gaussian_blur(x[blurred], [params[b].blur_sigma for b in blurred])
    _apply_(x, [b for b, p in enumerate(params) if p.solarize], solarize_)
    return x


def _check_crop_args(size_crops, num_crops, min_scale_crops, max_scale_crops, grid_sizes):
    """Validate the multi-crop configuration; errors name the command-line flags."""
    n = len(size_crops)
    for flag, values in (("--num-crops", num_crops), ("--min_scale_crops", min_scale_crops),
                         ("--max_scale_crops", max_scale_crops)):
        if len(values) != n:
            raise ValueError(f"{flag} has {len(values)} values but --size-crops has {n}: "
                             f"give one value per crop size")
    if n == 0:
        raise ValueError("--size-crops: at least one crop size is needed")
    if any(int(s) < 1 for s in size_crops):
        raise ValueError(f"--size-crops must be positive, got {list(size_crops)}")
    if any(int(c) < 1 for c in num_crops):
        raise ValueError(f"--num-crops must be positive, got {list(num_crops)}")
    for flag, values in (("--min_scale_crops", min_scale_crops), ("--max_scale_crops", max_scale_crops)):
        if any(not 0.0 < float(v) <= 1.0 for v in values):
            raise ValueError(f"{flag} must lie in (0, 1], got {list(values)}")
    for lo, hi in zip(min_scale_crops, max_scale_crops):
        if lo > hi:
            raise ValueError(f"--min_scale_crops {list(min_scale_crops)} exceeds "
                             f"--max_scale_crops {list(max_scale_crops)}")
    if grid_sizes is not None:
        if len(grid_sizes) != n:
            raise ValueError(f"grid_sizes has {len(grid_sizes)} values but --size-crops has {n}")
        if any(int(g) < 1 for g in grid_sizes):
            raise ValueError(f"grid sizes must be >= 1, got {list(grid_sizes)}")


class _MultiCropConfig:
    """The crop groups shared by the fast and the reference multi-crop transforms.

    Group g has ``num_crops[g]`` views of side ``size_crops[g]`` with area scale in
    (min_scale_crops[g], max_scale_crops[g]) and an N×N location grid, N = grid_sizes[g].
    ``no_flip_grid=True`` (the default, the reference's ``--no-flip-grid 1``) keeps the grid of a
    flipped crop unflipped: that is what the published models were trained with, even though the
    grid then describes the crop mirrored. ``no_flip_grid=False`` mirrors the grid with the crop.
    """

    def __init__(self, size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), no_flip_grid=True, grid_sizes=None,
                 ratio=(3 / 4, 4 / 3)):
        _check_crop_args(size_crops, num_crops, min_scale_crops, max_scale_crops, grid_sizes)
        self.size_crops = [int(s) for s in size_crops]
        self.num_crops = [int(n) for n in num_crops]
        self.scales = [(float(lo), float(hi)) for lo, hi in zip(min_scale_crops, max_scale_crops)]
        self.grid_sizes = ([int(g) for g in grid_sizes] if grid_sizes is not None
                           else [default_grid_size(s) for s in self.size_crops])
        self.no_flip_grid = bool(no_flip_grid)
        self.ratio = tuple(ratio)
        # One entry per view: (group, index inside the group).
        self.view_groups = [(g, k) for g, n in enumerate(self.num_crops) for k in range(n)]

    @property
    def num_views(self) -> int:
        return len(self.view_groups)

    def locations(self, crops: Sequence[Crop], flips: Sequence[bool]) -> List[torch.Tensor]:
        """The V location grids (N_g, N_g, 2) float32 of the views' crops and flips."""
        grids, start = [], 0
        for n, side in zip(self.num_crops, self.grid_sizes):  # one computation per group
            group = torch.tensor([[float(v) for v in c[:4]] for c in crops[start:start + n]], dtype=torch.float64)
            mirrored = None if self.no_flip_grid else torch.tensor([bool(f) for f in flips[start:start + n]])
            grids.extend(location_grids(group, side, mirrored).unbind(0))
            start += n
        return grids

    def __repr__(self):
        return (f"{type(self).__name__}(size_crops={self.size_crops}, num_crops={self.num_crops}, "
                f"scales={self.scales}, grid_sizes={self.grid_sizes}, no_flip_grid={self.no_flip_grid})")


@contextlib.contextmanager
def _one_thread():
    """Run torch ops single-threaded inside (then restore the setting).

    Per-image tensors are small: splitting them over threads only adds synchronisation, which
    becomes very costly (milliseconds per op) when the other cores are busy. DataLoader workers
    already run with one thread; this also covers loading in the main process.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


class MultiCropTrainDataTransform(_MultiCropConfig):
    """Training views of one image: ``(views, locations)``.

    Called on a PIL image, returns V = sum(num_crops) float32 views (3, s_g, s_g), normalised with
    mean ``IMAGENET_MEAN`` and std ``PRETRAIN_STD``, and their V location grids (N_g, N_g, 2)
    float32 (see ``location_grid``). Views come group by group: ``num_crops[0]`` crops of side
    ``size_crops[0]``, then the next group. ``grid_sizes`` gives N per group (default: the map
    side of a stride-32 backbone, ``size // 32``: 224 → 7, 96 → 3).

    Same distribution of views as the original's pipeline (``bench/reference_transforms.py``), computed faster:
    - all random numbers of all views come from one ``torch.rand`` call;
    - a lazily opened JPEG (``Image.open`` without ``convert``) is decoded at 1/2, 1/4 or 1/8
      scale by libjpeg when every crop is downscaled at least that much anyway (``draft``);
    - crops are resized on uint8 channels-last tensors (same antialiased bicubic as PIL's);
    - the colour distortion runs in place on one float tensor per crop size; with
      ``batch_colours=True`` it is left to ``collate_views`` (the views come back as
      ``DeferredColours``), which runs it once on the views of the whole batch: the same views,
      without the per-view cost of the many small colour operations (pretraining uses this).

    ``blur_p`` (even, odd): the probability of the Gaussian blur for crops with an even and an odd
    index inside their group (default: the reference's 1.0 and 0.1).
    """

    # Datasets may hand over lazily opened images, which lets JPEG decoding be scaled down.
    accepts_lazy_images = True

    def __init__(self, size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), no_flip_grid=True, grid_sizes=None,
                 ratio=(3 / 4, 4 / 3), draft=True, generator: Optional[torch.Generator] = None,
                 batch_colours: bool = False, blur_p: Optional[Sequence[float]] = None):
        super().__init__(size_crops, num_crops, min_scale_crops, max_scale_crops, no_flip_grid,
                         grid_sizes, ratio)
        self.blur_p = (blur_probability(0), blur_probability(1)) if blur_p is None else tuple(blur_p)
        if len(self.blur_p) != 2 or not all(0.0 <= p <= 1.0 for p in self.blur_p):
            raise ValueError(f"blur probabilities must be two numbers in [0, 1] (even and odd crops), "
                             f"got {list(blur_p)}")
        self.draft = draft
        self.generator = generator
        self.batch_colours = bool(batch_colours)

    def sample_params(self, height: int, width: int) -> List[ViewParams]:
        """Every random choice of the V views of an image of that size."""
        u = torch.rand(self.num_views, _U_PER_VIEW, dtype=torch.float64,
                       generator=self.generator).tolist()
        return [view_params_from_uniforms(height, width, self.scales[g], self.ratio,
                                          self.blur_p[k % 2], solarize_probability(k), uv)
                for (g, k), uv in zip(self.view_groups, u)]

    def __call__(self, img: Image.Image):
        width, height = img.size  # known from the header, before decoding
        params = self.sample_params(height, width)
        with _one_thread():
            if self.batch_colours:
                crops = [c for group in self.crop(img, params) for c in group.unbind(0)]
                views = DeferredColours(crops, params)
            else:
                views = self.render(img, params)
        return views, self.locations([p.crop for p in params], [p.flip for p in params])

    def crop(self, img: Image.Image, params: Sequence[ViewParams]) -> List[torch.Tensor]:
        """The views before their colour distortion: one (n_g, 3, s_g, s_g) uint8 tensor per crop
        group, cropped, resized and flipped."""
        img, scale = self._decode(img, params)
        source = None
        if scale == 1:
            # (1, 3, H, W) uint8 with channels-last strides: no copy, and the layout that
            # torch's fast uint8 antialiased resize wants.
            source = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
        groups, start = [], 0
        for size, count in zip(self.size_crops, self.num_crops):
            group = params[start:start + count]
            start += count
            if source is not None:
                crops = [_resize_tensor_crop(source, p.crop, size) for p in group]
            else:
                crops = [_resize_pil_crop(img, p.crop, size, scale) for p in group]
            x = torch.cat(crops)  # (n, 3, s, s) uint8
            for b, p in enumerate(group):
                if p.flip:
                    x[b] = x[b].flip(-1)
            groups.append(x)
        return groups

    def render(self, img: Image.Image, params: Sequence[ViewParams]) -> List[torch.Tensor]:
        """The V normalised views (3, s, s) float32 of ``img`` for given parameters."""
        views, start = [], 0
        for x in self.crop(img, params):
            views.extend(colour_views(x, params[start:start + len(x)]).unbind(0))
            start += len(x)
        return views

    def batch(self, images: torch.Tensor, params: Sequence[Sequence[ViewParams]], labels) -> "BatchOfViews":
        """The views of B images (B, 3, H, W) uint8 at once, image b with the V views' parameters
        ``params[b]`` (from ``sample_params``): the crops, flips and location grids that ``__call__``
        makes (the crops up to the rounding of the resize), their colour distortion left to
        ``collate_views``, which returns the same batch as for B single images."""
        views, locations = [], []
        for v, (g, _) in enumerate(self.view_groups):
            crops = torch.tensor([p[v].crop[:4] for p in params])
            flips = torch.tensor([p[v].flip for p in params])
            views.append(crop_batch(images, crops, flips, self.size_crops[g]))
            locations.append(location_grids(crops, self.grid_sizes[g], None if self.no_flip_grid else flips))
        per_view = [[p[v] for p in params] for v in range(self.num_views)]
        return BatchOfViews(views, per_view, locations, torch.as_tensor(labels, dtype=torch.int64))

    def _decode(self, img: Image.Image, params: Sequence[ViewParams]) -> Tuple[Image.Image, int]:
        """Decode to RGB; returns (image, scale) where scale is the JPEG draft reduction (1, 2,
        4 or 8): the decoded image is the original shrunk by ``scale``."""
        scale = 1
        lazy_jpeg = getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None)
        if self.draft and lazy_jpeg:
            # Largest reduction that still leaves every crop at least its output size.
            room = min(min(p.crop[2], p.crop[3]) / self.size_crops[g]
                       for (g, _), p in zip(self.view_groups, params))
            factor = next((f for f in (8, 4, 2) if room >= f), 1)
            if factor > 1:
                width, height = img.size
                result = img.draft("RGB", (width // factor, height // factor))
                if result is not None:
                    scale = round(width / result[1][2])
        return _to_rgb(img), scale


def _resize_tensor_crop(source: torch.Tensor, crop: Crop, size: int) -> torch.Tensor:
    """Bicubic antialiased resize of crop (i, j, h, w, ·, ·) of (1, 3, H, W) uint8 -> (1, 3, s, s)."""
    i, j, h, w = crop[:4]
    return F.interpolate(source[:, :, i:i + h, j:j + w], size=(size, size), mode="bicubic",
                         antialias=True)


def _resize_pil_crop(img: Image.Image, crop: Crop, size: int, scale: int) -> torch.Tensor:
    """The same resize from an image decoded at 1/scale: the crop box is fractional there."""
    i, j, h, w = crop[:4]
    box = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
    out = img.resize((size, size), Image.BICUBIC, box=box)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).unsqueeze(0)


_PRETRAIN_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_PRETRAIN_STD = torch.tensor(PRETRAIN_STD).view(1, 3, 1, 1)


def colour_views(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """Views (B, 3, s, s) uint8, each with its parameters, colour-distorted and normalised (mean
    ``IMAGENET_MEAN``, std ``PRETRAIN_STD``): a new contiguous (B, 3, s, s) float32 tensor."""
    x = distort_colours_(x.float().div_(255.0), params)
    # Written into a contiguous tensor: the blur may leave x with transposed strides.
    out = torch.empty(x.shape, dtype=x.dtype)
    return torch.sub(x, _PRETRAIN_MEAN, out=out).div_(_PRETRAIN_STD)


# collate_views distorts at most this many values at once (1 MiB of float32): enough views to amortise
# the fixed cost of each small operation on small crops (85 views of 32 px, 21 of 64 px), few enough
# that large ones stay in the CPU's caches (one view of 224 px, no slower than image by image).
COLOUR_CHUNK = 1 << 18


class DeferredColours:
    """The views of one image before their colour distortion (``batch_colours=True``): V uint8
    crops (3, s, s) and their parameters. ``collate_views`` finishes them a whole batch at a
    time, which saves most of the per-view cost of the many small colour operations."""

    __slots__ = ("crops", "params")

    def __init__(self, crops: List[torch.Tensor], params: List[ViewParams]):
        self.crops, self.params = crops, params


def collate_views(samples):
    """DataLoader collate for samples ``((views, locations), label)``: as the default collate, and
    views left as ``DeferredColours`` are colour-distorted and normalised here, all views of the
    batch with the same side at once. The result is what the per-image transform would have given
    (the same operations with the same parameters), as a list of V tensors (B, 3, s, s)."""
    if isinstance(samples, BatchOfViews):  # made a batch at a time (MultiCropTrainDataTransform.batch)
        views = _colour_by_side(lambda v: samples.views[v], lambda v: samples.params[v], len(samples.views),
                                one_thread=False)
        return (views, samples.locations), samples.labels
    first = samples[0][0][0]
    if not isinstance(first, DeferredColours):
        return torch.utils.data.default_collate(samples)
    views = _colour_by_side(lambda v: torch.stack([s[0][0].crops[v] for s in samples]),
                            lambda v: [s[0][0].params[v] for s in samples], len(first.crops))
    locations = torch.utils.data.default_collate([s[0][1] for s in samples])
    labels = torch.utils.data.default_collate([s[1] for s in samples])
    return (views, locations), labels


def _colour_by_side(crops, params, num_views: int, one_thread: bool = True) -> List[torch.Tensor]:
    """The V colour-distorted, normalised views (B, 3, s, s) from ``crops(v)`` (B, 3, s, s) and
    ``params(v)`` (B parameters), all views of one side distorted together, in chunks."""
    views: List[Optional[torch.Tensor]] = [None] * num_views
    with _one_thread() if one_thread else contextlib.nullcontext():
        by_side = {}
        for v in range(num_views):
            x = crops(v)
            by_side.setdefault(x.shape[-1], []).append((v, x))
        for side, group in by_side.items():  # view-major: view v of every sample, then view v + 1
            x = torch.cat([x for _, x in group])
            p = [q for v, _ in group for q in params(v)]
            chunk = max(1, COLOUR_CHUNK // (3 * side * side))
            out = torch.cat([colour_views(x[i:i + chunk], p[i:i + chunk]) for i in range(0, len(x), chunk)])
            batch = len(out) // len(group)
            for k, (v, _) in enumerate(group):
                views[v] = out[k * batch:(k + 1) * batch]
    return views


# --------------------------------------------------------------------------------------------
# Whole batches at once, for images held in memory (all of one size)
# --------------------------------------------------------------------------------------------

def _cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    t = t.abs().clamp_(max=2.0)  # the kernel is 0 from 2 on, as the far piece is at 2
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0).mul_(-0.5)
    return torch.where(t < 1.0, near, far)


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """Matrices (K, out, size) that resize the segments [start, start + length) of an axis of ``size``
    pixels to ``out`` pixels, as an antialiased bicubic resize of the cropped segment does: output o is
    centred at start + (o + 0.5)·length/out, the kernel is widened by length/out when that exceeds 1
    (shrinking), only pixels of the segment contribute, and each row sums to 1."""
    starts, lengths = starts.float().view(-1, 1, 1), lengths.float().view(-1, 1, 1)
    scale = lengths / out
    support = scale.clamp(min=1.0)
    centres = starts + (torch.arange(out, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale
    pixels = torch.arange(size, dtype=torch.float32).view(1, 1, -1)
    w = _cubic((pixels + 0.5 - centres) / support)
    w.mul_((pixels >= starts) & (pixels < starts + lengths))
    return w.div_(w.sum(-1, keepdim=True))


def crop_batch(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Views (K, 3, size, size) float32 of integer values in [0, 255]: crop k = (i, j, h, w) of image k of
    ``images`` (K, 3, H, W) uint8, resized like ``_resize_tensor_crop`` (antialiased bicubic, rounded),
    mirrored where ``flips``. Two batched matrix products instead of one resize call per crop."""
    _, _, height, width = images.shape
    rows = resize_weights(crops[:, 0], crops[:, 2], height, size)  # (K, size, H)
    cols = resize_weights(crops[:, 1], crops[:, 3], width, size)  # (K, size, W)
    cols = torch.where(flips.view(-1, 1, 1), cols.flip(1), cols)
    x = torch.matmul(rows.unsqueeze(1), images.float())  # (K, 3, size, W)
    x = torch.matmul(x, cols.transpose(1, 2).unsqueeze(1))  # (K, 3, size, size)
    return x.round_().clamp_(0.0, 255.0)


class BatchOfViews:
    """The views of a whole batch before their colour distortion, made by
    ``MultiCropTrainDataTransform.batch``; ``collate_views`` finishes them."""

    __slots__ = ("views", "params", "locations", "labels")

    def __init__(self, views, params, locations, labels):
        self.views, self.params, self.locations, self.labels = views, params, locations, labels


class MultiCropValDataTransform:
    """Validation sample of one image: ``(val_view, (views, locations))``.

    val_view (3, size, size) float32: shorter side resized to int(size·256/224) (bicubic), centre
    crop of side size = size_crops[0], normalised like the training views (std 0.228). The
    multi-crop part is ``MultiCropTrainDataTransform`` with the same arguments, so the validation
    loss sees the same kind of views as training.
    """

    accepts_lazy_images = True

    def __init__(self, size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), no_flip_grid=True, grid_sizes=None, **kwargs):
        self.train_transform = MultiCropTrainDataTransform(
            size_crops, num_crops, min_scale_crops, max_scale_crops, no_flip_grid, grid_sizes,
            **kwargs)
        size = self.train_transform.size_crops[0]
        self.val_transform = T.Compose([
            T.Resize(int(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, PRETRAIN_STD),
        ])

    def __call__(self, img: Image.Image):
        img = _to_rgb(img)
        return self.val_transform(img), self.train_transform(img)


# --------------------------------------------------------------------------------------------
# Evaluation transforms (linear probe, k-NN): the ImageNet evaluation protocol
# --------------------------------------------------------------------------------------------

def linear_train_transform(crop: int = 224, min_scale: float = 0.08) -> T.Compose:
    """Linear-probe training: random-resized crop (area fraction in [min_scale, 1]), flip, normalised
    with the evaluation std 0.229."""
    return T.Compose([T.RandomResizedCrop(crop, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, EVAL_STD)])


def eval_transform(crop: int = 224, resize: int = 256) -> T.Compose:
    """Validation and k-NN features: resize the shorter side, centre crop, evaluation std 0.229."""
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, EVAL_STD)])
