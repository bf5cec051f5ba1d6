"""Datasets and loaders.

``build_dataset(name, data_dir, split, transform, from_numpy=False, ...)`` picks one of:

* ``"imagenet1k"`` (alias ``"imagefolder"``): ImageNet layout ``<data_dir>/<split>/<class>/<image>``;
  classes are the sorted sub-folder names. With ``from_numpy=True`` (``--dataset_from_numpy``)
  the samples come instead from ``<data_dir>/<split>_images.npy`` (image paths, absolute or
  relative to data_dir) and ``<data_dir>/<split>_labels.npy`` (integer labels).
* ``"folder"``: every image under ``<data_dir>/<split>`` (or ``<data_dir>`` itself when it has no
  such sub-folder), recursively, without labels: label -1 and ``num_classes == 0``.
* ``"builtin"``: ``BuiltinDataset``, procedural images with labels and segmentation masks, made
  on the fly from (seed, split, index); nothing to download or store. ``data_dir`` is ignored.
* ``"cifar10"``, ``"cifar100"`` (fine labels), ``"stl10"``: the files torchvision downloads,
  under ``<data_dir>/cifar-10-batches-py``, ``cifar-100-python`` or ``stl10_binary``; "train" is
  the training set, "val" the test set; ``with_unlabeled`` adds STL-10's unlabelled images to its
  training set (for pretraining). ``download=True`` fetches missing files.

Every dataset returns ``(transform(image), label)`` and exposes ``num_classes``. Unreadable
image files are skipped (the next readable sample takes their place), each reported on one line
of stderr and counted over every loader worker (``skipped_images``); so are names that are not
regular files (a FIFO would block) and images of more pixels than --max-image-pixels
(``set_max_image_pixels``). A missing or empty data folder raises at construction. CIFAR's
pickles are read by ``ArrayUnpickler``: plain numeric arrays, lists, dicts, strings and numbers only.

``build_loader`` wraps a dataset in a DataLoader with a DistributedSampler, splitting the
global batch over the processes.
"""
import io
import itertools
import multiprocessing
import os
import pickle
import pickletools
import random
import re
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import utils

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# PIL raises these for truncated, corrupt or non-image files (ImageTooLarge is an OSError).
_UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Images of more pixels are skipped (--max-image-pixels): a file of a few kilobytes can claim a size
# that takes gigabytes to decode. 8000x5000, far above ImageNet's largest images.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLarge(OSError):
    """An image of more pixels than ``Image.MAX_IMAGE_PIXELS`` (--max-image-pixels)."""


def add_max_image_pixels_argument(group) -> None:
    """--max-image-pixels, for the scripts that read image files (``set_max_image_pixels`` applies it)."""
    group.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="skip, with a warning, image files of more pixels (width x height) than this: a small "
                            "compressed file can claim a size that takes gigabytes to decode (the default is "
                            "8000x5000, far above ImageNet's largest images)")


def set_max_image_pixels(limit: int) -> None:
    """Make PIL refuse images of more than ``limit`` pixels in this process and the loader workers it
    forks (``open_image`` turns PIL's warning between the limit and twice it into the same refusal).
    A ValueError names the flag when ``limit`` is not positive."""
    if limit < 1:
        raise ValueError(f"--max-image-pixels must be positive, got {limit}")
    Image.MAX_IMAGE_PIXELS = limit


def open_regular_file(path):
    """``path`` opened for binary reading when it is a regular file (or a link to one); an OSError
    otherwise. Never blocks: opening a FIFO named like an image waits for a writer that never comes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file but {_file_kind(mode)}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def open_image(f) -> Image.Image:
    """``Image.open(f)`` (the header read, the pixels not yet decoded), or ImageTooLarge for an image of
    more pixels than PIL's limit (``set_max_image_pixels``): PIL itself only warns up to twice it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(f)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(f"{pixels.group(1) if pixels else 'too many'} pixels, more than --max-image-pixels "
                            f"{Image.MAX_IMAGE_PIXELS}") from None


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _entries(folder: str) -> List[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:  # unreadable, or gone: as os.walk, left out
        return []


def _list_images(folder: Path) -> List[Path]:
    """All image files under ``folder``, recursively, in a stable (sorted) order: a folder's files, then
    its sub-folders'. Links are followed, each folder at most once (by device and inode: a link to a
    folder above it would otherwise repeat the listing forever). A name with an image extension that is
    not a regular file (a FIFO, a device, a broken link) is skipped with one warning line: opening one
    could wait forever or read without end."""
    found, seen, todo = [], set(), [str(folder)]
    while todo:
        path = todo.pop()
        try:
            info = os.stat(path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders = []
        for entry in _entries(path):
            if entry.is_dir():  # follows links
                subfolders.append(entry.path)
            elif _is_image(entry.name):
                if entry.is_file():
                    found.append(Path(entry.path))
                else:
                    try:
                        kind = _file_kind(os.stat(entry.path).st_mode)
                    except OSError:
                        kind = "a broken link"
                    print(f"warning: skipping {entry.path}: not a regular file but {kind}", file=sys.stderr,
                          flush=True)
        todo.extend(reversed(subfolders))
    return found


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist; expected {layout}")


class ImageFileDataset(Dataset):
    """Images read from files: ``samples`` is a list of (path, label).

    ``__getitem__`` returns ``(transform(image), label)``. A transform with the attribute
    ``accepts_lazy_images = True`` receives the image as opened (not yet decoded), so that it
    can choose a reduced JPEG decoding scale; any other transform (and ``transform=None``) gets
    the decoded RGB image. A file that cannot be decoded is skipped (one line on stderr, counted in
    ``num_unreadable`` over this process and all its loader workers) and the next readable sample
    is returned instead, so an epoch never stops on a bad file.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], num_classes: int,
                 transform: Optional[Callable] = None, root: Optional[str] = None):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform
        self.root = root
        # Shared memory: loader workers are other processes, and the count must reach the main one.
        self._skipped = multiprocessing.Value("q", 0)
        self._unreadable = set()  # known bad files of this process, skipped silently from then on

    @property
    def num_unreadable(self) -> int:
        """Files skipped so far by this process and its loader workers."""
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """Transformed image of sample ``index``; raises PIL's errors for unreadable files."""
        path = self.samples[index][0]
        with open_regular_file(path) as f:
            img = open_image(f)
            if getattr(self.transform, "accepts_lazy_images", False):
                return self.transform(img)  # decodes inside, while the file is open
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._unreadable:
                continue
            try:
                return self.load(i), self.samples[i][1]
            except _UNREADABLE_ERRORS as err:
                self._skip(i, err)
        raise RuntimeError(f"none of the {len(self.samples)} image files of "
                           f"{self.root or 'this dataset'} could be read")

    def _skip(self, index: int, err: Exception) -> None:
        self._unreadable.add(index)
        with self._skipped.get_lock():
            self._skipped.value += 1
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"warning: skipping unreadable image {self.samples[index][0]} ({reason})", file=sys.stderr,
              flush=True)


def skipped_images(dataset) -> int:
    """How many unreadable files ``dataset`` (or the dataset a loader or wrapper holds) skipped so far;
    0 for datasets that do not read files."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if isinstance(dataset, ImageFileDataset):
            return dataset.num_unreadable
        dataset = next((vars(dataset)[k] for k in ("dataset", "base") if k in vars(dataset)), None)
    return 0


class ImageFolderDataset(ImageFileDataset):
    """Labelled folder layout ``<root>/<class>/<image>`` (ImageNet's train/ and val/)."""

    def __init__(self, root, transform: Optional[Callable] = None):
        root = Path(root)
        layout = f"the ImageNet layout {root}/<class>/<image>.jpg"
        _require_dir(root, layout)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"{root} has no class sub-folders; expected {layout}")
        samples = [(str(path), label) for label, name in enumerate(classes)
                   for path in _list_images(root / name)]
        if not samples:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}; "
                             f"expected {layout}")
        super().__init__(samples, len(classes), transform, str(root))
        self.classes = classes


