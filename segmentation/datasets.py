"""Segmentation datasets in their standard layouts, and the built-in dataset's masks.

Every dataset returns ``transform(image, mask)`` (see ``segmentation/transforms.py``) with mask
values in [0, num_classes) or 255 (ignored), and exposes ``num_classes``, ``class_names`` and
``samples`` (pairs of file paths; absent for the built-in set). ``build_segmentation_dataset``
picks one by name; a missing or malformed tree raises ``FileNotFoundError`` / ``ValueError``
naming the expected layout before any model is built.

Layouts (``--data-dir`` may point at the folder named first or at a folder above it):

- ``voc``: ``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
  ImageSets/Segmentation/{train,val}.txt}``. Label PNGs are palette images whose indices are the
  classes (0 background, 1..20), 255 marks object boundaries (ignored). Split ``train_aug`` adds
  the SBD annotations (10582 images) from ``SegmentationClassAug/<id>.png`` (grey-level indices),
  listed by mmsegmentation's ``ImageSets/Segmentation/aug.txt`` (extra ids, added to train.txt) or
  by a ``trainaug.txt`` / ``train_aug.txt`` list of all ids (lines ``<id>`` or
  ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``). Either way an id of train.txt keeps
  its finer SegmentationClass label, as mmsegmentation's concatenation does, and ids of val.txt
  are left out (they would leak the evaluation images into training).
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/<name>.{jpg,png}``;
  annotation 0 ("other") is ignored and classes 1..150 become 0..149 (mmsegmentation's
  ``reduce_zero_label``).
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png`` (19 classes, 255 ignored). When a
  city has only ``*_gtFine_labelIds.png`` files, the ids are mapped to train ids with the official
  table (``CITYSCAPES_ID_TO_TRAIN_ID``).
- ``builtin``: ``BuiltinMasks``, the masks of the repository's ``builtin_data.BuiltinDataset``
  (procedural images, no download): background 0 and one class per object type.
"""
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["VOC_CLASSES", "ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAIN_ID",
           "SegmentationFiles", "VOCSegmentation", "ADE20KSegmentation", "CityscapesSegmentation",
           "BuiltinMasks", "build_segmentation_dataset", "DATASETS"]

IGNORE_INDEX = 255

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle")

# Official Cityscapes label ids -> train ids (cityscapesScripts' labels.py); every other id -> 255.
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lookup_table(mapping) -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for k, v in mapping.items():
        table[k] = v
    return table


_CITYSCAPES_TABLE = _lookup_table(CITYSCAPES_ID_TO_TRAIN_ID)
_ADE20K_TABLE = np.concatenate([[IGNORE_INDEX], np.arange(255)]).astype(np.uint8)  # 0 -> 255, k -> k-1


def _find_root(data_dir, marker: str, candidates: Sequence[str]) -> Path:
    """The folder holding ``marker``: data_dir itself or one of data_dir/<candidate>."""
    data_dir = Path(data_dir)
    for sub in ("",) + tuple(candidates):
        root = data_dir / sub if sub else data_dir
        if (root / marker).is_dir():
            return root
    raise FileNotFoundError(f"no {marker}/ folder in {data_dir} or " +
                            ", ".join(str(data_dir / c) for c in candidates))


