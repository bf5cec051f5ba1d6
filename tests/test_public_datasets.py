"""CIFAR-10, CIFAR-100 and STL-10 read from tiny files written here in the official layouts.

The oracle is what each test wrote: pixel values at known indices, labels, split sizes. CIFAR's
batches are written as Python 2's cPickle wrote the official ones (protocol 2, str as BINSTRING,
arrays through numpy.core.multiarray._reconstruct), with opcodes spelled out below from the
pickle format, so the reader is checked against the real files' encoding, not against whatever
this Python's pickle module writes.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets
import public_datasets

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


# ----------------------------------------------------------------------------- writers

def _py2_str(data: bytes) -> bytes:
    return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING: a Python 2 str


def _py2_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def py2_pickle_body(obj) -> bytes:
    """Opcodes of ``obj`` (dict, list, int, str, bytes, uint8 array) as Python 2 wrote them."""
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2_pickle_body(k) + py2_pickle_body(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(py2_pickle_body(v) for v in obj) + b"e"
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)  # BININT
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin1"))
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        # _reconstruct(ndarray, (0,), 'b'), then __setstate__((1, shape, dtype('u1'), False, raw))
        dtype = (_py2_global("numpy", "dtype") + b"(" + _py2_str(b"u1") + b"K\x00K\x01tR"
                 + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        shape = b"(" + b"".join(py2_pickle_body(int(s)) for s in obj.shape) + b"t"
        return (_py2_global("numpy.core.multiarray", "_reconstruct") + b"(" + _py2_global("numpy", "ndarray")
                + b"K\x00\x85" + _py2_str(b"b") + b"tR" + b"(K\x01" + shape + dtype + b"\x89"
                + _py2_str(np.ascontiguousarray(obj).tobytes()) + b"tb")
    raise TypeError(type(obj))


def write_pickle(path: Path, obj: dict, protocol) -> None:
    """``protocol`` "py2": as the official files; an int: this Python's pickle (user-made files)."""
    path.write_bytes(b"\x80\x02" + py2_pickle_body(obj) + b"." if protocol == "py2"
                     else pickle.dumps(obj, protocol=protocol))


def random_images(n: int, side: int, seed: int) -> np.ndarray:
    """(n, side, side, 3) uint8 images that no transpose or channel swap leaves unchanged."""
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072): the red plane, then green, then blue, each row by row."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, protocol="py2", per_batch=4, n_test=3):
    """cifar-10-batches-py with five training batches and a test batch; returns the written
    (train images, train labels, test images, test labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = random_images(5 * per_batch + n_test, 32, seed=1)
    labels = [int(v) for v in np.random.default_rng(2).integers(0, 10, len(images))]
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rows = slice(k * per_batch, (k + 1) * per_batch) if k < 5 else slice(5 * per_batch, None)
        write_pickle(folder / name, {"batch_label": f"batch {k}", "labels": labels[rows],
                                     "data": cifar_rows(images[rows]),
                                     "filenames": [f"img_{i}.png" for i in range(len(labels[rows]))]}, protocol)
    write_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072,
                                           "num_cases_per_batch": per_batch}, protocol)
    cut = 5 * per_batch
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def write_cifar100(root: Path, n_train=6, n_test=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images = random_images(n_train + n_test, 32, seed=3)
    fine = [99, 0, 57, 3, 64, 12, 42, 7]
    coarse = [f % 20 for f in fine]  # differ from the fine labels: reading the wrong key shows
    for name, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        write_pickle(folder / name, {"filenames": ["x.png"] * len(fine[rows]), "batch_label": name,
                                     "fine_labels": fine[rows], "coarse_labels": coarse[rows],
                                     "data": cifar_rows(images[rows])}, "py2")
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                                   "coarse_label_names": [f"coarse{k}" for k in range(20)]}, "py2")
    return images, fine


def stl10_bytes(images: np.ndarray) -> bytes:
    """(N, 96, 96, 3) -> STL-10's layout: per image, per channel, the 96x96 plane column by column."""
    return images.transpose(0, 3, 2, 1).tobytes()


