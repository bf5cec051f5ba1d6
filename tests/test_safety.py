"""A checkpoint can never run code, the published formats still load, and a failed write loses nothing.

Every script is run as a subprocess, the way a user runs it. A planted pickle would create a marker
file when unpickled: no loading path may create it, and each refuses the file with a one-line
message and a non-zero exit. Writes are made to fail (full disk, no permission) by a small wrapper
that patches the writer before running the script, so no root or real full disk is needed.
"""
import argparse
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import models
from models import checkpoints
from models.vicregl import VICRegL, VICRegLConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

EVAL_RUN = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-images", "32", "--builtin-val-images", "16",
            "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test", "--batch-size", "16", "--workers",
            "0", "--device", "cpu"]
PRETRAIN_RUN = ["--dataset", "builtin", "--builtin-images", "32", "--builtin-size", "32", "--arch", "resnet_test",
                "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2", "--min_scale_crops", "0.3",
                "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2", "--mlp", "32-32", "--maps-mlp",
                "16-16", "--batch-size", "16", "--num-workers", "0", "--log-tensors-interval", "0", "--device", "cpu",
                "--epochs", "2", "--warmup-epochs", "1"]
SEG_RUN = ["--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu", "--workers", "0", "--builtin-size", "32",
           "--builtin-images", "16", "--builtin-val-images", "4", "--batch-size", "4", "--iters", "8",
           "--eval-interval", "0", "--print-freq", "4", "--checkpoint-interval", "4"]


def run(*cmd, env=None):
    return subprocess.run([sys.executable, *[str(c) for c in cmd]], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env or ENV)


def one_line_error(proc) -> str:
    """The refusal: a non-zero exit and one error line, without a traceback (warnings and a download's
    progress bar may come before it)."""
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- code-running pickles