class UnlabelledFolderDataset(ImageFileDataset):
    """Every image under ``root`` (recursively), without labels: label -1, ``num_classes == 0``."""

    def __init__(self, root, transform: Optional[Callable] = None):
        root = Path(root)
        _require_dir(root, f"a folder of images such as {root}/<image>.jpg")
        samples = [(str(path), -1) for path in _list_images(root)]
        if not samples:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        super().__init__(samples, 0, transform, str(root))


class NumpyListDataset(ImageFileDataset):
    """Samples listed in ``<data_dir>/<split>_images.npy`` (paths) and ``<split>_labels.npy``.

    Relative paths are taken relative to ``data_dir``; ``num_classes`` is the largest label + 1.
    """

    def __init__(self, data_dir, split: str, transform: Optional[Callable] = None):
        data_dir = Path(data_dir)
        images_file, labels_file = data_dir / f"{split}_images.npy", data_dir / f"{split}_labels.npy"
        layout = f"{images_file} (image paths) and {labels_file} (labels), as --dataset_from_numpy reads"
        _require_dir(data_dir, layout)
        for f in (images_file, labels_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist; expected {layout}")
        paths = np.load(images_file, allow_pickle=False)
        labels = np.load(labels_file, allow_pickle=False).astype(np.int64)
        if len(paths) == 0:
            raise ValueError(f"{images_file} lists no images")
        if len(paths) != len(labels):
            raise ValueError(f"{images_file} has {len(paths)} paths but {labels_file} has "
                             f"{len(labels)} labels")
        samples = [(str(data_dir / str(p)), int(y)) for p, y in zip(paths, labels)]
        super().__init__(samples, int(labels.max()) + 1, transform, str(data_dir))


# --------------------------------------------------------------------------------------------
# Built-in procedural dataset
# --------------------------------------------------------------------------------------------

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


def render_scene(rng: np.random.Generator, size: int, num_classes: int,
                 max_objects: int = 4) -> Tuple[np.ndarray, np.ndarray, int]:
    """One procedural scene.

    Class c is a texture, TEXTURES[c] (stripes, checker, dots, ...), painted in a dark and a light
    shade of one hue. Everything else is a nuisance drawn at random: the outline (SHAPES), size,
    position, rotation, period and phase of the texture, the hue (within the colour augmentation's
    range) and the brightness, contrast and saturation of the whole scene (see JITTER). A large
    main object of a uniformly drawn class, near the centre so that most crops show its texture, and
    up to ``max_objects - 1`` smaller distractors of any class anywhere are painted in random order
    over a plain background, so they occlude each other. The label is the class covering the most
    visible pixels (almost always the main object's).
    Returns image (size, size, 3) uint8, mask (size, size) uint8 (0 background, c + 1 for a
    pixel of class c) and the label.
    """
    hue = BASE_HUE + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    image = _background(rng, size, hue)
    colours = (_hsv(hue, 0.7, 0.35), _hsv(hue, 0.7, 0.95))
    mask = np.zeros((size, size), dtype=np.uint8)
    num_distractors = int(rng.integers(0, max_objects))
    classes = rng.integers(0, num_classes, 1 + num_distractors)
    radii = np.concatenate([rng.uniform(0.4, 0.5, 1), rng.uniform(0.12, 0.2, num_distractors)])
    for k in rng.permutation(1 + num_distractors):
        centre = (0.4, 0.6) if k == 0 else (0.15, 0.85)
        _paint_object(image, mask, rng, int(classes[k]), radii[k] * size, centre, colours)
    image = _jitter(image, rng)
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor-like noise
    counts = np.bincount(mask.ravel(), minlength=num_classes + 1)[1:]
    label = int(counts.argmax())
    return np.clip(image, 0, 255).astype(np.uint8), mask, label


class BuiltinDataset(Dataset):
    """Procedural classification data with segmentation masks; no download, no storage.

    Sample ``index`` of ``split`` is rendered on demand from the seed sequence (seed, split,
    index), so it is identical across runs, processes and workers; train and val draw from
    different streams and share no image. ``__getitem__`` returns ``(transform(image), label)``
    with image a PIL RGB image of side ``image_size`` and label in [0, num_classes).
    ``sample(index)`` returns (PIL image, mask (H, W) uint8, label) for segmentation:
    mask 0 is background and c + 1 marks class c. See ``render_scene`` for the design.
    """

    def __init__(self, split: str = "train", num_images: Optional[int] = None,
                 image_size: int = 64, num_classes: int = 10, seed: int = 0,
                 transform: Optional[Callable] = None, max_objects: int = 4):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        if not 2 <= num_classes <= len(TEXTURES):
            raise ValueError(f"num_classes (--builtin-classes) must be in [2, {len(TEXTURES)}], "
                             f"got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size (--builtin-size) must be at least 8, got {image_size}")
        self.split = split
        self.num_images = num_images if num_images is not None else (10000 if split == "train" else 2000)
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_object_classes = num_classes  # what scenes are drawn from (subclasses may count more)
        self.seed = seed
        self.transform = transform
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.num_images

    def sample(self, index: int) -> Tuple[Image.Image, np.ndarray, int]:
        """(image, mask, label) of sample ``index``: PIL RGB image, (H, W) uint8 mask, int."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        image, mask, label = render_scene(rng, self.image_size, self.num_object_classes, self.max_objects)
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
                 transform: Optional[Callable] = None, max_objects: int = 4):
        super().__init__(split, num_images, image_size, num_classes, seed, None, max_objects)
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


# --------------------------------------------------------------------------------------------
# CIFAR-10, CIFAR-100 and STL-10 in the layouts torchvision downloads
# --------------------------------------------------------------------------------------------
# Read by our own readers rather than torchvision's classes: those check the official md5 of
# every file (small test files fail it, and hashing STL-10's 2.7 GB takes a minute per start),
# read CIFAR's pickles with an unrestricted pickle.load, and load STL-10's unlabeled images
# into memory. torchvision is used only to download (--download).

class _Name:
    """A global that a CIFAR pickle may name (``ArrayUnpickler.find_class``): calling it calls ``fn``, and
    no state can be set on it (BUILD), so that one file cannot change what the next file's names do."""
    __slots__ = ("fn",)

    def __init__(self, fn: Optional[Callable]):
        self.fn = fn

    def __call__(self, *args):
        if self.fn is None:
            raise pickle.UnpicklingError("numpy.ndarray may only be named as the class of _reconstruct")
        return self.fn(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a pickle may not set state on numpy's names")


# numpy.ndarray stands for itself only as _reconstruct's first argument: called, the real class would
# make an uninitialised array of any size the file asks for.
_NDARRAY = _Name(None)

# The dtypes that a CIFAR pickle may use: booleans, integers and floats, one scalar per element.
_PLAIN_TYPE_CODE = re.compile(r"[biuf][1248]")


class _PlainDtype:
    """What ``numpy.dtype(code, align, copy)`` builds in a CIFAR pickle: a plain numeric type and its byte
    order, never a numpy dtype made from the file's state. numpy's own ``dtype.__setstate__`` takes the
    fields, their offsets, the size and the flags from the file unchecked: an object field laid over an
    integer one turns a number of the file into a pointer (a crash, or a reference to any object)."""
    __slots__ = ("dtype",)

    def __init__(self, code, align=False, copy=False):
        if not isinstance(code, str) or not _PLAIN_TYPE_CODE.fullmatch(code):
            raise pickle.UnpicklingError(f"refused dtype {_short(code)}: only booleans, integers and floats "
                                         f"(u1, i8, f4, ...) are allowed")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        # numpy writes (version, byte order, subarray, names, fields, size, alignment, flags[, metadata]):
        # of these, only the byte order of a plain type is taken; the rest must say "none".
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise pickle.UnpicklingError("refused dtype state: only plain numbers are allowed (no fields, "
                                         "subarrays or objects)")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _short(value) -> str:
    """A description of a value from a file, of bounded length (whatever its nesting)."""
    return repr(value)[:40] if isinstance(value, (str, bytes, int, float)) else type(value).__name__


def _plain_dtype(spec) -> np.dtype:
    if not isinstance(spec, _PlainDtype):
        raise pickle.UnpicklingError(f"refused array type {_short(spec)}: expected a numpy.dtype")
    return spec.dtype


def _checked_shape(shape) -> Tuple[int, ...]:
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(d) is int and d >= 0 for d in shape)):
        raise pickle.UnpicklingError(f"refused array shape {_short(shape)}: expected a tuple of sizes")
    return shape


