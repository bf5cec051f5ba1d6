"""Failed writes on a real small filesystem: a full disk or a read-only folder is one line, loses nothing,
and the same command goes on once there is room; planted links are never written through.

Each test mounts its own tmpfs (root only: CI runs as root; elsewhere they skip) sized from what the
scripts write, so that the disk fills exactly where the test means it to. tests/test_safety.py keeps
the cases a real filesystem cannot make (a patched writer failing at a chosen call).
"""
import errno
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import evaluate
import export
import utils

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096  # a tmpfs counts whole pages

PRETRAIN_RUN = ["main_vicregl.py", "--dataset", "builtin", "--builtin-images", "32", "--builtin-size", "32", "--arch",
                "resnet_test", "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2",
                "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2",
                "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size", "16", "--num-workers", "0",
                "--log-tensors-interval", "0", "--device", "cpu", "--epochs", "2", "--warmup-epochs", "1"]
EVAL_RUN = ["evaluate.py", "--dataset", "builtin", "--builtin-size", "32", "--builtin-images", "32",
            "--builtin-val-images", "16", "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test",
            "--batch-size", "16", "--workers", "0", "--device", "cpu", "--epochs", "2"]
SEG_RUN = ["segmentation/train.py", "--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu", "--workers",
           "0", "--builtin-size", "32", "--builtin-images", "16", "--builtin-val-images", "4", "--batch-size", "4",
           "--iters", "8", "--eval-interval", "0", "--print-freq", "4", "--checkpoint-interval", "4"]


# ----------------------------------------------------------------------------- helpers

def _cannot_mount() -> str:
    if not sys.platform.startswith("linux"):
        return "a tmpfs needs Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs the tests as root)"
    return ""


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(kib)``: a new empty tmpfs of ``kib`` KiB under tmp_path, unmounted after the test (also
    when it fails). Skips the test where tmpfs cannot be mounted."""
    reason = _cannot_mount()
    if reason:
        pytest.skip(reason)
    mounted = []

    def mount(kib: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)  # still busy: detach it


def remount(point: Path, options: str) -> None:
    """``options``: 'ro', 'rw', 'size=2048k'."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)


def pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / PAGE)


def kib(n_pages: int) -> int:
    return n_pages * PAGE // 1024


def fill(folder: Path) -> Path:
    """Take every free block of ``folder``'s filesystem with a ballast file; returns the ballast."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(PAGE))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return ballast


def run(*cmd):
    return subprocess.run([sys.executable, *[str(c) for c in cmd]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def one_line_error(proc, after_warnings: bool = False) -> str:
    """The refusal: exit status 2 and stderr one line 'error: ...', no traceback (``after_warnings``:
    the script's 'warning: ...' lines may come before it)."""
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    before = [l for l in lines[:-1] if not (after_warnings and l.startswith("warning: "))]
    assert not before and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if ".tmp." in p.name]


# ----------------------------------------------------------------------------- the writers, one by one

