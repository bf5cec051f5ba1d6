"""segmentation/train.py end to end on the built-in dataset: learning, evaluation, resume, errors, torchrun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import utils
from segmentation import metrics as M
from segmentation import train as seg_train
from segmentation.datasets import BuiltinMasks

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: on a small shared CPU two OpenMP threads per tiny convolution are slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu", "--workers", "0",
        "--builtin-size", "32", "--builtin-images", "64", "--builtin-val-images", "8", "--batch-size", "4",
        "--eval-interval", "0", "--print-freq", "5"]
# The end-to-end setting: two object classes, all four stages (fine enough for 64-pixel scenes).
LEARN = ["--dataset", "builtin", "--arch", "resnet_test", "--device", "cpu", "--workers", "0",
         "--builtin-classes", "2", "--builtin-images", "512", "--builtin-val-images", "48",
         "--stages", "1", "2", "3", "4", "--photometric", "0", "--batch-size", "8", "--lr", "0.1",
         "--iters", "200", "--eval-interval", "100", "--print-freq", "50"]


def run_seg(*args, check=True, module=False, launcher=()):
    entry = ["-m", "segmentation.train"] if module else ["segmentation/train.py"]
    cmd = [*launcher] if launcher else [sys.executable, *entry]
    cmd += [str(a) for a in args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_stats(exp_dir):
    lines = (exp_dir / "stats.txt").read_text().splitlines()
    train = [json.loads(x) for x in lines if x.startswith("{")]
    val = [json.loads(x[len("Val: "):]) for x in lines if x.startswith("Val: ")]
    return lines, train, val


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    """One 200-iteration run on the built-in masks with a random tiny backbone (about 10 s)."""
    exp = tmp_path_factory.mktemp("seg") / "exp"
    result = run_seg(*LEARN, "--exp-dir", exp)
    return exp, result


def constant_background_miou(num_images=48, classes=2, size=64):
    """mIoU of predicting background everywhere on the same evaluation images."""
    ds = BuiltinMasks("val", num_images, size, classes, seed=0)
    conf = sum(M.confusion_matrix(torch.zeros(m.shape, dtype=torch.long), torch.from_numpy(m).long(), classes + 1)
               for _, m in (ds[i] for i in range(len(ds))))
    return M.segmentation_scores(conf)["mIoU"]


def test_end_to_end_run_beats_a_constant_predictor(learnt):
    exp, result = learnt
    lines, train, val = read_stats(exp)
    assert "segmentation/train.py" in lines[0] and "--iters 200" in lines[0]  # the command line first
    assert [x["it"] for x in train] == [50, 100, 150, 200] and [x["it"] for x in val] == [100, 200]
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["lr"] < train[0]["lr"]  # poly decay
    final = val[-1]
    assert set(final["IoU"]) == {"background", "stripes", "checker"}  # classes 0, 1: the first two textures
    baseline = constant_background_miou()
    assert 10 < baseline < 30  # background is the largest class, but only one class in three
    assert final["mIoU"] > baseline + 3, (final, baseline)
    assert all(v is not None and v > 0 for v in final["IoU"].values())  # objects found, not just background
    assert f"done: mIoU {final['mIoU']:.2f}" in result.stdout
    ckpt = torch.load(exp / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 200 and ckpt["args"]["arch"] == "resnet_test"
    assert set(ckpt["head"]) >= {"bn.weight", "bn.running_mean", "classifier.weight", "classifier.bias"}


def own_copy(exp, tmp_path):
    """A copy of the shared run's folder that a test may write into (stats.txt grows with each run)."""
    return Path(shutil.copytree(exp, tmp_path / "exp"))


def test_eval_only_reproduces_the_final_evaluation(learnt, one_thread, tmp_path):
    exp = own_copy(learnt[0], tmp_path)
    before = read_stats(exp)[2][-1]
    in_process(*LEARN, "--exp-dir", exp, "--eval-only")
    after = read_stats(exp)[2][-1]
    assert after["it"] == 200 and after["mIoU"] == before["mIoU"] and after["IoU"] == before["IoU"]


