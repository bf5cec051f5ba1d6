"""End-to-end tests of main_vicregl.py, run as a subprocess on the built-in dataset on the CPU."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.checkpoints import load_backbone_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "builtin", "--builtin-images", "96", "--builtin-val-images", "64", "--builtin-size", "32", "--arch", "resnet_test",
        "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2", "--min_scale_crops", "0.3", "0.1",
        "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2", "--mlp", "32-32", "--maps-mlp", "16-16",
        "--batch-size", "16", "--num-workers", "0", "--log-tensors-interval", "0", "--device", "cpu",
        "--epochs", "2", "--warmup-epochs", "1", "--base-lr", "0.001"]
METRICS = {"ep", "st", "lr", "t", "inv_l", "var_l", "cov_l", "minv_l", "mvar_l", "mcov_l", "cls_l", "top1",
           "top5", "stdr", "corr", "stde", "core", "l"}


def run(exp_dir, *extra, check=True, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "main_vicregl.py", *TINY, "--exp-dir", str(exp_dir), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def stats_lines(exp_dir):
    lines = (exp_dir / "stats.txt").read_text().splitlines()
    return lines[0], [json.loads(l) for l in lines[1:] if l.startswith("{")]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("run")
    run(exp, "--evaluate", "--eval-freq", "1", "--knn")
    return exp


def test_stats_checkpoint_and_exported_backbone(finished_run):
    command, lines = stats_lines(finished_run)
    assert "main_vicregl.py" in command and "--arch resnet_test" in command
    assert len(lines) == 12  # 96 images / 16 = 6 steps per epoch, 2 epochs
    assert all(set(l) == METRICS for l in lines)
    assert [l["st"] for l in lines] == list(range(12)) and lines[-1]["ep"] == 1
    assert all(len(l["t"]) == 9 and l["t"].isdigit() for l in lines)
    assert lines[0]["lr"] == 0.0 and max(l["lr"] for l in lines) > 0
    val = [json.loads(l[5:]) for l in (finished_run / "stats.txt").read_text().splitlines() if l.startswith("Val: ")]
    probe = [v for v in val if "clsl_val" in v]
    assert [v["ep"] for v in probe] == [0, 1] and set(probe[0]) == {"ep", "clsl_val", "top1_val", "top5_val"}
    knn = [v for v in val if "knn_top1" in v]
    assert [v["ep"] for v in knn] == [0, 1] and all(0 <= v["knn_top1"] <= v["knn_top5"] <= 100 for v in knn)

    ckpt = torch.load(finished_run / "model.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "resnet_test"
    assert all(k.startswith("module.") for k in ckpt["model"])
    assert {"module.backbone.conv1.weight", "module.projector.0.weight", "module.maps_projector.0.weight",
            "module.classifier.weight"} <= set(ckpt["model"])
    backbone, _ = models.build_backbone("resnet_test", small_input=True)
    load_backbone_weights(backbone, str(finished_run / "backbone.pth"), "resnet_test")  # strict
    assert torch.equal(backbone.conv1.weight, ckpt["model"]["module.backbone.conv1.weight"])


def own_copy(run_dir, tmp_path):
    """A copy of a shared run's folder that this test may write into."""
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_evaluate_only_reads_the_checkpoint(finished_run, tmp_path):
    exp = own_copy(finished_run, tmp_path)
    before = digest(exp / "model.pth")
    proc = run(exp, "--evaluate-only", "--knn")
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith('Val: {"ep": 2, "clsl_val"') and last[1].startswith('Val: {"ep": 2, "knn_top1"')
    assert digest(exp / "model.pth") == before


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(finished_run, tmp_path):
    """Stop a run with SIGTERM in the middle of an epoch; the restarted run continues from the saved
    step and ends with exactly the weights of the uninterrupted run (same seed). Whichever step the
    signal lands on, the message, the checkpoint and the resume agree."""
    exp = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --log-tensors-interval 0: a JSON line per step tells us where the run is.
    proc = subprocess.Popen([sys.executable, "main_vicregl.py", *TINY, "--exp-dir", str(exp),
                             "--evaluate", "--eval-freq", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["st"] == 1:  # 10 steps before the run would end
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    saved = re.search(r"checkpoint saved at epoch (\d+), step (\d+)", out)
    assert saved, out[-2000:]
    epoch, step = int(saved.group(1)), int(saved.group(2))
    ckpt = torch.load(exp / "model.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (epoch, step) and 2 <= epoch * 6 + step < 12
    assert not (exp / "backbone.pth").exists()

    resumed = run(exp, "--evaluate", "--eval-freq", "1")
    assert f"epoch {epoch}, step {step}" in resumed.stdout
    _, lines = stats_lines(exp)
    steps = [l["st"] for l in lines]
    assert steps[-1] == 11 and len(set(steps)) == 12  # every step done; at most the signal's step redone
    same_weights(finished_run / "model.pth", exp / "model.pth")


@pytest.mark.slow
def test_killed_at_an_epoch_boundary_restarts_there_and_ends_like_an_uninterrupted_run(tmp_path):
    """SIGKILL leaves no chance to save: the last epoch-boundary checkpoint must be there, and the
    restarted run must neither redo nor skip an epoch (its weights equal an uninterrupted run's)."""
    three = ["--epochs", "3"]  # the kill lands before the last epoch ends, whatever the machine's speed
    exp = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "main_vicregl.py", *TINY, *three, "--exp-dir", str(exp)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["ep"] == 1:
            proc.kill()  # no chance to save anything: an epoch-boundary checkpoint must be there
            break
    proc.wait(timeout=900)
    saved = torch.load(exp / "model.pth", weights_only=True)
    assert saved["epoch"] in (1, 2) and saved["step_in_epoch"] == 0
    resumed = run(exp, *three)
    assert "resuming from" in resumed.stdout and f"epoch {saved['epoch']}, step 0" in resumed.stdout
    assert (exp / "backbone.pth").exists()
    uninterrupted = tmp_path / "uninterrupted"
    run(uninterrupted, *three)
    same_weights(uninterrupted / "model.pth", exp / "model.pth")


# One step per epoch on the whole set: one process and two see the same global batch. ConvNeXt
# (LayerNorm, no BatchNorm), no drop path and LARS (smooth in the gradient, unlike Adam's first step)
# make two processes compute the same update as one, up to the order of floating-point sums.
WHOLE_BATCH = ["--dataset", "builtin", "--builtin-images", "16", "--builtin-size", "64", "--arch", "convnext_test",
               "--drop-path-rate", "0", "--size-crops", "64", "32", "--num-crops", "2", "2",
               "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "2", "1",
               "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size", "16", "--num-workers", "0",
               "--log-tensors-interval", "0", "--device", "cpu", "--epochs", "2", "--warmup-epochs", "0",
               "--optimizer", "lars", "--base-lr", "0.3"]


@pytest.mark.slow
def test_torchrun_two_processes_compute_what_one_process_computes(tmp_path):
    """Each rank reads its own shard and the gathered losses and averaged gradients make two
    processes' update that of one process on the same global batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(_free_port()), "main_vicregl.py", *WHOLE_BATCH, "--exp-dir", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "main_vicregl.py", *WHOLE_BATCH, "--exp-dir", str(one)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (two / "stats.txt").read_text().count("main_vicregl.py") == 1  # only rank 0 writes
    assert [l["st"] for l in stats_lines(two)[1]] == [0, 1] and (two / "backbone.pth").exists()
    a = torch.load(one / "model.pth", weights_only=True)["model"]
    b = torch.load(two / "model.pth", weights_only=True)["model"]
    for k in a:
        # float32: the two processes sum the gradient in another order than one process does, and two
        # LARS steps carry that rounding (about 1e-7 of each value) into the weights; a wrong shard,
        # a missing gather or an unaveraged gradient moves them by 1e-3 or more
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, float((a[k] - b[k]).abs().max()))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra,message", [
    (["--size-crops", "32"], "--size-crops, --num-crops"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--blur-prob", "1", "-0.5"], "--blur-prob needs two probabilities in [0, 1]"),
    (["--num_matches", "20", "4"], "--num_matches [20, 4]: 20 matches requested from view 0, which has only 16"),
    (["--arch", "resnet7"], "unknown --arch 'resnet7'"),
    (["--arch", "convnext_test", "--size-crops", "64", "16"], "--size-crops 16 is too small for --arch convnext_test"),
    (["--arch", "convnext_test", "--small-input"], "--small-input applies to ResNet backbones only"),
    (["--arch", "convnext_test", "--dilated", "1"], "--dilated applies to ResNet backbones only"),
    (["--mlp", "32-x"], "--mlp expects"),
    (["--dataset", "imagenet1k", "--data-dir", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--dataset", "imagenet1k"], "--data-dir"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_configuration_errors_are_clear_and_early(tmp_path, extra, message, monkeypatch, capsys):
    """In process (the script's main, as `python main_vicregl.py` calls it); the subprocess test below
    shows that the script itself prints the same single line."""
    import main_vicregl
    for name in ("IMAGENET_PATH", "IMAGENET_NUMPY_PATH"):
        monkeypatch.delenv(name, raising=False)
    exp = tmp_path / "exp"
    base = [a for a in TINY if a != "--small-input"] if "convnext_test" in extra else TINY
    args = main_vicregl.get_args_parser().parse_args([*base, "--exp-dir", str(exp), *extra])
    with pytest.raises(SystemExit) as exit_info:
        main_vicregl.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and err.startswith("error: ")
    assert not (exp / "model.pth").exists()


def test_configuration_error_from_the_script_is_one_line(tmp_path):
    proc = run(tmp_path / "exp", "--alpha", "1.5", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --alpha must lie in [0, 1], got 1.5"]


@pytest.mark.slow
def test_batch_not_divisible_by_world_size(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(_free_port()), "main_vicregl.py", *TINY, "--exp-dir",
                           str(tmp_path), "--batch-size", "15"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode != 0
    assert "--batch-size 15 must be a positive multiple of the number of processes (2)" in proc.stderr


def test_corrupted_checkpoint_is_refused_and_kept(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "model.pth").write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    before = digest(exp / "model.pth")
    proc = run(exp, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.pth" in proc.stderr and "left untouched" in proc.stderr
    assert digest(exp / "model.pth") == before


@pytest.mark.parametrize("flags,message", [
    (["--arch", "resnet18"], "written by a run with --arch resnet_test (now resnet18)"),
    (["--dilated", "1"], "--dilated 0 (now 1)"),  # the dilated network is another model
])
def test_checkpoint_of_another_model_is_refused_and_kept(finished_run, tmp_path, flags, message):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "model.pth").write_bytes((finished_run / "model.pth").read_bytes())
    proc = run(exp, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert digest(exp / "model.pth") == digest(finished_run / "model.pth")


def test_dilated_network_gives_the_location_grids_of_its_maps():
    """--dilated 1 keeps layer3 and layer4 at stride 8: crops of 64 and 32 pixels give 8x8 and 4x4
    maps (64 / 8, 32 / 8) and grids; the original network gives 2x2 and 1x1 (64 / 32, 32 / 32)."""
    import main_vicregl
    base = [a for a in TINY if a != "--small-input"]
    for dilated, sides in (("1", [8, 4]), ("0", [2, 1])):
        args = main_vicregl.get_args_parser().parse_args([*base, "--size-crops", "64", "32", "--dilated", dilated])
        assert main_vicregl.crop_grid_sizes(args) == sides
        model = main_vicregl.build_model(args, 10, torch.device("cpu"))
        maps = model.backbone(torch.zeros(1, 3, 64, 64))[0]
        assert maps.shape[1] == sides[0] ** 2, maps.shape


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(finished_run, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    good = torch.load(finished_run / "model.pth", weights_only=True)
    good["epoch"] = 1  # pretend only the first epoch was done
    torch.save(good, exp / "model.pth")
    before = digest(exp / "model.pth")
    proc = run(exp, "--base-lr", "1e36", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "at step" in proc.stderr and "last good checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(exp / "model.pth") == before
