"""Hostile checkpoint files: each is refused with one line that names the file, runs no code, does not
hang and allocates no more than the file really holds.

The files are crafted here, in tmp_path: lists that share their children (2**60 paths in 2 KB), lists
nested 100,000 deep, expanded tensors declaring 10**8-wide expanders, contents of the wrong shape,
garbage, a zip bomb and a zip whose data.pkl calls ``posix.system`` through STACK_GLOBAL. Work is
bounded by counting it (opcodes read, models built off the meta device) or, where the unbounded work
would never end, by a deadline far above what the bounded work takes.
"""
import contextlib
import io
import os
import pickle
import pickletools
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import export
import hubconf
import models
import training
from models import checkpoints, vicregl
from models.checkpoints import CheckpointError, UnsafeCheckpointError
from models.vicregl import VICRegL, VICRegLConfig
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- crafting files

def shared_lists(levels: int = 60) -> list:
    """Lists that share their children: ``levels`` objects, 2**levels paths from the top."""
    x = []
    for _ in range(levels):
        x = [x, x]
    return x


def zip_with_pickle(path: Path, body: bytes) -> Path:
    """A torch.save archive whose data.pkl is ``body``: what torch.load unpickles, written by hand."""
    base = io.BytesIO()
    torch.save({}, base)
    src = zipfile.ZipFile(base)
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, body if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return path


def deep_list_pickle(depth: int) -> bytes:
    """The pickle of ``{"deep": [[[...]]]}`` with lists ``depth`` deep (pickle.dumps would recurse)."""
    return b"\x80\x02}X\x04\x00\x00\x00deep" + b"]" * depth + b"a" * (depth - 1) + b"s."


class _System:
    """Unpickling this runs a shell command through os.system (``posix.system``)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def full_state(**kw) -> dict:
    """A small pretraining model's state dict with ``module.`` keys, as model.pth holds it."""
    torch.manual_seed(0)
    model = VICRegL(VICRegLConfig(arch="resnet_test", mlp="16-16", maps_mlp="8-8", num_classes=3, **kw))
    return {f"module.{k}": v for k, v in model.state_dict().items()}


class Deadline(BaseException):
    """Not an Exception, so that no ``except Exception`` turns it into a refusal."""


class Forbidden(BaseException):
    """A call that must not happen (a BaseException for the same reason)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the block after ``seconds`` (the bounded work takes milliseconds; unbounded, years)."""
    def stop(*_):
        raise Deadline(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def genops_count(monkeypatch):
    """How many opcodes ``pickletools.genops`` has yielded since the test began."""
    count = [0]
    real = pickletools.genops

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            count[0] += 1
            yield item
    monkeypatch.setattr(pickletools, "genops", counting)
    return count


@pytest.fixture
def no_real_wide_expander(monkeypatch):
    """Fail, instead of allocating, when an expander 10**6 or more wide is built off the meta device."""
    real = vicregl.build_expander

    def guarded(d_in, spec, *args, **kwargs):
        if max(vicregl.parse_mlp(spec)) >= 10 ** 6 and not torch.empty(0).is_meta:
            raise AssertionError(f"an expander {spec} wide was about to be allocated")
        return real(d_in, spec, *args, **kwargs)
    monkeypatch.setattr(vicregl, "build_expander", guarded)


# ----------------------------------------------------------------------------- 1. shared and deep structures

def test_lists_sharing_their_children_are_walked_once(tmp_path):
    """60 levels of [x, x]: 2 KB on disk, 2**60 paths. Each list is visited once, the sharing kept."""
    path = tmp_path / "shared.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": shared_lists(60)}, path)
    assert path.stat().st_size < 4000
    with deadline(5):
        ckpt = checkpoints.read_checkpoint(path)
    assert ckpt["x"][0] is ckpt["x"][1] and torch.equal(ckpt["model"]["w"], torch.ones(2))
    top = tmp_path / "top.pth"
    torch.save(shared_lists(60), top)  # the file as it was tried: a list at the top
    with deadline(5), pytest.raises(CheckpointError, match=r"top\.pth: it holds a list, where a dict was expected"):
        checkpoints.read_checkpoint(top)