def _checked_bytes(raw, shape: Tuple[int, ...], dtype: np.dtype) -> bytes:
    """The bytes of an array of ``shape`` and ``dtype``: only as many as the file holds."""
    if isinstance(raw, str):  # Python 2's str, read with encoding="latin1"
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refused array data of type {type(raw).__name__}: expected bytes")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python integers: no overflow
    if len(raw) != need:
        raise pickle.UnpicklingError(f"an array of shape {shape} and type {dtype} needs {need} bytes, the file "
                                     f"holds {len(raw)}")
    return raw


class _PickledArray(np.ndarray):
    """An array made by a CIFAR pickle: numpy's ``__setstate__`` (the BUILD that fills it) runs only after
    its type, shape and bytes are checked, so that nothing larger than the file's bytes is allocated."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("refused array state: expected (version, shape, dtype, order, bytes)")
        if len(state) == 5 and state[0] not in (0, 1):
            raise pickle.UnpicklingError(f"refused array state version {_short(state[0])}")
        shape, spec, fortran, raw = state[-4:]
        dtype = _plain_dtype(spec)
        shape = _checked_shape(shape)
        raw = _checked_bytes(raw, shape, dtype)
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), bytes(raw)))


def _reconstruct(cls, shape, typecode) -> _PickledArray:
    """numpy's ``_reconstruct(ndarray, (0,), 'b')``: an empty array that the BUILD after it fills. The shape
    and type asked for here are not used (numpy always writes (0,) and 'b')."""
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError(f"refused _reconstruct of {_short(cls)}: only numpy.ndarray")
    return np.empty(0, np.uint8).view(_PickledArray)


def _frombuffer(buf, spec, shape, order) -> _PickledArray:
    """numpy's ``_frombuffer`` (pickle protocol 5): the array over ``buf``, checked as BUILD's state is."""
    dtype, shape = _plain_dtype(spec), _checked_shape(shape)
    if order not in ("C", "F") or isinstance(buf, str):
        raise pickle.UnpicklingError(f"refused _frombuffer arguments (order {_short(order)})")
    array = np.frombuffer(_checked_bytes(buf, shape, dtype), dtype)
    array = array.reshape(shape[::-1]).T if order == "F" else array.reshape(shape)
    return array.view(_PickledArray)


def _numpy_array_globals() -> dict:
    """The names numpy's pickles of plain arrays use, under every module path numpy used, each bound
    to a checked stand-in (never to numpy's own callables)."""
    allowed = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Name(_PlainDtype)}
    for core in ("numpy.core", "numpy._core"):  # numpy < 2 wrote numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = _Name(_reconstruct)
        allowed[(f"{core}.numeric", "_frombuffer")] = _Name(_frombuffer)
    return allowed