def test_full_disk_at_save_atomic_is_one_line_and_keeps_the_previous_file(tmpfs):
    """torch.save's zip writer turns the full disk into a RuntimeError (with the OSError as context)."""
    fs = tmpfs(64)
    path = fs / "model.pth"
    utils.save_atomic({"epoch": 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(utils.UserError) as caught:
        utils.save_atomic({"epoch": 2, "w": torch.zeros(40_000)}, str(path))  # 160 kB: does not fit
    assert str(caught.value) == (
        f"cannot write {path}: No space left on device (0 bytes free in {fs}); the previous model.pth (if any) "
        f"is intact. Make room or fix the folder, then run the same command again to continue from the last "
        f"checkpoint")
    assert path.read_bytes() == before and os.listdir(fs) == ["model.pth"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # as readable as a plain open made it


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_failed_write_without_errno_is_told_by_the_free_space(tmpfs):
    """A writer that reports the full disk with no OSError anywhere in its error: statvfs tells."""
    fs = tmpfs(64)
    path = fs / "model.pth"

    def write(obj, f):
        try:
            while True:
                os.write(f.fileno(), bytes(PAGE))
        except OSError:
            pass
        raise RuntimeError("unexpected pos 1460608 vs 1460496")  # outside the handler: no context

    with pytest.raises(utils.UserError, match=rf"^cannot write {path}: No space left on device \(0 bytes free in "
                                              rf"{fs}\); the previous"):
        utils.save_atomic(None, str(path), write=write)
    assert os.listdir(fs) == []


def test_the_cause_is_found_behind_a_runtime_error_and_bugs_stay_tracebacks(tmp_path):
    """The errno of an OSError that a RuntimeError was raised while handling (as torch.save's zip
    writer does) is the cause, on any disk; a RuntimeError with no failed write behind it (here on a
    roomy disk) is a bug in what was saved and keeps its traceback."""
    path = tmp_path / "model.pth"

    def quota(obj, f):
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def bug(obj, f):
        raise RuntimeError("cannot pickle this")

    with pytest.raises(utils.UserError, match=rf"^cannot write {path}: Disk quota exceeded; the previous"):
        utils.save_atomic(None, str(path), write=quota)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        utils.save_atomic(None, str(path), write=bug)
    assert os.listdir(tmp_path) == []


def test_read_only_folder_is_one_line_for_checkpoints_and_the_log(tmpfs):
    fs = tmpfs(64)
    path = fs / "model.pth"
    utils.save_atomic({"epoch": 1}, str(path))
    remount(fs, "ro")
    with pytest.raises(utils.UserError, match=rf"^cannot write {path}: Read-only file system; the previous "
                                              rf"model.pth \(if any\) is intact\. Make room"):
        utils.save_atomic({"epoch": 2}, str(path))
    with pytest.raises(utils.UserError, match=rf"^cannot write {fs / 'stats.txt'}: Read-only file system\. "):
        utils.JsonLogger(fs, enabled=True)
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(fs) == ["model.pth"]


def test_full_disk_at_stats_txt_leaves_no_torn_line(tmpfs, capsys):
    """The line that does not fit is not written in part: the log stays as it was, so that the lines of
    the next run do not continue a broken one."""
    fs = tmpfs(64)
    exp = fs / "exp"
    logger = utils.JsonLogger(exp, enabled=True)  # the command line
    stats = exp / "stats.txt"
    pad = (PAGE - 100 - stats.stat().st_size - len('{"x": ""}\n')) % PAGE
    logger.log({"x": "a" * pad})
    assert stats.stat().st_size % PAGE == PAGE - 100  # the next line starts 100 bytes before a new page
    before = stats.read_bytes()
    fill(fs)
    with pytest.raises(utils.UserError) as caught:
        logger.log({"x": "b" * 500})
    assert str(caught.value).startswith(f"cannot write {stats}: No space left on device (0 bytes free in {exp}). ")
    assert stats.read_bytes() == before


def test_export_writer_on_a_full_disk(tmpfs):
    fs = tmpfs(64)
    out = fs / "w.pth"
    export.write_atomic(str(out), lambda f: torch.save({"w": torch.ones(2)}, f))
    before = out.read_bytes()
    with pytest.raises(utils.UserError) as caught:
        export.write_atomic(str(out), lambda f: torch.save({"w": torch.zeros(40_000)}, f))
    assert str(caught.value) == (f"cannot write {out}: No space left on device (0 bytes free in {fs}); the previous "
                                 f"w.pth (if any) is intact. Make room or fix the folder, then run the same command "
                                 f"again")
    assert out.read_bytes() == before and os.listdir(fs) == ["w.pth"]


def test_file_list_download_on_a_full_disk(tmpfs, monkeypatch):
    fs = tmpfs(64)
    listing = "".join(f"n01440764_{i:06d}.JPEG\n" for i in range(20_000)).encode()  # 460 kB
    monkeypatch.setattr(evaluate.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(listing))
    with pytest.raises(utils.UserError, match=rf"^cannot write {fs / '10percent.txt'}: No space left on device"):
        evaluate.download_file_list(10, fs)
    assert os.listdir(fs) == []


def test_demo_log_and_results_on_a_full_disk(tmpfs):
    """demo.py keeps a copy of each script's output: a log that no longer fits stops the demo (and the
    script) with one line, as do results that do not fit."""
    fs = tmpfs(64)
    log, results = fs / "pretrain.log", fs / "results.md"
    with pytest.raises(utils.UserError, match=rf"^cannot write {log}: No space left on device \(0 bytes free"):
        demo.run(["-c", "for i in range(100): print(str(i) * 1000, flush=True)"], log)  # 100 kB
    log.unlink()
    with pytest.raises(utils.UserError) as caught:
        demo.write_text(results, "x" * 100_000)
    assert str(caught.value).startswith(f"cannot write {results}: No space left on device (0 bytes free")
    assert str(caught.value).endswith("then run the same command again") and os.listdir(fs) == []


# ----------------------------------------------------------------------------- planted links

def _write_model(folder: Path, monkeypatch) -> Path:
    utils.save_atomic({"epoch": 2}, str(folder / "model.pth"))
    return folder / "model.pth"


def _write_export(folder: Path, monkeypatch) -> Path:
    export.write_atomic(str(folder / "w.pkl"), lambda f: f.write(b"weights"))
    return folder / "w.pkl"


def _write_file_list(folder: Path, monkeypatch) -> Path:
    monkeypatch.setattr(evaluate.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"a.JPEG\n"))
    assert evaluate.download_file_list(10, folder)[0] == ["a.JPEG"]
    return folder / "10percent.txt"


WRITERS = {"save_atomic": (_write_model, "model.pth"), "export": (_write_export, "w.pkl"),
           "file list": (_write_file_list, "10percent.txt")}


@pytest.mark.parametrize("writer", WRITERS)
def test_link_at_the_old_temporary_name_is_not_followed(writer, tmp_path, monkeypatch):
    """The temporary name used to be predictable (.<name>.tmp.<pid>): a link planted there made the
    checkpoint's bytes overwrite the link's target."""
    write, name = WRITERS[writer]
    target = tmp_path / "victim"
    target.write_bytes(b"not yours")
    folder = tmp_path / "exp"
    folder.mkdir()
    link = folder / f".{name}.tmp.{os.getpid()}"
    link.symlink_to(target)
    path = write(folder, monkeypatch)
    assert target.read_bytes() == b"not yours"
    assert path.is_file() and not path.is_symlink() and link.is_symlink()


@pytest.mark.parametrize("writer", WRITERS)
def test_link_planted_at_the_new_temporary_name_is_not_followed(writer, tmp_path, monkeypatch):
    """An attacker who wins the race to the random temporary name (the link appears just before the
    file is opened): the file is created exclusively, so another name is taken."""
    write, name = WRITERS[writer]
    target = tmp_path / "victim"
    target.write_bytes(b"not yours")
    folder = tmp_path / "exp"
    folder.mkdir()
    planted, real_open = [], os.open

    def open_(file, flags, *args, **kwargs):
        if os.path.basename(os.fspath(file)).startswith(f".{name}.tmp") and not planted:
            os.symlink(target, file)
            planted.append(Path(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    path = write(folder, monkeypatch)
    assert planted, "the temporary file was not created through os.open"
    assert target.read_bytes() == b"not yours"
    assert path.is_file() and not path.is_symlink() and planted[0].is_symlink()


def test_link_at_stats_txt_is_one_line_and_not_followed(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("not yours\n")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "stats.txt").symlink_to(target)
    with pytest.raises(utils.UserError, match=rf"^cannot write {exp / 'stats.txt'}: it is a symbolic link, which "
                                              rf"is not followed \(remove it\)\. "):
        utils.JsonLogger(exp, enabled=True)
    line = one_line_error(run(*PRETRAIN_RUN, "--exp-dir", exp))
    assert line.startswith(f"error: cannot write {exp / 'stats.txt'}: it is a symbolic link")
    assert target.read_text() == "not yours\n" and (exp / "stats.txt").is_symlink()


# ----------------------------------------------------------------------------- the scripts, end to end

def test_pretraining_on_a_full_disk_stops_at_its_log(tmpfs):
    fs = tmpfs(64)
    exp = fs / "exp"
    exp.mkdir()
    fill(fs)
    line = one_line_error(run(*PRETRAIN_RUN, "--exp-dir", exp))
    assert line.startswith(f"error: cannot write {exp / 'stats.txt'}: No space left on device (0 bytes free in {exp})")
    assert (exp / "stats.txt").read_bytes() == b"" and os.listdir(exp) == ["stats.txt"]


def test_pretraining_in_a_read_only_folder(tmpfs):
    fs = tmpfs(64)
    exp = fs / "exp"
    exp.mkdir()
    remount(fs, "ro")
    line = one_line_error(run(*PRETRAIN_RUN, "--exp-dir", exp))
    assert line == (f"error: cannot write {exp / 'stats.txt'}: Read-only file system. Make room or fix the folder, "
                    f"then run the same command again to continue from the last checkpoint")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(script)``: the files a finished run of PRETRAIN_RUN / EVAL_RUN / SEG_RUN leaves on an
    ordinary disk (each run once), by name: the tmpfs sizes follow them."""
    folders = {}

    def get(script: str) -> Path:
        if script not in folders:
            exp = tmp_path_factory.mktemp("reference")
            cmd = {"pretrain": PRETRAIN_RUN, "eval": EVAL_RUN, "seg": SEG_RUN}[script]
            proc = run(*cmd, "--exp-dir", exp)
            assert proc.returncode == 0, proc.stderr[-3000:]
            folders[script] = exp
        return folders[script]
    return get


@pytest.mark.slow
def test_pretraining_full_disk_at_model_pth_then_resume(tmpfs, written):
    """The user's report: a tmpfs of 1.5 model.pth; epoch 1's checkpoint fits, epoch 2's does not."""
    ref = written("pretrain")
    model, backbone, stats = pages(ref / "model.pth"), pages(ref / "backbone.pth"), pages(ref / "stats.txt")
    fs = tmpfs(kib(stats + model + model // 2))
    exp = fs / "exp"
    line = one_line_error(run(*PRETRAIN_RUN, "--exp-dir", exp))
    assert line.startswith(f"error: cannot write {exp / 'model.pth'}: No space left on device (")
    assert "the previous model.pth (if any) is intact" in line
    assert not leftovers(exp) and not (exp / "backbone.pth").exists()
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 1
    remount(fs, f"size={kib(2 * (stats + model + backbone))}k")
    again = run(*PRETRAIN_RUN, "--exp-dir", exp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "epoch 1, step 0" in again.stdout
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 2
    assert torch.load(exp / "backbone.pth", weights_only=True).keys() == torch.load(ref / "backbone.pth").keys()


@pytest.mark.slow
def test_pretraining_full_disk_at_backbone_pth_then_again(tmpfs, written):
    """One epoch: model.pth fits, the exported backbone after it does not."""
    ref = written("pretrain")
    model, backbone, stats = pages(ref / "model.pth"), pages(ref / "backbone.pth"), pages(ref / "stats.txt")
    fs = tmpfs(kib(stats + model + backbone // 2))
    exp = fs / "exp"
    cmd = [*PRETRAIN_RUN, "--epochs", "1", "--exp-dir", exp]
    line = one_line_error(run(*cmd))
    assert line.startswith(f"error: cannot write {exp / 'backbone.pth'}: No space left on device (")
    assert not leftovers(exp) and not (exp / "backbone.pth").exists()
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 1
    remount(fs, f"size={kib(2 * (stats + model + backbone))}k")
    again = run(*cmd)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    assert torch.load(exp / "backbone.pth", weights_only=True).keys() == torch.load(ref / "backbone.pth").keys()


@pytest.mark.slow
@pytest.mark.parametrize("script,key,first", [("eval", "epoch", 1), ("seg", "iteration", 4)])
def test_training_full_disk_at_the_second_checkpoint_then_resume(script, key, first, tmpfs, written):
    """evaluate.py's and segmentation/train.py's checkpoint.pth: room for one and a half."""
    ref = written(script)
    ckpt, stats = pages(ref / "checkpoint.pth"), pages(ref / "stats.txt")
    fs = tmpfs(kib(stats + ckpt + math.ceil(ckpt / 2)))
    exp = fs / "exp"
    cmd = [*{"eval": EVAL_RUN, "seg": SEG_RUN}[script], "--exp-dir", exp]
    line = one_line_error(run(*cmd), after_warnings=True)  # segmentation: no --pretrained
    assert line.startswith(f"error: cannot write {exp / 'checkpoint.pth'}: No space left on device (")
    assert torch.load(exp / "checkpoint.pth", weights_only=True)[key] == first and not leftovers(exp)
    remount(fs, f"size={kib(4 * (stats + ckpt))}k")
    again = run(*cmd)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    assert torch.load(exp / "checkpoint.pth", weights_only=True)[key] == 2 * first