def test_lists_nested_100000_deep_are_refused_in_one_line(tmp_path):
    path = zip_with_pickle(tmp_path / "deep.pth", deep_list_pickle(100_000))
    with pytest.raises(CheckpointError) as info:
        checkpoints.read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "Recursion" not in message, message
    assert f"{path}: it nests lists, tuples or dicts more than 100 levels deep (at ['deep'][0]" in message
    fine = zip_with_pickle(tmp_path / "fine.pth", deep_list_pickle(50))  # no checkpoint nests even that deep
    assert isinstance(checkpoints.read_checkpoint(fine)["deep"], list)


# ----------------------------------------------------------------------------- 2. shapes the file does not hold

def test_expanded_tensor_declaring_a_huge_expander_is_refused_before_allocating(tmp_path, no_real_wide_expander):
    sd = {k: v for k, v in full_state().items() if not k.startswith("module.projector")}
    sd["module.projector.0.weight"] = torch.zeros(1).expand(10 ** 8, 64)  # 4 bytes of storage
    path = tmp_path / "wide.pth"
    torch.save({"model": sd}, path)
    assert path.stat().st_size < 400_000
    with pytest.raises(CheckpointError) as info:
        hubconf._load("resnet_test", 0.75, weights=str(path), full_checkpoint=True)
    assert str(info.value) == (f"cannot use checkpoint {path}: its tensor ['model']['module.projector.0.weight'] "
                               f"of shape (100000000, 64) needs 25600000000 bytes but the file holds 4 for it (an "
                               f"expanded or overlapping tensor), so it was not loaded")


def test_full_checkpoint_shapes_are_checked_on_the_meta_device_first(tmp_path, no_real_wide_expander):
    """A real, empty (10**8, 0) tensor declares a 10**8-wide expander without holding anything: the
    model's shapes are compared on the meta device, so the refusal comes before any allocation."""
    sd = {k: v for k, v in full_state().items() if not k.startswith("module.projector")}
    sd["module.projector.0.weight"] = torch.zeros(10 ** 8, 0)
    path = tmp_path / "declared.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"does not fit the resnet_test pretraining model:\n  shape mismatch "
                                              r"\(file vs model\): projector.0.weight \(100000000, 0\) vs "
                                              r"\(100000000, \d+\)"):
        checkpoints.load_pretraining_model(str(path), "resnet_test")


def test_many_keys_viewing_one_storage_are_refused(tmp_path):
    """30 expander layers of (256, 256), all views of one 256 KB storage: the model would take 30 times
    what the file holds."""
    state = full_state()
    sd = {k: v for k, v in state.items() if not k.startswith("module.projector")}
    width, layers, shared = 256, 30, torch.zeros(256 * 256)
    sd["module.projector.0.weight"], sd["module.projector.0.bias"] = torch.zeros(width, 64), torch.zeros(width)
    for i in range(1, layers):
        sd[f"module.projector.{3 * i}.weight"] = shared.view(width, width)
    for i in range(layers - 1):
        for name in ("bias", "running_mean", "running_var", "weight"):
            sd[f"module.projector.{3 * i + 1}.{name}"] = torch.zeros(width)
        sd[f"module.projector.{3 * i + 1}.num_batches_tracked"] = torch.tensor(0)
        if i:
            sd[f"module.projector.{3 * i}.bias"] = torch.zeros(width)
    path = tmp_path / "views.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: its tensors need \d+ bytes in all but share storages that "
                                              rf"hold \d+, so it was not loaded"):
        checkpoints.load_pretraining_model(str(path), "resnet_test")


