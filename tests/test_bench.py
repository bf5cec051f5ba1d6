"""bench/train_step.py --reference: the checks on the original's checkout, the runner's import
isolation, and (only where a checkout is given in $VICREGL_ORIGINAL_DIR) the first-step loss of the
original against ours on the same weights and inputs."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import train_step
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]

# Just enough of the original's layout to pass the static checks (parsed, never imported there).
FAKE_MAIN = """
def get_arguments():
    pass

class VICRegL:
    def global_loss(self):
        pass

    def local_loss(self):
        pass
"""


@pytest.fixture
def fake_original(tmp_path):
    (tmp_path / "main_vicregl.py").write_text(FAKE_MAIN)
    (tmp_path / "resnet.py").write_text("def resnet50():\n    pass\n")
    return tmp_path


def test_missing_dir_is_one_line_naming_the_flag(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--reference", str(missing),
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --reference {missing}: no such directory "
                                                "(give a checkout of github.com/facebookresearch/VICRegL)"]
    assert proc.stdout == ""


def test_dir_without_the_original_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^--reference .*no main_vicregl.py"):
        train_step.check_reference(str(tmp_path), ["resnet50"])
    (tmp_path / "main_vicregl.py").write_text("from models.vicregl import VICRegL\n")  # like ours
    with pytest.raises(UserError, match=r"^--reference .*not the original implementation"):
        train_step.check_reference(str(tmp_path), ["resnet50"])
    (tmp_path / "main_vicregl.py").write_text("def get_arguments(:\n")
    with pytest.raises(UserError, match=r"^--reference .*cannot read main_vicregl.py \(SyntaxError\)"):
        train_step.check_reference(str(tmp_path), ["resnet50"])


def test_architectures_missing_from_the_original_are_refused(fake_original):
    train_step.check_reference(str(fake_original), ["resnet50"])
    with pytest.raises(UserError, match=r"^--arch resnet_test: .*resnet.py \(it has: resnet50\)"):
        train_step.check_reference(str(fake_original), ["resnet50", "resnet_test"])
    with pytest.raises(UserError, match=r"^--arch convnext_small: .*convnext.py \(it has: nothing\)"):
        train_step.check_reference(str(fake_original), ["convnext_small"])


def test_runner_imports_the_checkouts_modules_not_ours(fake_original, tmp_path):
    # bench/ (the runner's own folder) has a transforms.py too: the checkout's must win, and the
    # failure must come back as one line
    (fake_original / "transforms.py").write_text("WHO = 'the fake checkout'\n")
    (fake_original / "main_vicregl.py").write_text("import transforms\nraise RuntimeError(transforms.WHO)\n")
    path = tmp_path / "inputs.pt"
    torch.save({"config": {"device": "cpu"}, "state_dict": {}}, path)
    with pytest.raises(UserError) as info:
        train_step.original_time(str(fake_original), str(path))
    assert str(info.value) == (f"--reference {fake_original}: the original implementation failed: "
                               "RuntimeError: the fake checkout")


@pytest.mark.skipif(not os.environ.get("VICREGL_ORIGINAL_DIR"),
                    reason="set VICREGL_ORIGINAL_DIR to a checkout of github.com/facebookresearch/VICRegL")
def test_original_computes_our_first_step_loss():
    directory = os.environ["VICREGL_ORIGINAL_DIR"]
    train_step.check_reference(directory, ["resnet34"])
    args = argparse.Namespace(reference=directory, crops="64x2,32x2", batch=4, mlp="32-32-32", maps_mlp="16-16-16",
                              small_input=0, channels_last=False, compile=False, fp16=0, steps=1, warmup=0)
    _, _, loss_ours, loss_orig = train_step.compare_with_original("resnet34", args, torch.device("cpu"))
    assert loss_orig == pytest.approx(loss_ours, rel=1e-5)
