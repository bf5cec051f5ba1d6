"""Hostile dataset files and folders: each is refused or skipped with one line, runs no code, reads
nothing outside the data folder, never hangs and takes memory in proportion to its real size.

Every hostile file is made here, byte by byte (pickle opcodes spelled out, PNG chunks written by
hand): nothing binary is committed. Cases that crashed, hung or looped before their fix run in a
subprocess with a timeout, so that a regression fails the test instead of taking the suite down.
"""
import contextlib
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import builtin_data
import datasets
import public_datasets
import shared_images
import visualize
from pictures import curves
from test_public_datasets import write_cifar10

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``code`` run by this Python in the repository root; a hang fails the test after ``timeout`` s."""
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (a hang)")


# ----------------------------------------------------------------------------- pickle opcodes

def s(data) -> bytes:
    """BINSTRING: Python 2's str, as the official batches hold their names and bytes."""
    data = data.encode("latin1") if isinstance(data, str) else data
    return b"T" + struct.pack("<i", len(data)) + data


def n(value: int) -> bytes:
    """An int opcode (BININT1, BININT or LONG1, as the pickler picks)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


NONE_STATE = b"NNN" + n(-1) + n(-1) + n(0)  # no subarray, names or fields; size, alignment, flags


def dtype(code: str, state: bytes = s("|") + NONE_STATE) -> bytes:
    """numpy.dtype(code, False, True), then BUILD with (3, <state>), as numpy pickles a dtype."""
    return glob("numpy", "dtype") + tup(s(code), n(0), n(1)) + b"R" + tup(n(3), state) + b"b"


def array(shape, dtype_ops: bytes, raw_ops: bytes, reconstruct_shape=(0,)) -> bytes:
    """numpy's _reconstruct(ndarray, (0,), 'b'), then BUILD with (1, shape, dtype, False, raw)."""
    reconstruct = tup(glob("numpy", "ndarray"), tup(*map(n, reconstruct_shape)), s("b"))
    return (glob("numpy.core.multiarray", "_reconstruct") + reconstruct + b"R"
            + tup(n(1), tup(*map(n, shape)), dtype_ops, b"\x89", raw_ops) + b"b")


def batch(data_ops: bytes, labels_ops: bytes = b"]") -> bytes:
    """A protocol-2 pickle of {'data': <data_ops>, 'labels': <labels_ops>}."""
    return b"\x80\x02}(" + s("data") + data_ops + s("labels") + labels_ops + b"u."


def overlapping_dtype(code: str = "V8", flags: int = 63, first: str = "O8") -> bytes:
    """A dtype whose state lays a field 'a' (an object) and an int64 field 'b' at offset 0."""
    fields = (b"}(" + s("a") + tup(dtype(first, s("|") + b"NNN" + n(-1) + n(-1) + n(63)), n(0))
              + s("b") + tup(dtype("i8", s("<") + NONE_STATE), n(0)) + b"u")
    return dtype(code, s("|") + b"N" + tup(s("a"), s("b")) + fields + n(8) + n(8) + n(flags))


ADDRESS = 0x41414141
# (None, ADDRESS) per element: numpy stores the pointer of None, then the integer over it.
OVERLAPPING_BATCH = batch(array((1,), overlapping_dtype(), b"](" + tup(b"N", n(ADDRESS)) + b"e"))


def shared_tuple_key(depth: int) -> bytes:
    """{t: 1} with t = (t', t'), t' = (t'', t''), ... depth times: 2**depth steps to hash."""
    ops = b"\x80\x02}" + b")q\x000"  # {} and the empty tuple in memo 0
    ops += b"h\x00h\x00\x86q\x000" * depth  # memo 0 = (memo 0, memo 0)
    return ops + b"h\x00" + n(1) + b"s."