# What a pickle may make its reader hash: CPython does not cache a tuple's hash, so a dict key that is a
# tuple of two references to one tuple, nested 40 deep, takes 2**40 steps to hash (a file of 300 bytes
# that never finishes loading). The official batches hash a few strings.
PICKLE_HASH_WORK = 1 << 22
_MARK_OPS = {op.name: op.stack_before.index(pickletools.markobject) for op in pickletools.opcodes
             if pickletools.markobject in op.stack_before}  # items taken from below the mark
_STACK_OPS = {op.name: (len(op.stack_before), len(op.stack_after)) for op in pickletools.opcodes}
_HASHED = {"SETITEM": slice(1, 2), "SETITEMS": slice(0, None, 2), "DICT": slice(0, None, 2),
           "ADDITEMS": slice(None), "FROZENSET": slice(None)}  # which of an opcode's items it hashes


def check_pickle_size(data: bytes) -> None:
    """Refuses (``pickle.UnpicklingError``) a pickle that would cost its reader time or memory out of
    proportion to its size, before anything is built: a length or a memo index beyond what the file
    holds, or tuples that, with their shared references expanded, exceed PICKLE_HASH_WORK elements
    where they are hashed. The opcodes are followed on a stack of weights (a tuple weighs its
    elements expanded, anything else 1)."""
    stack, marks, memo, work = [], [], {}, 0
    for op, arg, _ in pickletools.genops(data):  # a ValueError for lengths beyond the file's end
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > len(memo) or len(stack) <= (marks[-1] if marks else 0):
                raise pickle.UnpicklingError(f"memo index {index} out of order")  # the C reader would allocate it
            memo[index] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo index {arg} read before it is written")
            stack.append(memo[arg])
            continue
        if name == "MARK":
            marks.append(len(stack))
            continue
        taken, pushed = _STACK_OPS[name]
        items = []
        if name in _MARK_OPS:  # the items above the mark, then _MARK_OPS[name] below it
            if not marks:
                raise pickle.UnpicklingError(f"{name} without a MARK")
            start = marks.pop()
            items, taken = stack[start:], _MARK_OPS[name]
            del stack[start:]
        if len(stack) - (marks[-1] if marks else 0) < taken:
            raise pickle.UnpicklingError(f"{name} on a stack too short")
        if taken:
            items = stack[-taken:] + items
            del stack[-taken:]
        if name in _HASHED:
            work += sum(items[taken:][_HASHED[name]] if name in _MARK_OPS else items[_HASHED[name]])
        weight = 1 + sum(items) if name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET") else 1
        if weight > PICKLE_HASH_WORK or work > PICKLE_HASH_WORK:
            raise pickle.UnpicklingError(f"refused: its tuples, with their shared references expanded, exceed "
                                         f"{PICKLE_HASH_WORK} elements")
        stack.extend(items * 2 if name == "DUP" else [weight] * pushed)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds plain numeric numpy arrays, dicts, lists, strings and numbers, and nothing
    else.

    CIFAR's python batches are pickles; an unrestricted ``pickle.load`` would run any callable a
    tampered file names. Every global other than numpy's array rebuilders is refused before it
    is called (``pickle.UnpicklingError`` naming it), and those rebuilders are stand-ins that build
    only arrays of booleans, integers or floats whose bytes are all in the file (no fields, objects
    or subarrays, nothing allocated beyond the file's size)."""

    allowed = _numpy_array_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays, lists, "
                                         f"strings and numbers are allowed") from None


def load_array_pickle(path) -> dict:
    """The dict pickled in ``path`` (CIFAR's Python-2 batches: str keys via latin-1), read with
    ``ArrayUnpickler``. A refused, truncated or malformed file raises ValueError naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        check_pickle_size(data)
        obj = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()  # latin-1: Python 2 str -> str
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError) as e:
        raise ValueError(f"cannot read {path}: {' '.join(str(e).split())[:200] or type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"cannot read {path}: expected a pickled dict, found {type(obj).__name__}")
    return {k: v.view(np.ndarray) if isinstance(v, np.ndarray) else v for k, v in obj.items()}


def _field(batch: dict, key: str, path):
    if key not in batch:
        names = [k for k in batch if isinstance(k, str)]  # never str() of a key: a tuple may nest deeply
        raise ValueError(f"{path} has no {key!r} entry (found {', '.join(names)[:200]})")
    return batch[key]


def _labels(value, key: str, count: int, path) -> np.ndarray:
    """(count,) int64 from a batch's ``key``: a flat list of ints or an integer vector, checked before any
    conversion (np.asarray of lists that share their items, nested 30 deep, builds 2**30 elements)."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        labels = value.astype(np.int64)
    elif isinstance(value, list) and all(type(v) is int and -2 ** 63 <= v < 2 ** 63 for v in value):
        labels = np.array(value, dtype=np.int64)
    else:
        raise ValueError(f"{path}: expected {key!r} to be a list of integers, found {_short(value)}")
    if len(labels) != count:
        raise ValueError(f"{path}: {count} images in 'data' but {len(labels)} {key!r}")
    return labels