def test_tensors_that_are_views_of_one_flat_buffer_still_load(tmp_path):
    """No false alarm: a state dict kept as non-overlapping views of one buffer (as flat-parameter
    trainers save it) holds all its data, and loads as before."""
    state = full_state()
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    flat = torch.cat([v.flatten() for v in floats.values()])
    views, start = {}, 0
    for k, v in floats.items():
        views[k] = flat[start:start + v.numel()].view(v.shape)
        start += v.numel()
    path = tmp_path / "flat.pth"
    torch.save({"model": {**state, **views}}, path)
    model = checkpoints.load_pretraining_model(str(path), "resnet_test")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[f"module.{k}"]), k


def test_expander_key_that_is_not_a_layer_is_named(tmp_path):
    sd = full_state()
    sd["module.projector.x.weight"] = torch.zeros(2, 2)
    path = tmp_path / "key.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as info:
        hubconf._load("resnet_test", 0.75, weights=str(path), full_checkpoint=True)
    assert str(info.value) == (f"checkpoint {path}: key projector.x.weight is not an expander layer "
                               f"(projector.<layer number>.weight)")


@pytest.mark.filterwarnings("ignore:.*[Ss]parse.*:UserWarning")
@pytest.mark.parametrize("kind", ["meta", "torch.sparse_coo"])
def test_tensors_without_their_data_are_refused(kind, tmp_path):
    """A shape of 10**12 elements with (next to) no data: a meta tensor, a sparse one with one value."""
    tensor = (torch.empty(10 ** 8, 10 ** 4, device="meta") if kind == "meta" else
              torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (10 ** 6, 10 ** 6)))
    path = tmp_path / "nodata.pth"
    torch.save({"conv1.weight": tensor}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: its tensor \['conv1.weight'\] of shape .* is a {kind} "
                                              rf"tensor; only dense tensors with their data are read"):
        checkpoints.read_checkpoint(path)


def test_zip_bomb_is_refused_before_unpacking(tmp_path):
    """A compressed entry of zeros: 10 MB of tensor from a file of a few KB (torch.save never compresses)."""
    plain = io.BytesIO()
    torch.save({"w": torch.zeros(2_500_000)}, plain)
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=rf"{path}: its zip entries unpack to \d+ bytes, more than the "
                                              rf"file's \d+ \(compressed entries"):
        checkpoints.read_checkpoint(path)


# ----------------------------------------------------------------------------- 3. contents of the wrong shape