class _Plant:
    """Unpickling this creates ``marker`` (a stand-in for any command a shared file could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(tmp_path, raw=False):
    """(checkpoint path, marker path): a backbone-looking file whose unpickling would create the marker,
    as torch.save writes it, or a bare pickle (``raw``)."""
    marker = tmp_path / "code_ran"
    backbone, _ = models.build_backbone("resnet_test")
    obj = {"model": {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}, "epoch": 1,
           "optimizer": {}, "hook": _Plant(marker)}
    path = tmp_path / "shared.pth"
    if raw:
        path.write_bytes(pickle.dumps(_Plant(marker)))
    else:
        torch.save(obj, path)
    return path, marker


@pytest.fixture
def planted(tmp_path):
    return _plant(tmp_path)


def _pretrain_with_resume_file(path, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "model.pth").write_bytes(Path(path).read_bytes())
    return ["main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp]


LOADING_PATHS = {
    "evaluate --pretrained": lambda p, t: ["evaluate.py", *EVAL_RUN, "--knn-only", "--exp-dir", t / "e",
                                           "--pretrained", p],
    "evaluate --pretrained file://": lambda p, t: ["evaluate.py", *EVAL_RUN, "--knn-only", "--exp-dir", t / "e",
                                                   "--pretrained", Path(p).as_uri()],
    "main_vicregl resume": _pretrain_with_resume_file,
    "visualize --checkpoint": lambda p, t: ["visualize.py", "features", "--checkpoint", p, "--out", t / "f.png",
                                            "--device", "cpu"],
    "visualize --hub --weights": lambda p, t: ["visualize.py", "features", "--hub", "resnet50_alpha0p9",
                                               "--weights", p, "--out", t / "f.png", "--device", "cpu"],
    "segmentation --pretrained": lambda p, t: ["segmentation/train.py", *SEG_RUN, "--exp-dir", t / "s",
                                               "--pretrained", p],
    "export detectron2": lambda p, t: ["export.py", "detectron2", "--checkpoint", p, "--out", t / "d.pkl"],
}


@pytest.mark.parametrize("path_name", list(LOADING_PATHS))
def test_code_running_pickle_is_refused_by_every_script(path_name, planted, tmp_path):
    path, marker = planted
    if path_name.startswith("export") and not (ROOT / "export.py").exists():
        pytest.skip("export.py not present")
    env = {**ENV, "TORCH_HOME": str(tmp_path / "hub")}  # file:// URLs are copied into the hub cache
    proc = run(*LOADING_PATHS[path_name](path, tmp_path), env=env)
    line = one_line_error(proc)
    assert not marker.exists(), "unpickling ran code"
    assert "could run code" in line and "--trust-checkpoint" in line and "io.open" in line, line


def test_a_bare_code_running_pickle_is_refused_too(tmp_path):
    """Not a torch.save archive but a bare pickle (the legacy format): refused by name as well."""
    path, marker = _plant(tmp_path, raw=True)
    line = one_line_error(run(*LOADING_PATHS["evaluate --pretrained"](path, tmp_path)))
    assert not marker.exists() and "io.open" in line and "--trust-checkpoint" in line, line


def test_code_running_pickle_is_refused_by_the_hub(planted, tmp_path):
    path, marker = planted
    code = ("import sys, torch; torch.hub.load(sys.argv[1], 'resnet50_alpha0p9', source='local', "
            "weights=sys.argv[2])")
    proc = run("-c", code, ROOT, path)
    assert proc.returncode != 0 and not marker.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("models.checkpoints.UnsafeCheckpointError:")


def test_refusal_names_the_objects_and_tells_damage_apart(planted, tmp_path):
    path, marker = planted
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"io\.open"):
        checkpoints.read_checkpoint(path)
    (tmp_path / "raw").mkdir()
    raw, raw_marker = _plant(tmp_path / "raw", raw=True)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"io\.open"):
        checkpoints.read_checkpoint(raw)
    assert not raw_marker.exists()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((DATA / "fullckpt_lars_format.pth").read_bytes()[:2000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for damaged in (truncated, garbage):
        with pytest.raises(checkpoints.CheckpointError, match="truncated") as info:
            checkpoints.read_checkpoint(damaged)
        assert not isinstance(info.value, checkpoints.UnsafeCheckpointError)
    assert not marker.exists()


def _namespace_checkpoint(tmp_path):
    """A real-world checkpoint that is not plain data: the arguments kept as an argparse.Namespace."""
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("resnet_test")
    path = tmp_path / "with_namespace.pth"
    torch.save({"state_dict": backbone.state_dict(), "args": argparse.Namespace(arch="resnet_test")}, path)
    return path, backbone


def test_trust_flag_loads_a_file_with_python_objects_and_warns(tmp_path):
    path, _ = _namespace_checkpoint(tmp_path)
    refused = run("evaluate.py", *EVAL_RUN, "--knn-only", "--exp-dir", tmp_path / "a", "--pretrained", path)
    assert "argparse.Namespace" in one_line_error(refused)
    trusted = run("evaluate.py", *EVAL_RUN, "--knn-only", "--exp-dir", tmp_path / "b", "--pretrained", path,
                  "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "warning:" in trusted.stderr and "--trust-checkpoint" in trusted.stderr
    assert "k-NN top-1" in trusted.stdout


def test_hub_keyword_trust_checkpoint(tmp_path, capsys):
    import hubconf
    path, backbone = _namespace_checkpoint(tmp_path)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match="trust_checkpoint=True"):
        hubconf._load("resnet_test", 0.75, weights=str(path))
    loaded = hubconf._load("resnet_test", 0.75, weights=str(path), trust_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), backbone.state_dict().values()))
    assert "warning:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the published LARS format

def test_original_lars_full_checkpoint_fixture_loads_without_its_module():
    """The original code's _fullckpt.pth format: its LARS param groups name the function
    optimizers.exclude_bias_and_norm, which no module here provides."""
    assert "optimizers" not in sys.modules
    ckpt = checkpoints.read_checkpoint(DATA / "fullckpt_lars_format.pth")
    assert ckpt["epoch"] == 100
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay_filter"] == group["lars_adaptation_filter"] == "optimizers.exclude_bias_and_norm"
    sd = checkpoints.extract_backbone_state_dict(ckpt)
    assert set(sd) == {"conv1.weight", "bn1.weight"}  # "module.backbone." handled
    assert torch.equal(sd["conv1.weight"], ckpt["model"]["module.backbone.conv1.weight"])
    assert "optimizers" not in sys.modules


def test_only_that_name_is_allowed(tmp_path):
    """A file naming another function of the same module is refused as any other object."""
    path = tmp_path / "other.pth"
    _save_with_fake_original_module(path, {"f": None}, name="something_else")
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"optimizers\.something_else"):
        checkpoints.read_checkpoint(path)


def _save_with_fake_original_module(path, obj, name="exclude_bias_and_norm"):
    """torch.save ``obj`` with every None value of its optimizer's param groups (or of ``obj``) replaced
    by a function known to pickle as ``optimizers.<name>``, as the original's LARS wrote it."""
    module = types.ModuleType("optimizers")

    def fn(p):
        return p.ndim == 1
    fn.__module__, fn.__qualname__, fn.__name__ = "optimizers", name, name
    setattr(module, name, fn)
    groups = obj["optimizer"]["param_groups"] if "optimizer" in obj else [obj]
    for group in groups:
        for k, v in group.items():
            if v is None:
                group[k] = fn
    sys.modules["optimizers"] = module
    try:
        torch.save(obj, path)
    finally:
        del sys.modules["optimizers"]


