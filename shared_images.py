"""--in-memory: every training image decoded once into one uint8 array, shared by a machine's processes.

``InMemoryImages`` holds a dataset's images as (N, 3, H, W) uint8 and makes the views of a whole batch
at once. With ``share_as`` the arrays live in a file in the first folder of SHARED_FOLDERS
(``/dev/shm``, then the temporary folder) with room; the other processes of the machine find it
(``find_shared``) and map it (``InMemoryImages.mapped``) instead of decoding their own copy. On Linux
the file has no name of its own: its name is a link to the first process's descriptor under
``PROC`` (``/proc/<pid>/fd/<n>``), so its memory goes back when the last process holding it ends,
however it ends (``_create_shared``). A file or link that another user owns, or that others can
write, is never mapped. SHARED_FOLDERS and PROC are read when used, so tests may point them elsewhere.
"""
import os
import stat
import tempfile
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import utils


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
        return f"{path} is not a regular file but {utils.file_kind(st.st_mode)}"
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
