"""The built-in procedural dataset: textured scenes with labels and segmentation masks, made on the fly.

``render_scene`` draws one scene (``--builtin-layout``: one large object, or a mosaic of several);
``BuiltinDataset`` (classification, and ``sample`` with the mask) and ``BuiltinSegmentation`` (image
and mask) render sample ``index`` of a split from the seed sequence (seed, split, index), so that
nothing is downloaded or stored and every process and worker sees the same images.
``add_builtin_arguments`` defines the ``--builtin-*`` flags, with one set of defaults, for
main_vicregl.py, evaluate.py and segmentation/train.py: the same flags draw the same images in every
script. ``synthetic_photo`` makes a photograph-like test picture (tests, benchmarks).
"""
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def add_builtin_arguments(group) -> None:
    """The ``--builtin-*`` flags of ``--dataset builtin`` on ``group`` (a parser or an argument group)."""
    group.add_argument("--builtin-images", type=int, default=4096,
                       help="training images of --dataset builtin (rendered on demand: nothing is stored)")
    group.add_argument("--builtin-val-images", type=int, default=2000,
                       help="validation images of --dataset builtin, drawn apart from the training images "
                            "(main_vicregl.py: for --evaluate and --knn)")
    group.add_argument("--builtin-size", type=int, default=64, help="image side of --dataset builtin")
    group.add_argument("--builtin-classes", type=int, default=10,
                       help=f"classes of --dataset builtin, one texture each (2 to {len(TEXTURES)}; segmentation "
                            f"adds the background): pretraining, evaluation and segmentation must agree")
    group.add_argument("--builtin-max-objects", type=int, default=4,
                       help="objects per image of --dataset builtin (1: single-object, easier scenes)")
    group.add_argument("--builtin-layout", default="single", choices=LAYOUTS,
                       help="scenes of --dataset builtin: single (one large centred object that sets the class of "
                            "most pixels, plus small distractors: the default) or mosaic (4 mid-sized objects of "
                            "distinct classes anywhere, none dominant: local structure for dense features, see "
                            "docs/dense.md; --builtin-max-objects does not apply)")
    group.add_argument("--builtin-seed", type=int, default=0,
                       help="which images --dataset builtin draws, independent of --seed (the data stay the same "
                            "when only the training seed changes): the same value in every script gives the "
                            "same images")