@pytest.fixture(scope="module")
def resnet50_fullckpt(tmp_path_factory):
    """A complete ResNet-50 pretraining checkpoint in the original's format: epoch, the DDP model
    state dict (small expanders to keep the file small) and a LARS state_dict() whose param groups
    hold the original's filter function."""
    torch.manual_seed(0)
    model = VICRegL(VICRegLConfig(arch="resnet50", mlp="64-64", maps_mlp="32-32", num_classes=10))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    params = list(range(sum(1 for _ in model.parameters())))
    optimizer = {"state": {}, "param_groups": [dict(lr=0.1, weight_decay=1e-6, momentum=0.9, eta=0.001,
                                                    weight_decay_filter=None, lars_adaptation_filter=None,
                                                    params=params)]}
    path = tmp_path_factory.mktemp("published") / "resnet50_alpha0.75_fullckpt.pth"
    _save_with_fake_original_module(path, {"epoch": 300, "model": state, "optimizer": optimizer})
    return path, model


def test_original_resnet50_full_checkpoint_through_evaluate(resnet50_fullckpt, tmp_path):
    path, _ = resnet50_fullckpt
    proc = run("evaluate.py", *[a if a != "resnet_test" else "resnet50" for a in EVAL_RUN], "--knn-only",
               "--exp-dir", tmp_path / "e", "--pretrained", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = len(models.build_backbone("resnet50")[0].state_dict())
    assert f"all {keys} resnet50 keys found" in proc.stdout and "k-NN top-1" in proc.stdout


def test_original_resnet50_full_checkpoint_through_the_hub(resnet50_fullckpt):
    import hubconf
    path, model = resnet50_fullckpt
    backbone = hubconf.resnet50_alpha0p75(weights=str(path))
    full = hubconf.resnet50_alpha0p75(weights=str(path), full_checkpoint=True)
    want = model.state_dict()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, want[f"backbone.{k}"]), k
    for k, v in full.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_our_lars_optimizer_state_is_plain_data():
    """Resuming pretraining needs no allow-list: our LARS keeps no functions in its param groups."""
    from utils import LARS
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = LARS([p], lr=0.1, weight_decay=1e-6)
    p.grad = torch.ones(3, 2)
    opt.step()
    for group in opt.state_dict()["param_groups"]:
        assert all(isinstance(v, (int, float, bool, str, list, type(None))) for v in group.values()), group


# ----------------------------------------------------------------------------- writes that fail