def write_stl10(root: Path, n_train=5, n_test=3, n_unlabeled=7):
    """stl10_binary with every file; returns {part: images} and {part: labels in 1..10}."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {"train": random_images(n_train, 96, 4), "test": random_images(n_test, 96, 5),
              "unlabeled": random_images(n_unlabeled, 96, 6)}
    labels = {"train": [10, 1, 4, 7, 2][:n_train], "test": [3, 10, 1][:n_test]}
    for part, imgs in images.items():
        (folder / f"{part}_X.bin").write_bytes(stl10_bytes(imgs))
    for part, ys in labels.items():
        (folder / f"{part}_y.bin").write_bytes(bytes(ys))
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return images, labels


def pixels(dataset, index: int) -> np.ndarray:
    image, _ = dataset[index]
    assert image.mode == "RGB"
    return np.asarray(image)


# ----------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("protocol", ["py2", 4, 5])
def test_cifar10_pixels_labels_and_classes_match_what_was_written(tmp_path, protocol):
    """Kills: planes read as (H, W, C) or transposed; batches out of order; test batch for "val";
    a module path of numpy's array rebuilder missing from the unpickler's allow-list."""
    train_images, train_labels, test_images, test_labels = write_cifar10(tmp_path, protocol)
    train = datasets.build_dataset("cifar10", tmp_path, "train")
    val = datasets.build_dataset("cifar10", tmp_path, "val")
    assert (len(train), len(val)) == (20, 3)
    assert train.classes == CIFAR10_NAMES and train.num_classes == val.num_classes == 10
    for i in (0, 5, 13, 19):  # first, second, fourth and last batch
        assert np.array_equal(pixels(train, i), train_images[i]) and train[i][1] == train_labels[i]
    assert np.array_equal(pixels(val, 2), test_images[2]) and val[2][1] == test_labels[2]
    assert train.targets.tolist() == train_labels


def test_cifar100_uses_the_fine_labels(tmp_path):
    """Kills: reading coarse_labels, or the coarse class names."""
    images, fine = write_cifar100(tmp_path)
    train = datasets.build_dataset("cifar100", tmp_path, "train")
    val = datasets.build_dataset("cifar100", tmp_path, "val")
    assert (len(train), len(val)) == (6, 2) and train.num_classes == 100
    assert train.targets.tolist() == fine[:6] and val.targets.tolist() == fine[6:]
    assert train.classes[99] == "fine99"
    assert np.array_equal(pixels(val, 1), images[7])


def test_data_dir_may_be_the_official_folder_itself(tmp_path):
    """Kills: only looking for <data-dir>/cifar-10-batches-py."""
    train_images, _, _, _ = write_cifar10(tmp_path)
    train = datasets.build_dataset("cifar10", tmp_path / "cifar-10-batches-py", "train")
    assert np.array_equal(pixels(train, 7), train_images[7])


# ----------------------------------------------------------------------------- STL-10

def test_stl10_reads_column_major_images_and_labels_1_to_10(tmp_path):
    """Kills: planes read row-major (a transposed image); labels not shifted to 0..9."""
    images, labels = write_stl10(tmp_path)
    train = datasets.build_dataset("stl10", tmp_path, "train")
    val = datasets.build_dataset("stl10", tmp_path, "val")
    assert (len(train), len(val)) == (5, 3) and train.num_classes == 10 and train.classes == STL10_NAMES
    assert np.array_equal(pixels(train, 3), images["train"][3]) and train[3][1] == labels["train"][3] - 1
    assert np.array_equal(pixels(val, 0), images["test"][0]) and val[0][1] == 2
    assert train.targets.tolist() == [9, 0, 3, 6, 1]


def test_stl10_pretraining_set_is_train_plus_unlabeled(tmp_path):
    """Kills: dropping the unlabelled part; unlabelled images given a class; a labelled-looking
    num_classes for a set with unlabelled images; the unlabelled part added to the test set."""
    images, labels = write_stl10(tmp_path)
    pretrain = datasets.build_dataset("stl10", tmp_path, "train", with_unlabeled=True)
    assert len(pretrain) == 5 + 7 and pretrain.num_classes == 0
    assert pretrain.targets.tolist() == [y - 1 for y in labels["train"]] + [-1] * 7
    assert np.array_equal(pixels(pretrain, 4), images["train"][4])
    assert np.array_equal(pixels(pretrain, 5 + 6), images["unlabeled"][6]) and pretrain[11][1] == -1
    assert len(datasets.build_dataset("stl10", tmp_path, "val", with_unlabeled=True)) == 3


def test_stl10_images_stay_on_disk_when_sent_to_workers(tmp_path):
    """Kills: pickling the memory maps (each loader worker would receive all 2.7 GB)."""
    images, _ = write_stl10(tmp_path)
    pretrain = datasets.build_dataset("stl10", tmp_path, "train", with_unlabeled=True)
    pixels(pretrain, 0)  # opens the maps in this process
    blob = pickle.dumps(pretrain)
    assert len(blob) < 96 * 96 * 3  # less than one image: no pixels travel
    assert np.array_equal(pixels(pickle.loads(blob), 9), images["unlabeled"][4])


def test_malformed_stl10_files_are_refused(tmp_path):
    """Kills: accepting label 0 (it would silently become 'unlabelled'), or a truncated image file."""
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 0, 4, 5]))
    with pytest.raises(ValueError, match="train_y.bin holds labels outside 1..10"):
        datasets.build_dataset("stl10", tmp_path, "train")
    (folder / "test_X.bin").write_bytes((folder / "test_X.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="test_X.bin is not a positive whole number"):
        datasets.build_dataset("stl10", tmp_path, "val")


# ----------------------------------------------------------------------------- missing files, download

@pytest.mark.parametrize("name, folder, expected", [
    ("cifar10", "cifar-10-batches-py", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
                                       "batches.meta not found"),
    ("cifar100", "cifar-100-python", "train, meta not found"),
    ("stl10", "stl10_binary", "train_X.bin, train_y.bin, class_names.txt, unlabeled_X.bin not found"),
])
def test_missing_files_are_named_with_their_folder_and_download(tmp_path, name, folder, expected):
    """Kills: a message without the files, their folder or --download."""
    with pytest.raises(FileNotFoundError) as err:
        datasets.build_dataset(name, tmp_path, "train", with_unlabeled=True)
    message = str(err.value)
    assert expected in message and f"{tmp_path / folder}" in message and "--download" in message
    assert "\n" not in message


def test_pretraining_script_reports_missing_files_in_one_line(tmp_path):
    """Kills: a traceback (error not turned into a user error) or a message without the files."""
    proc = subprocess.run([sys.executable, "main_vicregl.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--exp-dir", str(tmp_path / "exp"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data_batch_1" in lines[0] and "cifar-10-batches-py" in lines[0] and "--download" in lines[0]


def test_evaluation_script_reports_missing_files_in_one_line(tmp_path, capsys):
    """Kills: evaluate.py without --download or the new --dataset choices, or a traceback."""
    import evaluate
    args = evaluate.get_args_parser().parse_args(["--dataset", "stl10", "--data-dir", str(tmp_path), "--exp-dir",
                                                  str(tmp_path / "exp"), "--device", "cpu"])
    assert args.download is False
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "train_X.bin, train_y.bin, class_names.txt not found" in err and "--download" in err


@pytest.mark.parametrize("script", ["main_vicregl", "evaluate"])
@pytest.mark.parametrize("flag", [[], ["--download"]])
def test_download_flag_reaches_the_dataset(tmp_path, monkeypatch, capsys, script, flag):
    """Kills: a script that does not pass --download on to the dataset (or always does)."""
    module = __import__(script)
    calls = []
    monkeypatch.setattr(public_datasets, "download_public", lambda name, root: calls.append((name, root)))
    args = module.get_args_parser().parse_args(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--exp-dir",
                                                str(tmp_path / "exp"), "--device", "cpu", *flag])
    with pytest.raises(SystemExit) as exit_info:  # the fake download leaves the files missing
        module.main(args)
    assert exit_info.value.code == 2 and "train, meta not found" in capsys.readouterr().err
    assert calls == ([("cifar100", tmp_path)] if flag else [])


def test_download_fetches_the_official_archive_only_when_asked(tmp_path, monkeypatch):
    """Kills: ignoring download=True; downloading without it; the wrong archive or folder."""
    import torchvision.datasets.utils as tv_utils
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, Path(download_root), filename, md5))
        write_cifar10(Path(download_root))  # what extracting the archive leaves

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    with pytest.raises(FileNotFoundError):
        datasets.build_dataset("cifar10", tmp_path / "data", "train")
    assert calls == []
    train = datasets.build_dataset("cifar10", tmp_path / "data", "train", download=True)
    assert len(train) == 20 and datasets.build_dataset("cifar10", tmp_path / "data", "val", download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", tmp_path / "data",
                      "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]  # once: then present


def test_failed_download_is_one_line_naming_the_archive(tmp_path, monkeypatch):
    """Kills: a network error escaping as a traceback instead of a user-facing message."""
    import urllib.error
    import torchvision.datasets.utils as tv_utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError) as err:
        datasets.build_dataset("stl10", tmp_path, "train", download=True)
    message = str(err.value)
    assert "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz" in message and str(tmp_path) in message
    assert "name resolution" in message and "\n" not in message


# ----------------------------------------------------------------------------- restricted unpickling

class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_naming_other_globals_are_refused_without_running(tmp_path):
    """Kills: an unpickler that resolves any global (the command would run and the file load)."""
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _RunsACommand(marker), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: refused to load (posix|nt|os)\.system"):
        datasets.build_dataset("cifar10", tmp_path, "train")
    assert not marker.exists()


# ----------------------------------------------------------------------------- end to end

def test_stl10_pretraining_run_uses_unlabeled_images_without_the_probe(tmp_path):
    """Kills: the script not passing with_unlabeled (1 step an epoch instead of 3), or training the
    online probe on unlabelled images. The k-NN bank is the labelled training set."""
    write_stl10(tmp_path)
    exp = tmp_path / "exp"
    cmd = [sys.executable, "main_vicregl.py", "--dataset", "stl10", "--data-dir", str(tmp_path),
           "--arch", "resnet_test", "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "1",
           "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2",
           "--mlp", "16-16", "--maps-mlp", "8-8", "--batch-size", "4", "--num-workers", "0",
           "--log-tensors-interval", "0", "--device", "cpu", "--epochs", "1", "--warmup-epochs", "0",
           "--knn", "--knn-k", "3", "--exp-dir", str(exp)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l.split("Val: ")[-1]) for l in (exp / "stats.txt").read_text().splitlines()[1:]
             if "{" in l]
    steps = [l for l in lines if "st" in l]
    assert [l["st"] for l in steps] == [0, 1, 2]  # (5 train + 7 unlabeled) // 4
    assert not any("cls_l" in l or "top1" in l for l in steps)
    knn = [l for l in lines if "knn_top1" in l]
    assert knn and all(any(l["knn_top1"] == pytest.approx(100 * j / 3, abs=1e-3) for j in range(4))
                       for l in knn)  # the queries are the 3 test images