def read_cifar_batch(path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> images (N, 32, 32, 3) uint8 and labels (N,) int64.

    A row of ``data`` holds 3072 bytes: the red 32x32 plane, then green, then blue, row-major."""
    batch = load_array_pickle(path)
    data = _field(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else _short(data)
        raise ValueError(f"{path}: expected 'data' of shape (N, 3072) uint8, found {found}")
    labels = _labels(_field(batch, label_key, path), label_key, len(data), path)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _class_names(value, key: str, path) -> List[str]:
    if not (isinstance(value, list) and all(isinstance(c, (str, bytes)) for c in value)):
        raise ValueError(f"{path}: expected {key!r} to be a list of names, found {_short(value)}")
    return [c.decode("latin1") if isinstance(c, bytes) else c for c in value]


class ImageArrayDataset(Dataset):
    """Labelled images held in arrays; ``__getitem__`` returns ``(transform(PIL RGB image), label)``.

    Subclasses give ``image(index) -> (H, W, 3) uint8``. ``targets`` (N,) int64 holds every label
    (-1: unlabelled), ``classes`` the class names; ``num_classes`` is 0 when some images are
    unlabelled, so that nothing trains a classifier on them."""

    def __init__(self, targets: np.ndarray, classes: Sequence[str], transform: Optional[Callable]):
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.num_classes = len(self.classes) if (self.targets >= 0).all() else 0
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.targets):
            raise IndexError(f"index {index} out of range for {len(self.targets)} images")
        img = Image.fromarray(self.image(index))  # (H, W, 3) uint8 -> RGB
        return (self.transform(img) if self.transform is not None else img), int(self.targets[index])


class CIFARDataset(ImageArrayDataset):
    """CIFAR-10 or CIFAR-100 (fine labels), every image in memory (50,000 images: 150 MB).

    ``folder`` holds the python version's files; ``batches`` names those of the split."""

    def __init__(self, folder, batches: Sequence[str], meta: str, label_key: str, names_key: str,
                 transform: Optional[Callable] = None):
        folder = Path(folder)
        parts = [read_cifar_batch(folder / name, label_key) for name in batches]
        classes = _class_names(_field(load_array_pickle(folder / meta), names_key, folder / meta), names_key,
                               folder / meta)
        self.images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))  # (N, 32, 32, 3)
        super().__init__(np.concatenate([p[1] for p in parts]), classes, transform)
        if len(self.targets) and not 0 <= self.targets.min() <= self.targets.max() < len(classes):
            raise ValueError(f"labels of {folder} outside [0, {len(classes)})")

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


STL10_SIDE = 96
STL10_IMAGE_BYTES = 3 * STL10_SIDE * STL10_SIDE


def read_stl10_labels(path, count: int, num_classes: int) -> np.ndarray:
    """STL-10 labels file (one byte per image, 1..num_classes) -> (count,) int64 in [0, num_classes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count:
        raise ValueError(f"{path} has {len(raw)} labels for {count} images")
    if raw.min() < 1 or raw.max() > num_classes:
        raise ValueError(f"{path} holds labels outside 1..{num_classes}")
    return raw.astype(np.int64) - 1


class STL10Dataset(ImageArrayDataset):
    """STL-10 read from its binary files, images memory-mapped (unlabeled_X.bin is 2.7 GB).

    ``parts`` is a list of (images file, labels file or None for unlabelled images), concatenated
    in that order. An image file holds N x 3 x 96 x 96 bytes, each channel column-major; a labels
    file N bytes in 1..10."""

    def __init__(self, folder, parts: Sequence[Tuple[str, Optional[str]]], transform: Optional[Callable] = None):
        folder = Path(folder)
        classes = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
        self.files, counts, targets = [], [], []
        for images_name, labels_name in parts:
            path = folder / images_name
            n, rest = divmod(path.stat().st_size, STL10_IMAGE_BYTES)
            if rest or not n:
                raise ValueError(f"{path} is not a positive whole number of 3x96x96 images "
                                 f"({path.stat().st_size} bytes)")
            targets.append(np.full(n, -1, np.int64) if labels_name is None
                           else read_stl10_labels(folder / labels_name, n, len(classes)))
            self.files.append(str(path))
            counts.append(n)
        super().__init__(np.concatenate(targets), classes, transform)
        self.starts = np.cumsum([0] + counts)  # part k holds indices starts[k] .. starts[k + 1] - 1
        self._maps = None

    def __getstate__(self):  # worker processes reopen the files instead of receiving their bytes
        return {**self.__dict__, "_maps": None}

    def image(self, index: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIDE, STL10_SIDE)
                          for f in self.files]
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        stored = self._maps[part][index - self.starts[part]]  # (3, col, row): column-major planes
        return np.ascontiguousarray(stored.transpose(2, 1, 0))  # (row, col, 3)


# name -> (torchvision class that knows the archive, folder inside data_dir, files per split,
# unlabelled extra files of the training split)
_CIFAR10_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
PUBLIC_DATASETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                {"train": _CIFAR10_TRAIN + ("batches.meta",), "val": ("test_batch", "batches.meta")}, ()),
    "cifar100": ("CIFAR100", "cifar-100-python", {"train": ("train", "meta"), "val": ("test", "meta")}, ()),
    "stl10": ("STL10", "stl10_binary", {"train": ("train_X.bin", "train_y.bin", "class_names.txt"),
                                        "val": ("test_X.bin", "test_y.bin", "class_names.txt")},
              ("unlabeled_X.bin",)),
}


def _dataset_folder(name: str, data_dir: Path) -> Path:
    """Where ``name``'s files are: ``data_dir/<official folder>``, or data_dir itself when it is
    that folder (``--data-dir .../cifar-10-batches-py``)."""
    folder = PUBLIC_DATASETS[name][1]
    return data_dir if data_dir.name == folder and not (data_dir / folder).is_dir() else data_dir / folder


def _missing_files(name: str, data_dir: Path, files: Sequence[str]) -> List[str]:
    folder = _dataset_folder(name, data_dir)
    return [f for f in files if not (folder / f).is_file()]


def download_public(name: str, data_dir: Path) -> None:
    """Download and extract ``name``'s official archive into ``data_dir`` with torchvision (which
    checks the archive's md5). Under a process group only rank 0 downloads; the others wait."""
    from torchvision import datasets as tv  # only downloads need it
    from torchvision.datasets.utils import download_and_extract_archive
    source = getattr(tv, PUBLIC_DATASETS[name][0])
    try:
        if utils.is_main_process():
            data_dir.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(source.url, str(data_dir), filename=source.filename, md5=source.tgz_md5)
    except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), or a corrupt archive
        raise FileNotFoundError(f"--download: fetching {source.url} failed ({e}); download it elsewhere "
                                f"and extract it into {data_dir}") from None
    finally:  # also when rank 0 fails: the others then report the missing files
        utils.barrier()


