"""CIFAR-10, CIFAR-100 and STL-10 in the layouts torchvision downloads (``build_public_dataset``).

The files are under ``<data_dir>/cifar-10-batches-py``, ``cifar-100-python`` (fine labels) or
``stl10_binary`` (or in ``data_dir`` itself when it is that folder); "train" is the training set,
"val" the test set; ``with_unlabeled`` adds STL-10's unlabelled images to its training set (for
pretraining), and ``download=True`` fetches missing files (``download_public``). CIFAR's pickles are
read by ``ArrayUnpickler``: plain numeric arrays, lists, dicts, strings and numbers only, at a cost
bounded by the file's size (``check_pickle_size``). STL-10's images are memory-mapped.
"""
import io
import pickle
import pickletools
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

import utils


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