HOSTILE_BATCHES = {
    # (a) the fields, offsets and flags of a dtype, as its state gives them
    "object_over_int_fields": (OVERLAPPING_BATCH, r"refused dtype 'V8'"),
    "fields_set_on_a_plain_code": (batch(array((1,), overlapping_dtype("u1", 0, "i8"), s(struct.pack("<q", ADDRESS)))),
                                   r"refused dtype state: only plain numbers"),
    "object_dtype": (batch(array((1,), dtype("O8"), b"](Ne")), r"refused dtype 'O8'"),
    "subarray_dtype": (batch(array((1,), dtype("u1", s("|") + tup(dtype("u1"), tup(n(3))) + b"NN" + n(-1) + n(-1)
                                                + n(0)), s(b"xyz"))), r"refused dtype state"),
    "structured_code": (batch(array((1,), dtype("i4,O"), s(b"12345678"))), r"refused dtype 'i4,O'"),
    # (c) sizes that the file's bytes do not back
    "2**40_bytes": (batch(array((2 ** 40,), dtype("u1"), s(b""), reconstruct_shape=(2 ** 40,))),
                    r"an array of shape \(1099511627776,\) and type uint8 needs 1099511627776 bytes, the file holds 0"),
    "ndarray_called": (batch(glob("numpy", "ndarray") + tup(tup(n(2 ** 40))) + b"R"),
                       r"numpy.ndarray may only be named as the class of _reconstruct"),
    "list_for_bytes": (batch(array((2,), dtype("u1"), b"](" + n(1) + n(2) + b"e")),
                       r"refused array data of type list: expected bytes"),
    "bytes8_beyond_the_end": (b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"abc",
                              r"expected 1099511627776 bytes in a bytes8, but only 3 remain"),
    "memo_index_4e9": (b"\x80\x02}r" + struct.pack("<I", 2 ** 32 - 2) + b".", r"memo index 4294967294 out of order"),
    # a dict key that takes 2**23 steps to hash (2**40 would never finish)
    "shared_tuple_key": (shared_tuple_key(23), r"its tuples, with their shared references expanded, exceed"),
}


@pytest.fixture(scope="module")
def hostile_batch_messages(tmp_path_factory):
    """{case: the error of load_array_pickle} for every HOSTILE_BATCHES file, read in one subprocess:
    before the fix, some of them crashed the interpreter (a case it did not reach is missing)."""
    folder = tmp_path_factory.mktemp("hostile")
    for name, (data, _) in HOSTILE_BATCHES.items():
        (folder / name).write_bytes(data)
    code = f"""
import json, sys
import public_datasets
for name in {list(HOSTILE_BATCHES)!r}:
    try:
        public_datasets.load_array_pickle({str(folder)!r} + "/" + name)
        result = "loaded"
    except ValueError as e:
        result = str(e)
    print(json.dumps([name, result]), flush=True)
"""
    proc = run_python(code, timeout=120)
    return dict(json.loads(line) for line in proc.stdout.splitlines()), proc, folder


@pytest.mark.parametrize("case", list(HOSTILE_BATCHES))
def test_hostile_cifar_pickles_are_refused_in_one_line_before_any_array_exists(hostile_batch_messages, case):
    """Kills: numpy.dtype / ndarray.__setstate__ / _reconstruct / _frombuffer handed to the file unchecked
    (a segmentation fault, an object at an address the file chose, a 1 TiB allocation, an
    uninitialised array), a length or memo index beyond the file, or a key whose hash never ends."""
    messages, proc, folder = hostile_batch_messages
    assert case in messages, f"the reader died before this case (exit {proc.returncode}): {proc.stderr[-2000:]}"
    message = messages[case]
    assert message.startswith(f"cannot read {folder / case}: ") and "\n" not in message
    assert re.search(HOSTILE_BATCHES[case][1], message), message