def build_public_dataset(name: str, data_dir, split: str, transform: Optional[Callable] = None,
                         download: bool = False, with_unlabeled: bool = False) -> Dataset:
    """CIFAR-10, CIFAR-100 (fine labels) or STL-10 from ``data_dir`` in the official layout.

    split "train" is the training set, "val" the test set. ``with_unlabeled`` adds STL-10's
    100,000 unlabelled images (label -1, ``num_classes`` 0) to its training set. Missing files
    are downloaded with ``download``, else a FileNotFoundError lists them."""
    data_dir = Path(data_dir)
    files = PUBLIC_DATASETS[name][2][split]
    if split == "train" and with_unlabeled:
        files = files + PUBLIC_DATASETS[name][3]
    if download and _missing_files(name, data_dir, files):
        download_public(name, data_dir)
    missing = _missing_files(name, data_dir, files)
    if missing:
        folder = _dataset_folder(name, data_dir)
        raise FileNotFoundError(f"--dataset {name}: {', '.join(missing)} not found in {folder}; put the "
                                f"official files there ({name}'s {split} split needs {', '.join(files)}) "
                                f"or pass --download to fetch them")
    folder = _dataset_folder(name, data_dir)
    if name == "stl10":
        parts = [(files[0], files[1])] + [(f, None) for f in files[3:]]
        return STL10Dataset(folder, parts, transform)
    label_key, names_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    return CIFARDataset(folder, files[:-1], files[-1], label_key, names_key, transform)


# --------------------------------------------------------------------------------------------
# Dispatch and loader
# --------------------------------------------------------------------------------------------

DATASET_NAMES = ("imagenet1k", "imagefolder", "folder", "builtin") + tuple(PUBLIC_DATASETS)


def build_dataset(name: str, data_dir, split: str, transform: Optional[Callable] = None,
                  from_numpy: bool = False, num_images: Optional[int] = None, image_size: int = 64,
                  num_classes: int = 10, seed: int = 0, max_objects: int = 4, download: bool = False,
                  with_unlabeled: bool = False) -> Dataset:
    """The dataset ``name`` (see the module docstring) for ``split`` ("train" or "val").

    num_images, image_size, num_classes, seed and max_objects (1 makes single-object, easier
    scenes) configure the builtin dataset and are ignored by the others; download and
    with_unlabeled apply to CIFAR-10/100 and STL-10 only. Errors for a missing or empty
    ``data_dir`` are raised here, before any model is built. The dataset's ``num_classes`` gives
    the classifier's width (0: no labels, or not every image labelled).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "builtin":
        return BuiltinDataset(split=split, num_images=num_images, image_size=image_size,
                              num_classes=num_classes, seed=seed, transform=transform,
                              max_objects=max_objects)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir")
    data_dir = Path(data_dir)
    if name in PUBLIC_DATASETS:
        return build_public_dataset(name, data_dir, split, transform, download, with_unlabeled)
    if name in ("imagenet1k", "imagefolder"):
        if from_numpy:
            return NumpyListDataset(data_dir, split, transform)
        _require_dir(data_dir, f"the ImageNet layout {data_dir}/{split}/<class>/<image>.jpg")
        return ImageFolderDataset(data_dir / split, transform)
    _require_dir(data_dir, f"a folder of images such as {data_dir}/<image>.jpg")
    root = data_dir / split if (data_dir / split).is_dir() else data_dir
    return UnlabelledFolderDataset(root, transform)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """The global ``--batch-size`` split over ``world_size`` processes; it must divide."""
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be a positive "
                         f"multiple of the number of processes ({world_size})")
    return batch_size // world_size


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first samples, to resume a run in
    the middle of an epoch without loading the batches it already did.

    With ``with_epoch`` it yields ``(epoch, index)`` pairs, for ``EpochSeededDataset``."""

    def __init__(self, *args, with_epoch: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch`` and leave out its first ``skip`` samples (this epoch only)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.skip, None)
        if self.with_epoch:
            epoch = self.epoch
            return ((epoch, i) for i in indices)
        return indices

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def physical_memory() -> int:
    """Bytes of memory of this machine (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


# Folders tried, in order, for the images that the processes of one machine share (--in-memory under
# torchrun or SLURM): /dev/shm is memory; the temporary folder is usually disk, whose pages the
# processes share through the page cache all the same.
SHARED_FOLDERS = ("/dev/shm", tempfile.gettempdir())


def shared_folder(nbytes: int) -> str:
    """The first folder of SHARED_FOLDERS with ``nbytes`` free; an OSError if none has."""
    for folder in SHARED_FOLDERS:
        try:
            stat = os.statvfs(folder)
        except (OSError, AttributeError):
            continue
        if os.access(folder, os.W_OK) and stat.f_bavail * stat.f_frsize >= nbytes:
            return folder
    raise OSError(f"no room for {nbytes / 2 ** 20:.0f} MiB of images in {' or '.join(SHARED_FOLDERS)}")


# Where Linux shows every process's open files by number (/proc/<pid>/fd/<n>): a file shared through
# a link into it needs no name of its own.
PROC = "/proc"


def _reserve(fd: int, nbytes: int) -> None:
    """The file ``fd`` made ``nbytes`` long, its space reserved on the spot where the system can (so that
    a full folder is an OSError here rather than a crash on the first write)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
    else:
        os.ftruncate(fd, nbytes)