@pytest.mark.parametrize("content, expected", [
    ([torch.ones(2)], "it holds a list, where a dict was expected"),
    (torch.ones(3), "it holds a tensor, where a dict was expected"),
    ({"model": [1]}, "its 'model' entry is a list, where a dict or a tensor was expected"),
    ({"state_dict": "text"}, "its 'state_dict' entry is a str, where a dict or a tensor was expected"),
    ({"args": "text", "epoch": 1}, "holds no state dict"),
])
def test_contents_of_the_wrong_shape_are_one_line(content, expected, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_backbone_weights(models.build_backbone("resnet_test")[0], str(path), "resnet_test")
    assert str(path) in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError) as info:  # export.py reads the weights on its own
        export._read_weights(str(path), trusted=False)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_resume_state_of_the_wrong_shape_is_a_user_error(tmp_path):
    """An optimizer state whose 'state' is a list: one UserError, not an AttributeError."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    state = {"state": [1], "param_groups": optimizer.state_dict()["param_groups"]}
    with pytest.raises(UserError, match=r"model.pth does not fit this run: its optimizer state: 'list' object has "
                                        r"no attribute 'items'"):
        training.restore(tmp_path / "model.pth", {"optimizer": state}, optimizer=optimizer)


@pytest.mark.parametrize("best, knn, expected", [
    ("text", None, "its 'best_acc' entry is a str, where a dict was expected"),
    ({"acc1": "high"}, None, "its 'best_acc' entry must hold the numbers acc1 and acc5"),
    ({"acc1": 1.0, "acc5": 2.0}, [1], "its 'knn' entry must be a dict"),
])
def test_evaluation_resume_state_of_the_wrong_shape_is_a_user_error(tmp_path, best, knn, expected):
    """evaluate.py's checkpoint.pth whose best accuracies or k-NN result are not what it writes: one
    UserError naming the file, before anything reads them (a KeyError or ValueError before)."""
    import argparse
    import evaluate
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "best_acc": best, "knn": knn,
                "args": {}}, path)
    args = argparse.Namespace(**{k: None for k in evaluate.CHECKED_ARGS}, trust_checkpoint=False)
    with pytest.raises(UserError) as info:
        evaluate.load_resume_state(path, args)
    assert str(path) in str(info.value) and expected in str(info.value)


# ----------------------------------------------------------------------------- 4. bounded scans, named globals

def test_garbage_is_refused_with_bounded_work(tmp_path, genops_count, monkeypatch):
    """4 MB that torch.load would walk opcode by opcode (seconds): neither format, so it is never
    handed to torch.load, and naming its globals reads a bounded number of opcodes."""
    def no_load(*args, **kwargs):
        raise Forbidden("torch.load was given a file that is neither of its formats")
    monkeypatch.setattr(torch, "load", no_load)
    for name, data in [("ints", b"I1\n" * 1_400_000), ("marks", b"(" * 4_000_000), ("bytes", b"\xff" * 4_000_000)]:
        path = tmp_path / name
        path.write_bytes(data)
        before = genops_count[0]
        with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
            checkpoints.read_checkpoint(path)
        assert genops_count[0] - before <= 250_000, name  # of 1,400,000 in the first file
        if name == "bytes":  # not a pickle opcode: refused at the first byte
            assert genops_count[0] == before


def test_stack_global_in_a_zip_checkpoint_is_named(tmp_path):
    marker = tmp_path / "code_ran"
    body = pickle.dumps({"model": {}, "hook": _System(f"touch {marker}")}, protocol=4)
    assert b"\x93" in body and b"cposix" not in body  # STACK_GLOBAL, no GLOBAL opcode
    path = zip_with_pickle(tmp_path / "stack.pth", body)
    with pytest.raises(UnsafeCheckpointError) as info:
        checkpoints.read_checkpoint(path)
    assert str(info.value).startswith(f"{path} holds Python objects that could run code when loaded "
                                      f"(posix.system), so it was not loaded")
    assert not marker.exists()


def test_stack_global_names_are_followed_through_the_memo(tmp_path):
    """'posix' and 'system' memoised (MEMOIZE), two decoy strings pushed and popped (POP), then both
    fetched back (BINGET) for STACK_GLOBAL: the two strings read last are not the global's name."""
    body = (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94" + b"\x8c\x05decoy0" * 2
            + b"h\x00h\x01\x93\x8c\x04true\x85R.")
    assert [op.name for op, _, _ in pickletools.genops(body)].count("STACK_GLOBAL") == 1
    path = zip_with_pickle(tmp_path / "memo.pth", body)
    with pytest.raises(UnsafeCheckpointError, match=r"\(posix\.system\)"):
        checkpoints.read_checkpoint(path)


# ----------------------------------------------------------------------------- every entry point, as a user runs it

EVAL_RUN = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-images", "32", "--builtin-val-images", "16",
            "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test", "--batch-size", "16", "--workers",
            "0", "--device", "cpu"]
SEG_RUN = ["--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu", "--workers", "0", "--builtin-size", "32",
           "--builtin-images", "16", "--builtin-val-images", "4", "--batch-size", "4", "--iters", "8",
           "--eval-interval", "0"]
PRETRAIN_RUN = ["--dataset", "builtin", "--builtin-images", "32", "--builtin-size", "32", "--arch", "resnet_test",
                "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2", "--min_scale_crops", "0.3",
                "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2", "--mlp", "32-32", "--maps-mlp",
                "16-16", "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--epochs", "1"]


def _resume_from(path, tmp):
    (tmp / "exp").mkdir()
    (tmp / "exp" / "model.pth").write_bytes(Path(path).read_bytes())
    return ["main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", tmp / "exp"]


