"""Datasets and loaders: the module the scripts import.

``build_dataset(name, data_dir, split, transform, from_numpy=False, ...)`` picks one of:

* ``"imagenet1k"`` (alias ``"imagefolder"``): ImageNet layout ``<data_dir>/<split>/<class>/<image>``;
  classes are the sorted sub-folder names. With ``from_numpy=True`` (``--dataset_from_numpy``)
  the samples come instead from ``<data_dir>/<split>_images.npy`` (image paths, absolute or
  relative to data_dir) and ``<data_dir>/<split>_labels.npy`` (integer labels).
* ``"folder"``: every image under ``<data_dir>/<split>`` (or ``<data_dir>`` itself when it has no
  such sub-folder), recursively, without labels: label -1 and ``num_classes == 0``.
* ``"builtin"``: ``builtin_data.BuiltinDataset``, procedural images with labels and segmentation
  masks, made on the fly from (seed, split, index); nothing to download or store. ``data_dir`` is
  ignored.
* ``"cifar10"``, ``"cifar100"`` (fine labels), ``"stl10"``: the files torchvision downloads
  (``public_datasets.build_public_dataset``); "train" is the training set, "val" the test set;
  ``with_unlabeled`` adds STL-10's unlabelled images to its training set (for pretraining).
  ``download=True`` fetches missing files.

Every dataset returns ``(transform(image), label)`` and exposes ``num_classes``. Unreadable
image files are skipped (the next readable sample takes their place), each reported on one line
of stderr and counted over every loader worker (``skipped_images``); so are names that are not
regular files (a FIFO would block) and images of more pixels than --max-image-pixels
(``set_max_image_pixels``). A missing or empty data folder raises at construction.

``build_loader`` wraps a dataset in a DataLoader with a DistributedSampler, splitting the
global batch over the processes; ``epoch_iterator`` starts an epoch, after its first batches
when resuming.

The rest of the data code lives beside this module:

* ``builtin_data.py``: the built-in procedural scenes (``render_scene``, ``BuiltinDataset``,
  ``BuiltinSegmentation``), ``synthetic_photo`` and the ``--builtin-*`` flags (``add_builtin_arguments``);
* ``public_datasets.py``: the CIFAR-10/100 and STL-10 readers, their restricted unpickler
  (``ArrayUnpickler``) and the download;
* ``shared_images.py``: ``--in-memory`` (``InMemoryImages``), decoded images shared by the processes
  of a machine through a file in ``/dev/shm`` (``find_shared``, ``SHARED_FOLDERS``).
"""
import itertools
import multiprocessing
import os
import random
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import builtin_data
import public_datasets
import shared_images
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
            raise OSError(f"not a regular file but {utils.file_kind(mode)}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
                        kind = utils.file_kind(os.stat(entry.path).st_mode)
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
# Dispatch and loader
# --------------------------------------------------------------------------------------------

DATASET_NAMES = ("imagenet1k", "imagefolder", "folder", "builtin") + tuple(public_datasets.PUBLIC_DATASETS)


def build_dataset(name: str, data_dir, split: str, transform: Optional[Callable] = None,
                  from_numpy: bool = False, num_images: Optional[int] = None, image_size: int = 64,
                  num_classes: int = 10, seed: int = 0, max_objects: int = 4, download: bool = False,
                  with_unlabeled: bool = False, layout: str = "single") -> Dataset:
    """The dataset ``name`` (see the module docstring) for ``split`` ("train" or "val").

    num_images, image_size, num_classes, seed, max_objects (1 makes single-object, easier
    scenes) and layout ("single" or "mosaic") configure the builtin dataset and are ignored by
    the others; download and with_unlabeled apply to CIFAR-10/100 and STL-10 only. Errors for a missing or empty
    ``data_dir`` are raised here, before any model is built. The dataset's ``num_classes`` gives
    the classifier's width (0: no labels, or not every image labelled).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "builtin":
        return builtin_data.BuiltinDataset(split=split, num_images=num_images, image_size=image_size,
                                           num_classes=num_classes, seed=seed, transform=transform,
                                           max_objects=max_objects, layout=layout)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir")
    data_dir = Path(data_dir)
    if name in public_datasets.PUBLIC_DATASETS:
        return public_datasets.build_public_dataset(name, data_dir, split, transform, download,
                                                   with_unlabeled)
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
        (``shared_images.InMemoryImages``), from the same random draws as sample by sample; else sample
        by sample."""
        if not isinstance(self.dataset, shared_images.InMemoryImages):
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