def _create_shared(path: str, nbytes: int) -> Optional[int]:
    """A new file of ``nbytes`` that the processes of this machine open as ``path`` (which must not exist).

    On Linux the file itself has no name: ``path`` is a symbolic link to this process's descriptor of
    it (``/proc/<pid>/fd/<n>``), so the file and its memory go as soon as no process holds it, even
    when this one is killed before it can clean up (SIGKILL, the out-of-memory killer); only the link
    is left then, pointing nowhere and holding nothing. Returns that descriptor, to be closed once
    every process has mapped the file. Elsewhere, or where the link does not lead to the file, ``path``
    is the file and None is returned."""
    folder, fds = os.path.dirname(path), os.path.join(PROC, str(os.getpid()), "fd")
    if os.path.isdir(fds):
        fd, name = tempfile.mkstemp(dir=folder, prefix=".vicregl-")
        os.unlink(name)
        try:
            _reserve(fd, nbytes)
            os.symlink(os.path.join(fds, str(fd)), path)
        except BaseException:
            os.close(fd)
            raise
        if os.path.exists(path) and os.path.samestat(os.stat(path), os.fstat(fd)):
            return fd
        os.unlink(path)  # the link leads elsewhere (a /proc of another process space): a named file
        os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _reserve(fd, nbytes)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return None


def _not_ours(st: os.stat_result, path: str) -> Optional[str]:
    """Why ``path`` (``st``: of the link itself, or of the file) cannot be what this user's first process
    made: another user's, not a regular file, or writable by others; None when it can be."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to user {st.st_uid}, not to this user ({os.getuid()})"
    if stat.S_ISLNK(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file but {_file_kind(st.st_mode)}"
    if st.st_mode & 0o022:
        return f"{path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def find_shared(name: str) -> str:
    """Where the file ``name`` that the first process of this machine made (``_create_shared``) is, in
    SHARED_FOLDERS; an OSError that says why it cannot be opened. A file or link of that name that
    another user owns, or that others can write, is passed over: its contents would become the training
    images. With none other, the OSError names it."""
    refused = None
    for path in (os.path.join(folder, name) for folder in SHARED_FOLDERS):
        if not os.path.lexists(path):
            continue
        reason = _not_ours(os.lstat(path), path)  # the name: a link, or the file itself
        if reason is None:
            if not os.path.exists(path):  # a link to the first process's file, which this one cannot see
                raise OSError(f"{path} leads to {os.readlink(path)}, which this process cannot open: the processes "
                              f"of a machine must see one another in {PROC} (one container per machine, not one "
                              f"per process)")
            reason = _not_ours(os.stat(path), path)  # what it leads to
        if reason is None:
            return path
        refused = refused or reason
    if refused is not None:
        raise OSError(f"refused {refused}: not the images of this run's first process")
    raise OSError(f"{name} is in none of {', '.join(SHARED_FOLDERS)}: the process of local rank 0 on each "
                  f"machine writes it, and this machine has none (LOCAL_RANK)")


def _map_arrays(path: str, count: int, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels (count,) int64, images (count, 3, height, width) uint8) in the file ``path``, mapped
    shared: what one process writes, every process that maps the file sees, and the memory is held
    once. The file must have exactly this size (an OSError says otherwise, or that it is missing)."""
    nbytes = count * 8 + count * 3 * height * width
    if os.path.getsize(path) != nbytes:  # FileNotFoundError when it is not there
        raise OSError(f"{path} holds {os.path.getsize(path)} bytes, expected {nbytes}")
    buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return buffer[:count * 8].view(torch.int64), buffer[count * 8:].view(count, 3, height, width)