def test_pretraining_on_a_batch_with_an_object_field_over_an_integer_exits_2(tmp_path):
    """Kills: the dtype's state taken from the file: main_vicregl.py died with a segmentation fault."""
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(OVERLAPPING_BATCH)
    proc = subprocess.run([sys.executable, "main_vicregl.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--exp-dir", str(tmp_path / "exp"), "--device", "cpu", "--arch", "resnet_test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read ") and "data_batch_1" in lines[0]
    assert "refused dtype 'V8'" in lines[0]


def _nested_shared_list(depth: int) -> bytes:
    """[x, x] with x = [y, y], ... depth times, then [1]: 2**depth integers once expanded."""
    ops = b"](" + n(1) + b"eq\x000"  # memo 0 = [1]
    ops += b"](h\x00h\x00eq\x000" * depth  # memo 0 = [memo 0, memo 0]
    return ops + b"h\x00"


@pytest.mark.parametrize("labels, expected", [
    (_nested_shared_list(20), "expected 'labels' to be a list of integers, found list"),
    (b"](" + n(1) + s("x") + b"e", "expected 'labels' to be a list of integers, found list"),
    (b"](" + n(1) + n(2 ** 70) + b"e", "expected 'labels' to be a list of integers, found list"),
    (b"](" + n(1) + n(2) + b"e", "1 images in 'data' but 2 'labels'"),
], ids=["shared_lists_20_deep", "a_string", "over_64_bits", "one_too_many"])
def test_labels_are_checked_before_any_conversion(tmp_path, labels, expected):
    """Kills: np.asarray on the labels as found: shared lists nested 24 deep took 11 s and 1 GB before an
    error (here 20 deep: 2**20 integers), a label over 64 bits an OverflowError traceback."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(batch(array((1, 3072), dtype("u1"), s(bytes(3072))), labels))
    with pytest.raises(ValueError) as err:
        public_datasets.read_cifar_batch(path, "labels")
    assert str(err.value) == f"{path}: {expected}"


def test_class_names_must_be_a_list_of_strings(tmp_path):
    """Kills: str() of every entry of label_names (a shared nested list expands as labels do)."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(b"\x80\x02}(" + s("label_names") + _nested_shared_list(20) + b"u.")
    with pytest.raises(ValueError, match=r"batches.meta: expected 'label_names' to be a list of names, found list$"):
        datasets.build_dataset("cifar10", tmp_path, "val")


def test_plain_arrays_of_every_protocol_still_load(tmp_path):
    """Kills: a checked reader that refuses what numpy writes for plain arrays (pickle protocols 3 to 5,
    C and Fortran order, other byte orders)."""
    for protocol in (3, 4, 5):
        for a in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(6, dtype=">i4").reshape(2, 3),
                  np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), np.zeros((0, 5), bool)):
            path = tmp_path / f"p{protocol}"
            path.write_bytes(pickle.dumps({"a": a, "t": (1, ("x", 2))}, protocol=protocol))
            b = public_datasets.load_array_pickle(path)["a"]
            assert type(b) is np.ndarray and b.shape == a.shape and np.array_equal(b, a), (protocol, a.dtype)


# ----------------------------------------------------------------------------- image folders

def png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG, all black, written row by row: a few KB for any size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def small_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    return path