# Class c is a texture, TEXTURES[c]; the outline (SHAPES) is drawn at random and carries no class.
SHAPES = ("disk", "square", "triangle", "star", "ring")
TEXTURES = ("stripes", "checker", "dots", "grid", "waves", "rings", "hexagons", "zigzag", "lines", "blobs")
_SPLIT_STREAMS = {"train": 0, "val": 1}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of circumradius 1 in its own rotated coordinates (u, v)."""
    if shape == "disk":
        return u * u + v * v < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.75
    if shape == "triangle":  # equilateral, inscribed in the unit circle
        return (v < 0.5) & (0.866 * u - 0.5 * v < 0.5) & (-0.866 * u - 0.5 * v < 0.5)
    r = np.sqrt(u * u + v * v)
    if shape == "star":  # five rounded points
        return r < 0.6 + 0.4 * np.cos(5.0 * np.arctan2(v, u))
    if shape == "ring":
        return (r < 1.0) & (r > 0.55)
    raise ValueError(f"unknown shape {shape}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean pattern selecting the object's second colour. (x, y) are the object's rotated
    coordinates in radians of the pattern's period, so every texture repeats at the same scale."""
    if texture == "stripes":
        return np.sin(x) > 0
    if texture == "checker":
        return np.sin(x) * np.sin(y) > 0
    if texture == "dots":
        return np.cos(x) + np.cos(y) > 1.0
    if texture == "grid":  # thin lines both ways
        return np.maximum(np.cos(x), np.cos(y)) > 0.8
    if texture == "waves":
        return np.sin(x + 1.5 * np.sin(0.5 * y)) > 0
    if texture == "rings":  # concentric around a point near the object's centre
        cx, cy = rng.uniform(-4.0, 4.0, 2)
        return np.sin(np.sqrt((x - cx) ** 2 + (y - cy) ** 2)) > 0
    if texture == "hexagons":  # dots on a triangular lattice
        return np.cos(x) + np.cos(-0.5 * x + 0.866 * y) + np.cos(-0.5 * x - 0.866 * y) > 1.2
    if texture == "zigzag":
        return np.sin(x + 5.0 * np.abs((y / (2 * np.pi)) % 1.0 - 0.5)) > 0
    if texture == "lines":  # thin parallel lines
        return np.cos(x) > 0.75
    if texture == "blobs":  # irregular spots: a smooth random field, thresholded
        k = rng.normal(size=(3, 2)) * 0.6
        field = sum(np.cos(k[i, 0] * x + k[i, 1] * y + rng.uniform(0, 2 * np.pi)) for i in range(3))
        field = field + np.cos(0.7 * x + rng.uniform(0, 2 * np.pi)) * np.cos(0.7 * y + rng.uniform(0, 2 * np.pi))
        return field > 0
    raise ValueError(f"unknown texture {texture}")


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """(3,) float32 RGB in [0, 255] of a colour with ``hue`` on the 0-6 circle (closed-form HSV)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6.0
    return (255.0 * value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))).astype(np.float32)


# Colours and their nuisances. Every scene uses one hue family (object: a dark and a light shade of
# a cyan-blue-green hue; background: its complementary hue), drawn within the range of the colour
# augmentation (ColorJitter's hue 0.1 of the circle, brightness, contrast and saturation 0.4), so
# that colour neither tells the classes apart nor identifies an image for self-supervised learning:
# what two crops of one scene share, beyond what the augmentations change, is the texture (and its
# orientation). Features of a randomly initialised network mostly see colour and brightness, so its
# k-NN accuracy stays near chance.
BASE_HUE, HUE_SPREAD = 3.0, 0.6
JITTER = (0.6, 1.4)  # brightness, contrast and saturation factors, drawn per scene
PERIODS = (3.5, 5.5)  # texture periods across the image side, drawn per object


def _background(rng: np.random.Generator, size: int, hue: float) -> np.ndarray:
    """(size, size, 3) float32: the complementary hue with a gentle brightness ramp at a random angle."""
    ramp = np.linspace(-0.15, 0.15, size, dtype=np.float32)
    angle = rng.random() * 2 * np.pi
    t = ramp[None, :] * np.cos(angle) + ramp[:, None] * np.sin(angle)
    return _hsv(hue + 3.0, 0.5, 0.7) * (1 + t[..., None])


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation of the whole scene scaled by factors drawn in JITTER."""
    brightness, contrast, saturation = rng.uniform(*JITTER, 3)
    image = image * brightness
    image = (image - image.mean()) * contrast + image.mean()
    grey = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (image - grey[..., None]) * saturation + grey[..., None]


# Circumradius multipliers that give the shapes similar areas (a triangle covers less of its
# circle than a disk).
_SHAPE_SCALE = {"disk": 1.0, "square": 1.15, "triangle": 1.4, "star": 1.35, "ring": 1.15}