class InMemoryImages(Dataset):
    """Every image of ``dataset`` decoded once into one uint8 tensor (N, 3, H, W), so that the training
    views of a whole batch are made at once (``transform.batch``, a ``MultiCropTrainDataTransform``)
    instead of image by image: for small images, where the per-image work costs more than the
    arithmetic. The images must all have one size and take at most half of the machine's memory (a
    ValueError says which rule failed). ``__getitem__`` gives what ``dataset`` gives with
    ``transform``; an unreadable file is replaced by the next readable one, as ``dataset`` does.

    ``share_as``: a file name; the arrays then live in that file (``file``), in the first folder of
    SHARED_FOLDERS with room, where the other processes of the machine map them (``mapped``) instead
    of decoding their own copy. Whoever made the file calls ``unshare()`` once they have: the memory
    stays until the last process ends. A failure while decoding removes the file at once, and on Linux
    so does the end of this process, however it ends (see ``_create_shared``).
    """

    def __init__(self, dataset: Dataset, transform, share_as: Optional[str] = None):
        self.dataset, self.transform, self.file, self._fd = dataset, transform, None, None
        saved = dataset.transform
        dataset.transform = None  # the decoded RGB image
        try:
            first, _ = dataset[0]
            width, height = first.size
            need, have = len(dataset) * 3 * height * width, physical_memory()
            if have and need > have // 2:
                raise ValueError(f"{len(dataset)} images of {width}x{height} take {need / 2 ** 30:.1f} GiB decoded, "
                                 f"more than half of this machine's {have / 2 ** 30:.1f} GiB of memory")
            if share_as is None:
                self.images = torch.empty(len(dataset), 3, height, width, dtype=torch.uint8)
                self.labels = torch.empty(len(dataset), dtype=torch.int64)
            else:
                file = os.path.join(shared_folder(len(dataset) * 8 + need), share_as)
                self._fd = _create_shared(file, len(dataset) * 8 + need)
                self.file = file  # ours to remove from here on
                self.labels, self.images = _map_arrays(file, len(dataset), height, width)
            for index in range(len(dataset)):
                img, label = (first, _) if index == 0 else dataset[index]
                if img.size != (width, height):
                    where = getattr(dataset, "samples", None)
                    name = f" ({where[index][0]})" if where else ""
                    raise ValueError(f"images of different sizes cannot be held as one array: image {index}"
                                     f"{name} is {img.size[0]}x{img.size[1]}, image 0 is {width}x{height}")
                self.images[index] = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
                self.labels[index] = label
        except BaseException:
            if self.file is not None:
                self.unshare()
            raise
        finally:
            dataset.transform = saved
        self.num_classes = getattr(dataset, "num_classes", 0)

    @classmethod
    def mapped(cls, dataset: Dataset, transform, file: str, count: int, height: int, width: int) -> "InMemoryImages":
        """The arrays that another process decoded into ``file`` (``share_as``), mapped without decoding;
        an OSError when the file is missing or not of that shape."""
        self = cls.__new__(cls)
        self.dataset, self.transform, self.file, self._fd = dataset, transform, file, None
        self.labels, self.images = _map_arrays(file, count, height, width)
        self.num_classes = getattr(dataset, "num_classes", 0)
        return self

    def unshare(self) -> None:
        """For the process that made the shared file (``share_as``), once every process has mapped it:
        its name is removed, so that no process can map it any more and its memory goes back when the
        last one that has ends."""
        os.unlink(self.file)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.labels[index])

    def sample_params(self):
        """The random choices of one image's views (``transform.sample_params``)."""
        return self.transform.sample_params(self.images.shape[2], self.images.shape[3])

    def batch(self, indices: Sequence[int], params):
        """The views of images ``indices`` with their ``params``, made at once (``transform.batch``)."""
        indices = torch.as_tensor(indices)
        return self.transform.batch(self.images[indices], params, self.labels[indices])


class EpochSeededDataset(Dataset):
    """Makes every random augmentation a function of (seed, epoch, index) alone.

    Before loading sample ``index`` of ``epoch`` it seeds torch's CPU generator, ``random`` and
    NumPy's global generator from that triple. The views of an image then no longer depend on
    which worker loads it, on how many workers there are, or on what ran before: a run resumed
    from a checkpoint (even mid-epoch, even with persistent workers) sees exactly the crops the
    uninterrupted run saw. Indices are the ``(epoch, index)`` pairs of a
    ``ResumableDistributedSampler(with_epoch=True)``; attributes pass through to the dataset.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name in ("dataset", "seed"):  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _seed(self, epoch: int, index: int) -> None:
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2, dtype=np.uint32)
        torch.random.default_generator.manual_seed(int(state[0]) << 32 | int(state[1]))
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))

    def __getitem__(self, key):
        epoch, index = key
        self._seed(epoch, index)
        return self.dataset[index]

    def __getitems__(self, keys):
        """A whole batch (what the DataLoader asks for): made at once when the dataset can
        (``InMemoryImages``), from the same random draws as sample by sample; else sample by sample."""
        if not isinstance(self.dataset, InMemoryImages):
            return [self[key] for key in keys]
        params = []
        for epoch, index in keys:
            self._seed(epoch, index)
            params.append(self.dataset.sample_params())
        return self.dataset.batch([index for _, index in keys], params)


def build_loader(dataset: Dataset, batch_size: int, world_size: int = 1, rank: int = 0,
                 train: bool = True, num_workers: int = 0, pin_memory: Optional[bool] = None,
                 seed: int = 0, collate_fn: Optional[Callable] = None) -> DataLoader:
    """DataLoader over this process's share of ``dataset``; its sampler is ``loader.sampler``.

    batch_size is the global batch: each process loads batch_size // world_size samples a step
    (a ValueError names --batch-size when it does not divide). Training shuffles and drops the
    last incomplete batch; validation keeps order and every sample. Call
    ``epoch_iterator(loader, epoch)`` (or ``loader.sampler.set_epoch(epoch)``) every epoch so
    that the order changes. The shuffling and the workers' random augmentations are
    deterministic for a given seed. Memory is pinned by default when CUDA is available;
    workers persist across epochs.
    """
    local_batch = per_process_batch(batch_size, world_size)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=train, seed=seed, with_epoch=train)
    if train:  # augmentations as a function of (seed, epoch, index): exact resumes
        dataset = EpochSeededDataset(dataset, seed)
    if train and len(sampler) < local_batch:
        raise ValueError(f"the dataset has {len(dataset)} samples, {len(sampler)} per process: "
                         f"not one full batch of {local_batch} (--batch-size {batch_size} over "
                         f"{world_size} process(es))")
    # Training samples are seeded one by one (EpochSeededDataset); this seeds what is left, such
    # as the workers' initial state.
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + rank)
    return DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train, persistent_workers=num_workers > 0, collate_fn=collate_fn,
        generator=generator)


def epoch_iterator(loader: DataLoader, epoch: int, skip: int = 0):
    """Iterator over the batches of ``epoch``, starting after its first ``skip`` batches (already
    done before a restart); the skipped images are not loaded."""
    loader.sampler.set_epoch(epoch, skip * loader.batch_size)
    return iter(loader)