def test_fifos_and_links_to_folders_above_never_hang_the_listing_or_the_reading(tmp_path):
    """Kills: open() of a FIFO named b.jpg (it waits for a writer forever), at listing time and for a
    path that a .npy list names; os.walk(followlinks=True) over three links to '.' (never ends); a
    segmentation label that is a FIFO."""
    folder = tmp_path / "photos"
    small_image(folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")
    for k in range(3):
        os.symlink(".", folder / f"loop{k}")
    small_image(folder / "sub" / "c.png")
    os.symlink("..", folder / "sub" / "up")
    np.save(tmp_path / "train_images.npy", np.array([str(folder / "b.jpg"), str(folder / "a.jpg")]))
    np.save(tmp_path / "train_labels.npy", np.array([0, 1]))
    os.mkfifo(tmp_path / "label.png")
    code = f"""
import json, sys
import datasets
from segmentation.datasets import SegmentationFiles
out = {{}}
listed = datasets.UnlabelledFolderDataset({str(folder)!r})
out["listed"] = [p for p, _ in listed.samples]
out["listed_again"] = [str(p) for p in datasets._list_images(datasets.Path({str(folder)!r}))]
numpy_list = datasets.NumpyListDataset({str(tmp_path)!r}, "train")
image, label = numpy_list[0]
out["npy"] = [image.size, label, numpy_list.num_unreadable]
pairs = SegmentationFiles([({str(folder / "a.jpg")!r}, {str(tmp_path / "label.png")!r})], 2, ["a", "b"])
try:
    pairs[0]
except OSError as e:
    out["label"] = str(e)
print(json.dumps(out))
"""
    proc = run_python(code, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["listed"] == [str(folder / "a.jpg"), str(folder / "sub" / "c.png")] == out["listed_again"]
    assert out["npy"] == [[8, 8], 1, 1]  # the FIFO skipped, the next sample in its place
    assert out["label"].startswith("cannot read") and out["label"].endswith("'): not a regular file but a FIFO")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping {folder / 'b.jpg'}: not a regular file but a FIFO"] * 2 + [
        f"warning: skipping unreadable image {folder / 'b.jpg'} (not a regular file but a FIFO)"], proc.stderr


def test_images_over_the_pixel_limit_are_skipped_with_one_warning(tmp_path, capsys, monkeypatch):
    """Kills: an image between PIL's limit and twice it accepted with only a warning and decoded (a
    10000x10000 PNG of a few KB takes ~480 MB per decode), and a limit that the flag does not set."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    folder = tmp_path / "photos"
    small_image(folder / "a.png")
    (folder / "b.png").write_bytes(png(1200, 1000))  # 1.2 megapixels: above 1, below twice 1
    datasets.set_max_image_pixels(1_000_000)
    dataset = datasets.UnlabelledFolderDataset(folder)
    image, _ = dataset[1]
    assert image.size == (8, 8) and dataset.num_unreadable == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping unreadable image {folder / 'b.png'} (1200000 pixels, more than "
                   f"--max-image-pixels 1000000)"]
    huge = tmp_path / "huge.png"
    huge.write_bytes(png(10000, 10000))
    assert huge.stat().st_size < 20000
    datasets.set_max_image_pixels(datasets.DEFAULT_MAX_IMAGE_PIXELS)
    with open(huge, "rb") as f, pytest.raises(datasets.ImageTooLarge, match=r"^100000000 pixels, more than "
                                                                            r"--max-image-pixels 40000000$"):
        datasets.open_image(f)
    with pytest.raises(ValueError, match="--max-image-pixels must be positive"):
        datasets.set_max_image_pixels(0)


def test_segmentation_training_skips_images_over_the_pixel_limit(tmp_path, capsys, monkeypatch):
    """Kills: segmentation/datasets.py opening files with a bare Image.open (no pixel limit)."""
    from segmentation.datasets import SegmentationFiles
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    (tmp_path / "big.png").write_bytes(png(1200, 1000))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "mask.png")
    small_image(tmp_path / "ok.png")
    mask = tmp_path / "mask.png"
    files = SegmentationFiles([(tmp_path / "big.png", mask), (tmp_path / "ok.png", mask)], 2, ["a", "b"])
    files.skip_unreadable = True
    image, mask = files[0]
    assert image.size == (8, 8) and files.num_skipped == 1
    assert "1200000 pixels, more than --max-image-pixels 1000000" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["main_vicregl", "evaluate", "segmentation.train", "demo"])
def test_every_script_that_reads_image_folders_has_the_pixel_limit_flag(script, monkeypatch, capsys):
    """Kills: a script without --max-image-pixels, without its help, or that does not apply it."""
    module = __import__(script, fromlist=["_"])
    parser = module.get_args_parser()
    assert "--max-image-pixels" in parser.format_help()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    if script == "demo":
        # --images 1 stops the demo at its next check: a demo that ignored the limit would not run for minutes
        monkeypatch.setattr(sys, "argv", ["demo.py", "--max-image-pixels", "0", "--images", "1"])
        with pytest.raises(SystemExit) as exit_info:
            datasets.utils.exit_on_user_error(module.main)()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == "error: --max-image-pixels must be positive, got 0"
        return
    args = parser.parse_args(["--arch", "resnet_test", "--max-image-pixels", "1234"]
                             + (["--dataset", "builtin"] if script == "segmentation.train" else []))
    assert parser.parse_args([]).max_image_pixels == datasets.DEFAULT_MAX_IMAGE_PIXELS
    check = {"main_vicregl": lambda: module.check_args(args, 1), "evaluate": lambda: module.check_args(args),
             "segmentation.train": lambda: module.resolve_args(args)}[script]
    with contextlib.suppress(datasets.utils.UserError):  # about other flags, checked after this one
        check()
    assert Image.MAX_IMAGE_PIXELS == 1234


# ----------------------------------------------------------------------------- --in-memory

def _shared_folders(tmp_path, monkeypatch):
    first, second = tmp_path / "shm", tmp_path / "tmp"
    first.mkdir(), second.mkdir()
    monkeypatch.setattr(shared_images, "SHARED_FOLDERS", (str(first), str(second)))
    ours = second / "z"
    ours.write_bytes(b"ours")
    ours.chmod(0o600)
    return first, ours


@pytest.mark.parametrize("plant", ["other_owner", "world_writable", "other_owners_link"])
def test_a_file_planted_under_the_shared_name_is_never_mapped(tmp_path, monkeypatch, plant):
    """Kills: find_shared taking the first file of that name, whoever made it: the other processes then
    trained on another user's images (or on what they can still write into the file)."""
    first, ours = _shared_folders(tmp_path, monkeypatch)
    planted = first / "z"
    if plant != "world_writable" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    if plant == "other_owners_link":
        os.symlink(ours, planted)
        os.lchown(planted, 12345, 12345)
    else:
        planted.write_bytes(b"evil")
        planted.chmod(0o600)
        if plant == "other_owner":
            os.chown(planted, 12345, 12345)
        else:
            planted.chmod(0o666)  # chmod after creation: the umask would mask it
    assert shared_images.find_shared("z") == str(ours)
    ours.unlink()
    expected = (f"can be written by other users (mode 666)" if plant == "world_writable" else
                f"belongs to user 12345, not to this user ({os.getuid()})")
    with pytest.raises(OSError) as err:
        shared_images.find_shared("z")
    assert str(err.value) == f"refused {planted} {expected}: not the images of this run's first process"


def test_the_first_processs_own_shared_file_is_still_found(tmp_path, monkeypatch):
    """Kills: a check that refuses the first process's own file (a link into /proc to a 0600 file)."""
    first, _ = _shared_folders(tmp_path, monkeypatch)
    memory = shared_images.InMemoryImages(builtin_data.BuiltinDataset("train", 2, image_size=8), None, share_as="w")
    try:
        assert shared_images.find_shared("w") == str(first / "w")
    finally:
        memory.unshare()


# ----------------------------------------------------------------------------- visualize curves

def test_stats_lines_with_huge_or_deeply_nested_values_are_skipped(tmp_path, capsys):
    """Kills: json.loads with no bounds: a 400-digit integer (OverflowError in float()), a 5000-digit one
    (ValueError: integer string conversion), 100,000 nested brackets (RecursionError), 1e999."""
    stats = tmp_path / "stats.txt"
    lines = ["main_vicregl.py --dataset builtin",
             json.dumps({"ep": 0, "st": 0, "l": 3.0}),
             '{"ep": 0, "st": 1, "l": 1%s}' % ("0" * 400),
             '{"ep": 0, "st": 2, "l": 1%s}' % ("0" * 5000),
             '{"ep": 0, "st": 3, "l": %s1%s}' % ("[" * 100000, "]" * 100000),
             '{"ep": 0, "st": 4, "l": 1e999}',
             '{"ep": 0, "st": 1%s, "l": 1}' % ("0" * 30),
             json.dumps({"ep": 0, "st": 5, "l": 2.0})]
    stats.write_text("\n".join(lines) + "\n")
    run = curves.read_stats(str(stats))
    assert run.series["l"] == ([0, 5], [3.0, 2.0]) and run.skipped == 5 and run.first_skipped == 3
    pytest.importorskip("matplotlib")  # reading needs no matplotlib, drawing the curves does
    visualize.main(["curves", str(stats), "--keys", "l", "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {stats}: skipped 5 line(s) that are not a flat JSON object of numbers and strings "
                   f"(the first: line 3)"]
    assert (tmp_path / "c.png").is_file()