def _paint_object(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, c: int, radius: float,
                  centre: Tuple[float, float], colours: Tuple[np.ndarray, np.ndarray]) -> None:
    """Paint one object of class c (texture TEXTURES[c] in the two ``colours``, in random order; random
    outline, rotation, period and phase; centre drawn in ``centre`` = (low, high) fractions of the
    side) over image and mask."""
    size = image.shape[0]
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    radius *= _SHAPE_SCALE[shape]
    cy, cx = rng.uniform(centre[0] * size, centre[1] * size, 2)
    y0, y1 = max(0, int(cy - radius)), min(size, int(np.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(cx - radius)), min(size, int(np.ceil(cx + radius)) + 1)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    angle = rng.random() * 2 * np.pi
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = xx * cos + yy * sin, yy * cos - xx * sin  # (h, w) pixels in the object's frame
    inside = _shape_mask(shape, u / radius, v / radius)
    scale = 2 * np.pi * rng.uniform(*PERIODS) / size  # radians per pixel
    phase = rng.uniform(0, 2 * np.pi, 2)
    pattern = _texture(TEXTURES[c], u * scale + phase[0], v * scale + phase[1], rng)
    first, second = colours if rng.random() < 0.5 else colours[::-1]
    paint = np.where(pattern[..., None], second, first)  # (h, w, 3)
    image[y0:y1, x0:x1][inside] = paint[inside]
    mask[y0:y1, x0:x1][inside] = c + 1


def _canvas(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """A scene before its objects: background image (size, size, 3) float32, empty mask (size, size)
    uint8 and the two object colours (a dark and a light shade of the scene's hue)."""
    hue = BASE_HUE + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    image = _background(rng, size, hue)
    colours = (_hsv(hue, 0.7, 0.35), _hsv(hue, 0.7, 0.95))
    return image, np.zeros((size, size), dtype=np.uint8), colours


def _finish(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
            num_classes: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Jitter and noise on the painted scene; the label is the class covering the most visible pixels."""
    image = _jitter(image, rng)
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor-like noise
    counts = np.bincount(mask.ravel(), minlength=num_classes + 1)[1:]
    label = int(counts.argmax())
    return np.clip(image, 0, 255).astype(np.uint8), mask, label


# Mosaic scenes (--builtin-layout mosaic): a few mid-sized objects of distinct classes anywhere, drawn
# alike, so that no object sets the class of most pixels and crops of one scene often show different
# classes. Radii and centres are fractions of the side, as for the single layout's objects; the
# values were chosen with bench/scene_stats.py (docs/dense.md): 3-4 objects or radii up to 0.35 also
# meet its targets, with less margin.
MOSAIC_OBJECTS = (4, 4)  # objects per scene, both ends included (capped at the number of classes)
MOSAIC_RADIUS = (0.25, 0.30)
MOSAIC_CENTRE = (0.2, 0.8)
LAYOUTS = ("single", "mosaic")


def render_scene(rng: np.random.Generator, size: int, num_classes: int,
                 max_objects: int = 4, layout: str = "single") -> Tuple[np.ndarray, np.ndarray, int]:
    """One procedural scene.

    Class c is a texture, TEXTURES[c] (stripes, checker, dots, ...), painted in a dark and a light
    shade of one hue. Everything else is a nuisance drawn at random: the outline (SHAPES), size,
    position, rotation, period and phase of the texture, the hue (within the colour augmentation's
    range) and the brightness, contrast and saturation of the whole scene (see JITTER).
    ``layout="single"``: a large main object of a uniformly drawn class, near the centre so that
    most crops show its texture, and up to ``max_objects - 1`` smaller distractors of any class
    anywhere are painted in random order over a plain background, so they occlude each other. The
    label is the class covering the most visible pixels (almost always the main object's).
    ``layout="mosaic"``: see ``render_mosaic`` (``max_objects`` is not used).
    Returns image (size, size, 3) uint8, mask (size, size) uint8 (0 background, c + 1 for a
    pixel of class c) and the label.
    """
    if layout == "mosaic":
        return render_mosaic(rng, size, num_classes)
    if layout != "single":
        raise ValueError(f"layout (--builtin-layout) must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    image, mask, colours = _canvas(rng, size)
    num_distractors = int(rng.integers(0, max_objects))
    classes = rng.integers(0, num_classes, 1 + num_distractors)
    radii = np.concatenate([rng.uniform(0.4, 0.5, 1), rng.uniform(0.12, 0.2, num_distractors)])
    for k in rng.permutation(1 + num_distractors):
        centre = (0.4, 0.6) if k == 0 else (0.15, 0.85)
        _paint_object(image, mask, rng, int(classes[k]), radii[k] * size, centre, colours)
    return _finish(rng, image, mask, num_classes)


def render_mosaic(rng: np.random.Generator, size: int, num_classes: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """A mosaic scene: MOSAIC_OBJECTS objects of distinct classes, radius in MOSAIC_RADIUS and centre
    in MOSAIC_CENTRE (fractions of the side) for each, painted in random order over the background
    (so they occlude each other), with the textures, outlines, colours, jitter and noise of
    ``render_scene``. The label is the class covering the most visible pixels. Same returns."""
    image, mask, colours = _canvas(rng, size)
    count = min(int(rng.integers(MOSAIC_OBJECTS[0], MOSAIC_OBJECTS[1] + 1)), num_classes)
    classes = rng.choice(num_classes, count, replace=False)  # a random order: the painting order
    for c, radius in zip(classes, rng.uniform(*MOSAIC_RADIUS, count)):
        _paint_object(image, mask, rng, int(c), radius * size, MOSAIC_CENTRE, colours)
    return _finish(rng, image, mask, num_classes)


class BuiltinDataset(Dataset):
    """Procedural classification data with segmentation masks; no download, no storage.

    Sample ``index`` of ``split`` is rendered on demand from the seed sequence (seed, split,
    index), so it is identical across runs, processes and workers; train and val draw from
    different streams and share no image. ``__getitem__`` returns ``(transform(image), label)``
    with image a PIL RGB image of side ``image_size`` and label in [0, num_classes).
    ``sample(index)`` returns (PIL image, mask (H, W) uint8, label) for segmentation:
    mask 0 is background and c + 1 marks class c. ``layout`` ("single" or "mosaic") and
    ``max_objects`` choose the kind of scene; see ``render_scene`` for the design.
    """

    def __init__(self, split: str = "train", num_images: Optional[int] = None,
                 image_size: int = 64, num_classes: int = 10, seed: int = 0,
                 transform: Optional[Callable] = None, max_objects: int = 4, layout: str = "single"):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        if not 2 <= num_classes <= len(TEXTURES):
            raise ValueError(f"num_classes (--builtin-classes) must be in [2, {len(TEXTURES)}], "
                             f"got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size (--builtin-size) must be at least 8, got {image_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout (--builtin-layout) must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.split = split
        self.num_images = num_images if num_images is not None else (10000 if split == "train" else 2000)
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_object_classes = num_classes  # what scenes are drawn from (subclasses may count more)
        self.seed = seed
        self.transform = transform
        self.max_objects = max_objects
        self.layout = layout

    def __len__(self) -> int:
        return self.num_images

    def sample(self, index: int) -> Tuple[Image.Image, np.ndarray, int]:
        """(image, mask, label) of sample ``index``: PIL RGB image, (H, W) uint8 mask, int."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        image, mask, label = render_scene(rng, self.image_size, self.num_object_classes, self.max_objects,
                                          self.layout)
        return Image.fromarray(image), mask, label

    def __getitem__(self, index: int):
        image, _, label = self.sample(index)
        return (self.transform(image) if self.transform is not None else image), label


class BuiltinSegmentation(BuiltinDataset):
    """``BuiltinDataset`` as a segmentation dataset: ``__getitem__`` returns (image, mask).

    ``num_classes`` counts the background: K object classes give K + 1 segmentation classes
    (mask values 0..K). ``transform(image, mask) -> (image, mask)`` is applied jointly; without
    one, image is a normalised (3, H, W) float32 tensor (evaluation statistics) and mask an
    (H, W) int64 tensor.
    """

    ignore_index = 255  # never produced here; the segmentation loss's convention

    def __init__(self, split: str = "train", num_images: Optional[int] = None,
                 image_size: int = 64, num_classes: int = 10, seed: int = 0,
                 transform: Optional[Callable] = None, max_objects: int = 4, layout: str = "single"):
        super().__init__(split, num_images, image_size, num_classes, seed, None, max_objects, layout)
        self.num_classes = num_classes + 1  # with the background; scenes keep num_object_classes
        self.joint_transform = transform

    def __getitem__(self, index: int):
        image, mask, _ = self.sample(index)
        if self.joint_transform is not None:
            return self.joint_transform(image, mask)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
        return (x - mean) / std, torch.from_numpy(mask).long()


def synthetic_photo(width: int = 500, height: int = 375, seed: int = 0) -> Image.Image:
    """A photograph-like RGB test picture (no download): sky over textured ground.

    Natural images have a roughly 1/f amplitude spectrum and correlated colour channels; this
    one has both, so that JPEG size, decoding time and colour statistics resemble a photo's.
    Used by the transform tests and ``bench/transforms.py``.
    """
    rng = np.random.default_rng(seed)
    freqs = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    freqs[0, 0] = 1.0
    shape = (height, width // 2 + 1)
    shared = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    channels = []
    for _ in range(3):
        own = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        plane = np.fft.irfft2((0.8 * shared + 0.2 * own) / freqs ** 1.1, s=(height, width))
        channels.append(plane / plane.std())
    texture = np.stack(channels, axis=-1)  # (H, W, 3)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    horizon = 0.45 + 0.05 * np.sin(np.linspace(0, 3 * np.pi, width))[None, :, None]
    sky, ground = np.array([0.45, 0.6, 0.85]), np.array([0.35, 0.4, 0.2])
    image = np.where(rows < horizon, sky - 0.2 * rows, ground + 0.1 * rows) + 0.12 * texture
    return Image.fromarray((255 * np.clip(image, 0, 1)).astype(np.uint8))