class SegmentationFiles(Dataset):
    """(image file, label file) pairs read with PIL.

    ``label_table``: an optional 256-entry uint8 lookup table applied to the label values (ADE20K's
    shift, Cityscapes' id -> train id). ``transform(image, mask)`` defaults to returning the PIL
    image and the (H, W) uint8 mask array. Label values outside [0, num_classes) other than 255
    raise ValueError naming the file (a label file in the wrong format, never silently learnt).
    """

    def __init__(self, samples: Sequence[Tuple[str, str]], num_classes: int, class_names: Sequence[str],
                 transform: Optional[Callable] = None, label_tables: Optional[Sequence[Optional[np.ndarray]]] = None):
        if not samples:
            raise ValueError("the dataset has no samples")
        self.skip_unreadable = False  # training sets it: a corrupt file is skipped, never a crash
        self.num_skipped = 0
        self.samples = [(str(a), str(b)) for a, b in samples]
        self.num_classes, self.class_names = num_classes, tuple(class_names)
        self.transform = transform
        self.label_tables = list(label_tables) if label_tables is not None else [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        """(RGB image, (H, W) uint8 mask) of sample ``index``: regular files only, within the pixel limit
        (--max-image-pixels); an OSError otherwise (a FIFO would block, a huge image fill the memory)."""
        from datasets import open_image, open_regular_file  # the repository's, imported late as in BuiltinMasks
        image_path, label_path = self.samples[index]
        with open_regular_file(image_path) as f, open_image(f) as im:
            image = im.convert("RGB")
        with open_regular_file(label_path) as f, open_image(f) as lab:
            if lab.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{label_path}: label images must hold class indices (mode L or P), "
                                 f"got mode {lab.mode} (colour-coded labels need converting first)")
            mask = np.array(lab)
        if mask.max(initial=0) > 255:
            raise ValueError(f"{label_path}: label values up to {mask.max()} do not fit 8 bits")
        mask = mask.astype(np.uint8)
        table = self.label_tables[index]
        if table is not None:
            mask = table[mask]
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(f"{label_path}: label values {bad.tolist()} are outside [0, {self.num_classes}) "
                             f"and not {IGNORE_INDEX} (ignored)")
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"{image_path} is {image.size[0]}x{image.size[1]} but its label {label_path} is "
                             f"{mask.shape[1]}x{mask.shape[0]}")
        return image, mask

    def __getitem__(self, index: int):
        for offset in range(len(self.samples) if self.skip_unreadable else 1):
            i = (index + offset) % len(self.samples)
            try:
                image, mask = self.read(i)
                break
            except (OSError, SyntaxError) as e:  # PIL's errors for truncated or non-image files
                if not self.skip_unreadable:
                    raise OSError(f"cannot read {self.samples[i]}: {e}") from e
                self.num_skipped += 1
                print(f"warning: skipping unreadable sample {self.samples[i]} ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
        else:
            raise RuntimeError("no sample of this dataset could be read")
        return self.transform(image, mask) if self.transform is not None else (image, mask)


# ----------------------------------------------------------------------------- Pascal VOC

def _read_ids(path: Path) -> List[str]:
    """Image ids from a list file: lines '<id>' or '/JPEGImages/<id>.jpg /Segmentation.../<id>.png'."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            ids.append(Path(line.split()[0]).stem)
    return ids


class VOCSegmentation(SegmentationFiles):
    """Pascal VOC 2012 (21 classes), splits ``train``, ``val`` and ``train_aug`` (module docstring)."""

    splits = ("train", "val", "train_aug")

    def __init__(self, data_dir, split: str = "train", transform: Optional[Callable] = None):
        root = self.root = _find_root(data_dir, "JPEGImages", ["VOC2012", "VOCdevkit/VOC2012"])
        lists = root / "ImageSets" / "Segmentation"
        if split not in self.splits:
            raise ValueError(f"VOC split must be one of {self.splits}, got {split!r}")
        if split == "train_aug":
            entries = self._aug_entries(root)
        else:
            entries = [(i, "SegmentationClass") for i in self._ids(lists / f"{split}.txt")]
        samples = [(root / "JPEGImages" / f"{i}.jpg", root / folder / f"{i}.png") for i, folder in entries]
        missing = [str(p) for pair in samples for p in pair if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed for VOC {split} are missing, e.g. {missing[0]}")
        super().__init__(samples, len(VOC_CLASSES), VOC_CLASSES, transform)
        self.split = split

    @staticmethod
    def _ids(path: Path) -> List[str]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; expected the VOC 2012 layout "
                                    f"VOCdevkit/VOC2012/ImageSets/Segmentation/{{train,val}}.txt")
        return _read_ids(path)

    @staticmethod
    def aug_list(root: Path) -> Optional[Path]:
        """The SBD list file found under ``root`` (None when the aug annotations are not installed)."""
        if not (root / "SegmentationClassAug").is_dir():
            return None
        for name in ("aug.txt", "trainaug.txt", "train_aug.txt"):
            if (root / "ImageSets" / "Segmentation" / name).is_file():
                return root / "ImageSets" / "Segmentation" / name
        return None

    @classmethod
    def has_aug(cls, data_dir) -> bool:
        try:
            return cls.aug_list(_find_root(data_dir, "JPEGImages", ["VOC2012", "VOCdevkit/VOC2012"])) is not None
        except FileNotFoundError:
            return False

    @classmethod
    def _aug_entries(cls, root: Path) -> List[Tuple[str, str]]:
        lists = root / "ImageSets" / "Segmentation"
        aug = cls.aug_list(root)
        if aug is None:
            raise FileNotFoundError(
                f"VOC split train_aug needs {root}/SegmentationClassAug/ and one of {lists}/aug.txt "
                f"(mmsegmentation's tools/convert_datasets/voc_aug.py), trainaug.txt or train_aug.txt")
        train = cls._ids(lists / "train.txt")
        val = set(cls._ids(lists / "val.txt"))
        train_set = set(train)
        # mmsegmentation: train.txt with SegmentationClass, plus the SBD ids with SegmentationClassAug.
        ids = train + [i for i in _read_ids(aug) if i not in train_set]
        seen, entries = set(), []
        for i in ids:
            if i in seen or i in val:
                continue
            seen.add(i)
            fine = i in train_set and (root / "SegmentationClass" / f"{i}.png").is_file()
            entries.append((i, "SegmentationClass" if fine else "SegmentationClassAug"))
        return entries


# ----------------------------------------------------------------------------- ADE20K

class ADE20KSegmentation(SegmentationFiles):
    """ADE20K / SceneParsing (ADEChallengeData2016), 150 classes; splits ``train``, ``val``."""

    splits = ("train", "val")

    def __init__(self, data_dir, split: str = "train", transform: Optional[Callable] = None):
        if split not in self.splits:
            raise ValueError(f"ADE20K split must be one of {self.splits}, got {split!r}")
        root = self.root = _find_root(data_dir, "annotations", ["ADEChallengeData2016"])
        folder = "training" if split == "train" else "validation"
        images = sorted((root / "images" / folder).glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"no .jpg images in {root / 'images' / folder}; expected the layout "
                                    f"ADEChallengeData2016/{{images,annotations}}/{{training,validation}}/")
        samples = [(p, root / "annotations" / folder / f"{p.stem}.png") for p in images]
        missing = [str(b) for _, b in samples if not b.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ADE20K annotations are missing, e.g. {missing[0]}")
        super().__init__(samples, len(ADE20K_CLASSES), ADE20K_CLASSES, transform, [_ADE20K_TABLE] * len(samples))
        self.split = split


# ----------------------------------------------------------------------------- Cityscapes

class CityscapesSegmentation(SegmentationFiles):
    """Cityscapes fine annotations, 19 classes; splits ``train``, ``val``."""

    splits = ("train", "val")

    def __init__(self, data_dir, split: str = "train", transform: Optional[Callable] = None):
        if split not in self.splits:
            raise ValueError(f"Cityscapes split must be one of {self.splits}, got {split!r}")
        root = self.root = _find_root(data_dir, "leftImg8bit", ["cityscapes"])
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if not images:
            raise FileNotFoundError(f"no images in {root / 'leftImg8bit' / split}/<city>/*_leftImg8bit.png")
        samples, tables, missing = [], [], []
        for p in images:
            stem = p.name[:-len("_leftImg8bit.png")]
            gt = root / "gtFine" / split / p.parent.name
            train_ids, ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
            if train_ids.is_file():
                samples.append((p, train_ids))
                tables.append(None)
            elif ids.is_file():  # not converted with createTrainIdLabelImgs.py: map on the fly
                samples.append((p, ids))
                tables.append(_CITYSCAPES_TABLE)
            else:
                missing.append(str(train_ids))
        if missing:
            raise FileNotFoundError(f"{len(missing)} Cityscapes labels are missing, e.g. {missing[0]} "
                                    f"(or its *_gtFine_labelIds.png)")
        super().__init__(samples, len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES, transform, tables)
        self.split = split


# ----------------------------------------------------------------------------- built-in

class BuiltinMasks(Dataset):
    """The built-in procedural dataset with its per-pixel masks (0 background, c + 1 object class c).

    A thin wrapper over ``builtin_data.BuiltinDataset.sample`` (rendered on demand, deterministic for a
    seed; the same scenes as pretraining on ``--dataset builtin`` with that seed) that hands
    ``transform`` the PIL image and the uint8 mask, like the file datasets. (Not
    ``builtin_data.BuiltinSegmentation``: it renders scenes with num_classes + 1 object classes, so its
    masks reach num_classes + 1.)
    """

    def __init__(self, split: str = "train", num_images: int = 2048, image_size: int = 64,
                 num_object_classes: int = 10, seed: int = 0, transform: Optional[Callable] = None,
                 max_objects: int = 4, layout: str = "single"):
        import builtin_data  # the repository's builtin_data.py (the caller puts the root on sys.path)
        self.source = builtin_data.BuiltinDataset(split, num_images, image_size, num_object_classes, seed, None,
                                                  max_objects, layout)
        self.num_classes = num_object_classes + 1  # with the background
        self.class_names = ("background",) + tuple(builtin_data.TEXTURES[:num_object_classes])  # class c is a texture
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, mask, _ = self.source.sample(index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)


# ----------------------------------------------------------------------------- dispatch

DATASETS = {"voc": VOCSegmentation, "ade20k": ADE20KSegmentation, "cityscapes": CityscapesSegmentation}


def build_segmentation_dataset(name: str, data_dir, split: str, transform: Optional[Callable] = None,
                               **builtin) -> Dataset:
    """Dataset ``name`` ('voc', 'ade20k', 'cityscapes' or 'builtin') for ``split``.

    ``builtin`` options (num_images, image_size, num_object_classes, seed, max_objects, layout) configure the
    built-in dataset, whose splits are 'train' and 'val'; file datasets need ``data_dir``.
    """
    if name == "builtin":
        return BuiltinMasks("val" if split == "val" else "train", transform=transform, **builtin)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}, builtin")
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
    return DATASETS[name](data_dir, split, transform)