# Runs a script with its writer patched: torch.save fails with ENOSPC (full disk) for files named
# TARGET once AFTER of them were written, or opening TARGET for appending fails with EACCES. For the
# cases a real small filesystem cannot make; tests/test_disk_full.py fills a real one.
_FAILING = r"""
import errno, os, runpy, sys, torch
kind, target, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.argv = sys.argv[4:]
seen = [0]

def hit(name):
    if isinstance(name, int):  # a file opened from a descriptor (the temporary files): its path
        name = os.readlink(f"/proc/self/fd/{name}")
    base = os.path.basename(str(name))
    if base == target or base.startswith("." + target + ".tmp"):
        seen[0] += 1
        return seen[0] > after
    return False

if kind == "save":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if hit(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
else:
    real_open = os.open
    def open_(file, flags, *args, **kwargs):
        if flags & os.O_APPEND and hit(file):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args, **kwargs)
    os.open = open_
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_failing(kind, target, after, *script_and_args):
    return run("-c", _FAILING, kind, target, after, *script_and_args)


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if ".tmp." in p.name]


@pytest.mark.slow
def test_pretraining_full_disk_at_the_second_checkpoint(tmp_path):
    exp = tmp_path / "exp"
    proc = run_failing("save", "model.pth", 1, "main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    line = one_line_error(proc)
    assert f"cannot write {exp / 'model.pth'}: No space left on device" in line and "intact" in line
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 1  # the previous one, whole
    assert not leftovers(exp)
    again = run("main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "epoch 1, step 0" in again.stdout
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 2 and (exp / "backbone.pth").exists()


@pytest.mark.slow
def test_pretraining_full_disk_at_the_exported_backbone(tmp_path):
    exp = tmp_path / "exp"
    proc = run_failing("save", "backbone.pth", 0, "main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    assert f"cannot write {exp / 'backbone.pth'}" in one_line_error(proc)
    assert torch.load(exp / "model.pth", weights_only=True)["epoch"] == 2 and not (exp / "backbone.pth").exists()
    again = run("main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    assert again.returncode == 0 and (exp / "backbone.pth").exists(), again.stderr[-2000:]


@pytest.mark.slow
def test_pretraining_log_without_permission(tmp_path):
    exp = tmp_path / "exp"
    proc = run_failing("open", "stats.txt", 3, "main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    assert f"cannot write {exp / 'stats.txt'}: Permission denied" in one_line_error(proc)
    again = run("main_vicregl.py", *PRETRAIN_RUN, "--exp-dir", exp)
    assert again.returncode == 0 and (exp / "backbone.pth").exists(), again.stderr[-2000:]


@pytest.mark.slow
def test_evaluation_full_disk_at_the_second_checkpoint(tmp_path):
    exp = tmp_path / "lin"
    common = ["evaluate.py", *EVAL_RUN, "--epochs", "2", "--exp-dir", exp]
    line = one_line_error(run_failing("save", "checkpoint.pth", 1, *common))
    assert f"cannot write {exp / 'checkpoint.pth'}: No space left on device" in line
    assert torch.load(exp / "checkpoint.pth", weights_only=True)["epoch"] == 1 and not leftovers(exp)
    again = run(*common)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert torch.load(exp / "checkpoint.pth", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_segmentation_full_disk_at_the_second_checkpoint(tmp_path):
    exp = tmp_path / "seg"
    common = ["segmentation/train.py", *SEG_RUN, "--exp-dir", exp]
    line = one_line_error(run_failing("save", "checkpoint.pth", 1, *common))
    assert f"cannot write {exp / 'checkpoint.pth'}: No space left on device" in line
    assert torch.load(exp / "checkpoint.pth", weights_only=True)["iteration"] == 4 and not leftovers(exp)
    again = run(*common)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert torch.load(exp / "checkpoint.pth", weights_only=True)["iteration"] == 8


# ----------------------------------------------------------------------------- unreadable images

def test_unreadable_image_is_one_line_and_counted_in_the_epoch_log(tmp_path):
    """A corrupt file in the training folder: one clean warning line (no Python warning source line),
    the run goes on, and the epoch's last log line counts the skipped file."""
    from PIL import Image
    import json
    import numpy as np
    rng = np.random.default_rng(0)
    for c in range(2):
        for split, n in (("train", 16), ("val", 4)):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = tmp_path / "data" / "train" / "class1" / "3.png"
    bad.write_bytes(b"\x89PNG but nothing after")
    args = [a for a in PRETRAIN_RUN if a != "builtin"]
    args[args.index("--dataset") + 1:args.index("--dataset") + 1] = ["imagenet1k", "--data-dir", tmp_path / "data"]
    exp = tmp_path / "exp"
    proc = run("main_vicregl.py", *args, "--epochs", "1", "--exp-dir", exp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping unreadable image {bad}"), proc.stderr
    lines = [json.loads(l) for l in (exp / "stats.txt").read_text().splitlines() if l.startswith("{")]
    assert lines[-1]["skipped_images"] == 1 and all("skipped_images" not in l for l in lines[:-1])