def _hub(full):
    code = ("import sys, torch; torch.hub.load(sys.argv[1], 'resnet50_alpha0p9', source='local', weights=sys.argv[2]"
            + (", full_checkpoint=True)" if full else ")"))
    return lambda p, t: ["-c", code, ROOT, p]


def _write(kind: str, path: Path) -> Path:
    """The hostile file of each kind, written to ``path``."""
    if kind == "shared lists":
        torch.save(shared_lists(60), path)
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "list":
        torch.save([torch.ones(2)], path)
    elif kind == "model list":
        torch.save({"model": [1]}, path)
    elif kind == "deep lists":
        zip_with_pickle(path, deep_list_pickle(100_000))
    elif kind == "expanded":
        torch.save({"conv1.weight": torch.zeros(1).expand(10 ** 4, 10 ** 4)}, path)
    elif kind == "args text":
        torch.save({"epoch": 1, "model": {}, "optimizer": {}, "args": "arch"}, path)
    elif kind == "stack global":
        zip_with_pickle(path, pickle.dumps({"hook": _System(f"touch {path.parent / 'code_ran'}")}, protocol=4))
    elif kind == "expander key":
        torch.save({"model": {"projector.0.weight": torch.zeros(4, 2048), "projector.x.weight": torch.zeros(2, 2)}},
                   path)
    return path


# (entry point, the hostile file it is given, what its one line says): each file kind at least once
ENTRY_POINTS = {
    "export.py detectron2": (lambda p, t: ["export.py", "detectron2", "--checkpoint", p, "--out", t / "d.pkl"],
                             "shared lists", "it holds a list, where a dict was expected"),
    "export.py timm": (lambda p, t: ["export.py", "timm", "--checkpoint", p, "--out", t / "t.pth"],
                       "stack global", "could run code when loaded (posix.system)"),
    "evaluate.py --pretrained": (lambda p, t: ["evaluate.py", *EVAL_RUN, "--knn-only", "--exp-dir", t / "e",
                                               "--pretrained", p], "tensor", "it holds a tensor, where a dict"),
    "visualize.py --checkpoint": (lambda p, t: ["visualize.py", "features", "--checkpoint", p, "--out", t / "f.png",
                                                "--device", "cpu"], "model list", "its 'model' entry is a list"),
    "visualize.py --hub --weights": (lambda p, t: ["visualize.py", "features", "--hub", "resnet50_alpha0p9",
                                                   "--weights", p, "--out", t / "f.png", "--device", "cpu"],
                                     "expanded", "['conv1.weight'] of shape (10000, 10000) needs 400000000 bytes"),
    "segmentation --pretrained": (lambda p, t: ["segmentation/train.py", *SEG_RUN, "--exp-dir", t / "s",
                                                "--pretrained", p], "deep lists", "more than 100 levels deep"),
    "main_vicregl.py resume": (_resume_from, "args text", "its 'args' entry is a str, where a dict was expected"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_script_refuses_with_one_error_line(entry, tmp_path):
    command, kind, expected = ENTRY_POINTS[entry]
    path = _write(kind, tmp_path / "hostile.pth")
    proc = subprocess.run([sys.executable, *map(str, command(path, tmp_path))], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**ENV, "TORCH_HOME": str(tmp_path / "torch")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    assert expected in errors[0] and ("model.pth" if "resume" in entry else str(path)) in errors[0], errors[0]
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("kind, full, expected", [
    ("model list", False, "its 'model' entry is a list, where a dict or a tensor was expected"),
    ("expander key", True, "key projector.x.weight is not an expander layer"),
], ids=["weights", "full_checkpoint"])
def test_the_hub_raises_one_checkpoint_error_line(kind, full, expected, tmp_path):
    path = _write(kind, tmp_path / "hostile.pth")
    proc = subprocess.run([sys.executable, *map(str, _hub(full)(path, tmp_path))], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**ENV, "TORCH_HOME": str(tmp_path / "torch")})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("models.checkpoints.CheckpointError: "), proc.stderr[-3000:]
    assert str(path) in last and expected in last, last