@pytest.mark.slow
def test_two_processes_evaluate_exactly_like_one(learnt, one_thread, tmp_path):
    """torchrun with gloo: the shards' confusion matrices are summed, each image counted once."""
    exp = own_copy(learnt[0], tmp_path)
    before = read_stats(exp)[2][-1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(utils.free_port()), "segmentation/train.py"]
    # 47 images: 24 + 23 over the two processes, so padding duplicates would change the counts
    run_seg(*LEARN, "--exp-dir", exp, "--eval-only", "--builtin-val-images", "47", launcher=launcher)
    two = read_stats(exp)[2][-1]
    in_process(*LEARN, "--exp-dir", exp, "--eval-only", "--builtin-val-images", "47")
    one = read_stats(exp)[2][-1]
    assert one["mIoU"] != before["mIoU"]  # really another evaluation set
    assert two["mIoU"] == one["mIoU"] and two["aAcc"] == one["aAcc"] and two["IoU"] == one["IoU"]


def _save_backbones(tmp_path):
    torch.manual_seed(7)
    backbone, _ = models.build_backbone("resnet_test")
    sd = backbone.state_dict()
    paths = dict(exported=tmp_path / "backbone.pth", full=tmp_path / "model.pth")
    torch.save(sd, paths["exported"])
    torch.save(dict(epoch=3, model={f"module.backbone.{k}": v for k, v in sd.items()}, optimizer={}), paths["full"])
    return paths


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, capsys, one_thread):
    paths = _save_backbones(tmp_path)
    common = [*TINY, "--iters", "24", "--dropout", "0.5", "--checkpoint-interval", "100"]
    in_process(*common, "--exp-dir", tmp_path / "a", "--pretrained", paths["exported"])
    capsys.readouterr()
    in_process(*common, "--exp-dir", tmp_path / "b", "--pretrained", paths["full"], "--stop-after-iters", "10")
    assert "stopped at iteration 10 of 24" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["iteration"] == 10
    in_process(*common, "--exp-dir", tmp_path / "b")  # --pretrained taken from the checkpoint
    out = capsys.readouterr().out
    assert "resuming from" in out and "at iteration 10" in out
    assert f"loaded resnet_test weights from {paths['full']}" in out
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 24
    for k in a["head"]:
        assert torch.allclose(a["head"][k].float(), b["head"][k].float(), atol=1e-6), k
    _, train_a, val_a = read_stats(tmp_path / "a")
    _, train_b, val_b = read_stats(tmp_path / "b")
    assert [x["loss"] for x in train_a] == pytest.approx([x["loss"] for x in train_b], abs=1e-5)
    assert val_a[-1]["mIoU"] == val_b[-1]["mIoU"]


def test_a_backbone_for_another_architecture_is_a_clear_error(tmp_path):
    wrong = tmp_path / "convnext.pth"
    torch.save(models.build_backbone("convnext_test")[0].state_dict(), wrong)
    result = run_seg(*TINY, "--iters", "2", "--exp-dir", tmp_path / "e", "--pretrained", wrong, check=False,
                     module=True)  # python -m segmentation.train works too
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "missing" in result.stderr and "--arch convnext_test" in result.stderr


def in_process(*argv):
    """Run the script's main in this process (no interpreter start-up: much faster on a small CPU)."""
    seg_train.main(seg_train.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["missing", "garbage", "small_input", "eval_only", "no_data_dir", "bad_stride"])
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, case):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 definitely not a checkpoint")
    paths = _save_backbones(tmp_path)
    argv, expected = {
        "missing": (["--pretrained", tmp_path / "nope.pth"], "not found"),
        "garbage": (["--pretrained", garbage], "cannot read checkpoint"),
        "small_input": (["--pretrained", paths["exported"], "--small-input"], "the small-input ResNet stem: drop --small-input"),
        "eval_only": (["--eval-only"], "needs a trained head"),
        "no_data_dir": (["--dataset", "voc"], "needs --data-dir"),
        "bad_stride": (["--inference", "slide", "--window", "16", "--stride", "20", "--iters", "1"], "stride"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        in_process(*TINY, "--exp-dir", tmp_path / "exp", *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err


def test_builtin_seed_selects_the_images_and_seed_does_not():
    """--builtin-seed picks the scenes (those main_vicregl.py --builtin-seed pretrains on); --seed only
    seeds the head and the crops."""
    import builtin_data
    parser = seg_train.get_args_parser()
    for argv, images_seed in [(["--seed", "9"], 0), (["--builtin-seed", "3", "--seed", "9"], 3)]:
        args = seg_train.resolve_args(parser.parse_args(["--dataset", "builtin", "--arch", "resnet_test",
                                                         "--builtin-size", "32", *argv]))
        for split in ("train", "val"):
            ds = seg_train.build_dataset(args, split, None)
            _, mask = ds[1]
            _, expected, _ = builtin_data.BuiltinDataset(split, 4, 32, 10, seed=images_seed).sample(1)
            assert (mask == expected).all(), (argv, split)
