"""demo.py on real images and what it relies on: the sizing of a run to its data and time budget
(pure functions, against hand-computed values), main_vicregl.py's --max-steps and --time-budget,
evaluate.py's --feature-probe and evaluation subsets, one-line errors, and results.json from a
tiny run on a generated folder of images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import evaluate
import training
from pictures.draw import figure_size
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY_PRETRAIN = ["--dataset", "builtin", "--builtin-images", "64", "--builtin-size", "32", "--arch", "resnet_test",
                 "--small-input", "--size-crops", "32", "16", "--num-crops", "2", "2", "--min_scale_crops", "0.3",
                 "0.1", "--max_scale_crops", "1", "0.4", "--num_matches", "4", "2", "--mlp", "32-32", "--maps-mlp",
                 "16-16", "--batch-size", "8", "--num-workers", "0", "--log-tensors-interval", "0", "--device", "cpu",
                 "--base-lr", "0.256", "--end-lr-ratio", "0.01"]


def pretrain(exp: Path, *flags: str) -> None:
    """main_vicregl.py on the tiny built-in setting with ``flags``, writing to ``exp``; it must succeed."""
    proc = subprocess.run([sys.executable, "main_vicregl.py", *TINY_PRETRAIN, *flags, "--exp-dir", str(exp)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def stats(exp: Path):
    return [json.loads(l) for l in (exp / "stats.txt").read_text().splitlines() if l.startswith("{")]


def make_folder(root: Path, sizes=((40, 48), (120, 90)), classes=3, train=10, val=4) -> Path:
    """DIR/{train,val}/<class>/ with noisy images of one colour per class, of the given sizes in turn,
    as JPEG and PNG."""
    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][:classes]
    for split, n in (("train", train), ("val", val)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                pixels = np.clip(rng.normal(colour, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / (f"{i}.png" if i % 3 == 0 else f"{i}.jpg"))
    return root


# ----------------------------------------------------------------------------- sizing (pure functions)

@pytest.mark.parametrize("epoch_steps, warmup, cap, expected", [
    (800, 80, 0, (800, 80)),      # no cap: the schedule of --epochs
    (800, 80, 800, (800, 80)),    # a cap that does not cut
    (800, 80, 5000, (800, 80)),
    (1000, 50, 200, (200, 10)),   # compressed: warmup keeps its 5%
    (800, 80, 12, (12, 1)),       # 1.2 rounds to 1
    (800, 80, 3, (3, 1)),         # 0.3 would round to 0: at least one warmup step
    (800, 0, 12, (12, 0)),        # no warmup stays none
])
def test_schedule_steps_compresses_the_epoch_schedule(epoch_steps, warmup, cap, expected):
    assert training.schedule_steps(epoch_steps, warmup, cap) == expected


def test_time_budget_follows_the_clock():
    # 100 s budget, started at t=10 after 30 s of an earlier run
    clock = training.TimeBudget(100, start=10.0, used_before=30.0)
    assert clock.used(10.0) == 30.0 and clock.used(40.0) == 60.0
    clock.tick(50.0)                      # first step: no duration known yet
    assert not clock.done(79.9)           # 30 + 69.9 s used, and a step of unknown length
    clock.tick(54.0)                      # steps of 4 s
    assert not clock.done(75.9) and clock.done(76.0)  # 96 s used + 4 s: the next step would overrun


@pytest.mark.parametrize("images, expected", [(50000, 128), (4000, 128), (300, 128), (255, 64), (36, 16),
                                              (16, 8), (17, 8)])
def test_batch_size_leaves_two_batches_per_epoch(images, expected):
    assert demo.batch_size_for(images) == expected


@pytest.mark.parametrize("train, val, minutes, expected", [
    (20000, 10000, 10, (10000, 5000)),   # 1,000 and 500 a minute
    (4000, 1000, 10, (4000, 1000)),      # never more than there are
    (50000, 10000, 1, (1000, 500)),      # the floor
    (50000, 10000, 0.25, (1000, 500)),
    (36, 12, 10, (36, 12)),
])
def test_eval_subsets(train, val, minutes, expected):
    assert demo.eval_subsets(train, val, minutes) == expected


def test_pretraining_gets_what_the_evaluations_leave():
    # 600 s - 30 s so far - 45 s for the second evaluation - 10 s start-up and export = 515 s
    assert demo.pretrain_minutes(10, 30, 45, overhead_s=10, margin=0) == pytest.approx(515 / 60)
    # and a reserve of 2% of the 600 s: 12 s less
    assert demo.pretrain_minutes(10, 30, 45, overhead_s=10, margin=0.02) == pytest.approx(503 / 60)
    with pytest.raises(UserError, match="--minutes 1 is too short"):
        demo.pretrain_minutes(1, 20, 25, overhead_s=10, margin=0)  # 5 s left


def test_two_pretrainings_share_what_the_heads_leave():
    # the segmentation demo: 1500 s - 100 s so far (the random head) - 2 x 90 s for two more heads
    # - 2 x 10 s start-up and export = 1200 s, i.e. 600 s = 10 minutes for each pretraining
    assert demo.pretrain_minutes(25, 100, 90, evals_left=2, pretrainings=2, overhead_s=10, margin=0) == \
        pytest.approx(10)
    # a reserve of 10% (150 s) leaves 1050 s to share
    assert demo.pretrain_minutes(25, 100, 90, evals_left=2, pretrainings=2, overhead_s=10, margin=0.1) == \
        pytest.approx(525 / 60)
    with pytest.raises(UserError, match="10 s would be left for each pretraining"):
        demo.pretrain_minutes(2, 40, 20, evals_left=2, pretrainings=2, overhead_s=10, margin=0)  # (120-40-40-20)/2


# ----------------------------------------------------------------------------- main_vicregl.py

@pytest.mark.slow
def test_max_steps_stops_mid_epoch_with_the_compressed_schedule(tmp_path):
    # 64 images / 8 = 8 steps an epoch; --epochs 10 (80 steps, 8 of warmup) compressed into 11 steps:
    # warmup round(8 * 11 / 80) = 1 step, then a cosine from 0.256 * 8 / 256 = 0.008 down to 0.00008
    exp = tmp_path / "run"
    pretrain(exp, "--epochs", "10", "--warmup-epochs", "1", "--max-steps", "11")
    lines = stats(exp)
    assert [l["st"] for l in lines] == list(range(11)) and lines[-1]["ep"] == 1
    peak, end = 0.008, 0.00008
    expected = [0.0] + [end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (s - 1) / 10)) for s in range(1, 11)]
    assert [l["lr"] for l in lines] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    ckpt = torch.load(exp / "model.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 3)  # where it stopped: 8 + 3 steps
    assert (exp / "backbone.pth").is_file()
    # a second run resumes there and has nothing left to do
    pretrain(exp, "--epochs", "10", "--warmup-epochs", "1", "--max-steps", "11")
    assert len(stats(exp)) == 11


@pytest.mark.slow
def test_time_budget_schedule_follows_the_clock_across_a_resume(tmp_path):
    # a budget of 100 hours (10% warmup): whatever this machine's speed, the few seconds of these
    # steps are far inside the warmup, so every lr is positive, rising, and a small part of the peak.
    # --epochs 10^8 (800 million steps): the steps are further behind in theirs, so the clock leads as
    # long as a step takes more than 360,000 s / 8e8 = 0.45 ms (with 10^6 epochs a fast machine's 40-ms
    # steps were ahead of the clock and the schedule followed them instead)
    exp, peak = tmp_path / "run", 0.008
    used = []
    for cap in ("6", "9"):  # the second run resumes the first and continues its clock
        pretrain(exp, "--epochs", "100000000", "--warmup-epochs", "10000000", "--time-budget", "6000",
                 "--max-steps", cap)
        used.append(torch.load(exp / "model.pth", weights_only=True)["args"]["budget_used_s"])
    lrs = [l["lr"] for l in stats(exp)]
    assert len(lrs) == 9 and all(0 < a < b < 0.05 * peak for a, b in zip(lrs, lrs[1:]))
    # warmup: a tenth of the budget = 36,000 s, lr = peak * seconds used / 36,000 at the start of each step. The
    # resumed steps start after the first run's time (saved when it ended) and before the second run's end
    for lr in lrs[6:]:
        assert peak * used[0] / 36000 < lr <= peak * used[1] / 36000


def test_time_budget_schedule_ends_with_the_epochs_when_they_come_first(tmp_path):
    # a budget of 100 hours, but --epochs 2 (16 steps) ends the run within seconds: the steps are further
    # along than the clock, so the schedule is the steps' own: 8 steps of warmup, then the cosine from
    # 0.008 down to 0.00008 over the other 8, nearly spent at the last step
    exp = tmp_path / "run"
    pretrain(exp, "--epochs", "2", "--warmup-epochs", "1", "--time-budget", "6000")
    peak, end = 0.008, 0.00008
    expected = [peak * s / 8 for s in range(8)] + [end + (peak - end) * 0.5 * (1 + np.cos(np.pi * s / 8))
                                                  for s in range(8)]
    lrs = [l["lr"] for l in stats(exp) if "st" in l]
    # step 0: the clock leads by the start-up time, a tiny share of 100 hours (under 1e-4 for anything
    # below half an hour, and far below step 1's 0.001)
    assert 0 < lrs[0] < 1e-4 and lrs[1:] == pytest.approx(expected[1:], rel=1e-9, abs=1e-12)
    assert (exp / "backbone.pth").is_file()


@pytest.mark.slow
def test_pretrain_steps_counts_the_unlogged_last_steps_of_a_run_the_clock_ends(tmp_path):
    # 640 images / 8 = 80 steps an epoch; with one log line a day only the epochs' last steps are
    # logged, and a 9-second budget ends the run within an epoch (79 positions in 80): its last steps
    # have no line in stats.txt, and the count must still include them
    exp = tmp_path / "run"
    pretrain(exp, "--builtin-images", "640", "--epochs", "1000", "--time-budget", "0.15",
             "--log-tensors-interval", "86400")
    ckpt = torch.load(exp / "model.pth", weights_only=True)
    done = ckpt["epoch"] * 80 + ckpt["step_in_epoch"]
    assert done > 0 and demo.pretrain_steps(exp) == done
    logged = [l["st"] for l in stats(exp) if "st" in l]
    assert all((s + 1) % 80 == 0 for s in logged)  # only epoch ends were logged


def test_a_spent_time_budget_ends_the_run_cleanly(tmp_path):
    # 6 ms: spent before the first step (building the data and the model takes longer)
    exp = tmp_path / "run"
    pretrain(exp, "--epochs", "10", "--time-budget", "0.0001")
    assert not [l for l in stats(exp) if "st" in l] and (exp / "backbone.pth").is_file()
    assert torch.load(exp / "model.pth", weights_only=True)["step_in_epoch"] == 0


# ----------------------------------------------------------------------------- evaluate.py

def test_random_subset_is_seeded_sorted_and_sized():
    data = torch.utils.data.TensorDataset(torch.arange(100), torch.zeros(100))
    data.num_classes = 1
    a, b = evaluate.random_subset(data, 30, seed=0), evaluate.random_subset(data, 30, seed=0)
    assert a.indices == b.indices == sorted(set(a.indices)) and len(a) == 30 and a.num_classes == data.num_classes
    assert evaluate.random_subset(data, 30, seed=1).indices != a.indices
    assert evaluate.random_subset(data, 0, seed=0) is data and evaluate.random_subset(data, 100, seed=0) is data


class Quiet:
    def log(self, *args, **kwargs):
        pass


def test_feature_probe_folds_the_standardisation_into_the_head():
    # features far from zero and of very different scales: the head learns on standardised ones, and
    # after folding, head(raw features) must classify exactly as it did the standardised features
    torch.manual_seed(0)
    labels = torch.arange(400) % 4
    centres = torch.randn(4, 16) * torch.logspace(-2, 2, 16)
    raw = centres[labels] + torch.randn(400, 16) * torch.logspace(-2, 2, 16) * 0.5 + 50.0
    backbone = torch.nn.Identity()
    model = evaluate.LinearClassifier(backbone, 16, 4, frozen=True)
    args = evaluate.get_args_parser().parse_args(["--epochs", "20", "--lr-head", "0.05", "--batch-size", "64"])
    optimizer, scheduler = evaluate.build_optimizer(args, model)
    last, best = evaluate.probe_on_features(model, optimizer, scheduler, (raw[:300], labels[:300], raw[300:],
                                            labels[300:]), args, Quiet(), 0.0)
    assert last["acc1"] > 80  # separable once standardised
    with torch.no_grad():
        hits = (model.head(raw[300:]).argmax(1) == labels[300:]).float().mean() * 100
    assert float(hits) == pytest.approx(last["acc1"])


# ----------------------------------------------------------------------------- demo.py

def test_check_data_counts_and_refuses_unusable_folders(tmp_path):
    root = make_folder(tmp_path / "ok")
    assert demo.check_data("imagefolder", root, False) == {"train": 30, "val": 12, "classes": 3}
    with pytest.raises(UserError, match="does not exist"):
        demo.check_data("imagefolder", tmp_path / "nowhere", False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        demo.check_data("imagefolder", tmp_path / "empty", False)
    few = make_folder(tmp_path / "few", train=3, val=1)
    with pytest.raises(UserError, match="9 training and 3 validation images; the demo needs at least 16"):
        demo.check_data("imagefolder", few, False)
    one = make_folder(tmp_path / "one", classes=1, train=20)
    with pytest.raises(UserError, match="at least 2 classes"):
        demo.check_data("imagefolder", one, False)
    other = make_folder(tmp_path / "other")
    (other / "val" / "class2").rename(other / "val" / "classX")
    with pytest.raises(UserError, match="same class folders.*'class2'"):
        demo.check_data("imagefolder", other, False)


def test_large_images_are_shrunk_once_small_ones_used_as_they_are(tmp_path):
    small = make_folder(tmp_path / "small", sizes=((32, 32), (40, 60)))
    assert demo.working_images(small, tmp_path / "exp1") == small
    large = make_folder(tmp_path / "large", sizes=((40, 48), (300, 200)))
    out = demo.working_images(large, tmp_path / "exp2")
    assert out == tmp_path / "exp2" / "images-32px"
    shrunk = sorted(out.glob("*/*/*.png"))
    assert len(shrunk) == 42
    sizes = {p.name: Image.open(p).size for p in shrunk if p.parent.name == "class0" and p.parent.parent.name == "train"}
    assert sizes["1.jpg.png"] == (48, 32) and sizes["0.png.png"] == (32, 38)  # shorter side 32, aspect kept
    assert demo.working_images(large, tmp_path / "exp2") == out  # reused


def run_demo(*args, timeout=600):
    return subprocess.run([sys.executable, "demo.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{tmp}/nowhere"], "nowhere does not exist"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "data_batch_1"),
    (["--data-dir", "{tmp}/few"], "the demo needs at least 16"),
    (["--data-dir", "{tmp}/ok", "--minutes", "0"], "--minutes must be > 0"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    make_folder(tmp_path / "few", train=3, val=1)
    make_folder(tmp_path / "ok")
    proc = run_demo(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_results_json_from_a_tiny_run(tmp_path):
    root = make_folder(tmp_path / "photos", sizes=((40, 48), (120, 90)))
    exp = tmp_path / "exp"
    proc = run_demo("--data-dir", str(root), "--minutes", "5", "--max-steps", "2", "--arch", "resnet_test",
                    "--exp-dir", str(exp))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((exp / "results.json").read_text())
    for name in ("random", "pretrained"):
        assert set(results[name]) == {"knn_top1", "linear_top1"}
        assert all(0 <= v <= 100 for v in results[name].values())
        assert results[name]["knn_top1"] == round(stats(exp / f"eval_{name}")[-1]["knn_top1"], 2)
    assert 0 < results["minutes"] < 5
    assert demo.pretrain_steps(exp / "pretrain") == 2
    # identical evaluation settings: the two command lines differ only in --pretrained and --exp-dir
    commands = [(exp / f"eval_{name}" / "stats.txt").read_text().splitlines()[0].split() for name in
                ("random", "pretrained")]
    drop = {"--pretrained", "--exp-dir"}
    kept = [[a for i, a in enumerate(c) if a not in drop and c[i - 1] not in drop] for c in commands]
    assert kept[0] == kept[1] and "--feature-probe" in kept[0] and "--train-images" in kept[0]


@pytest.mark.slow
def test_builtin_demo_runs_the_same_timed_comparison(tmp_path):
    """make demo's path: the built-in images drawn from --builtin-seed in every script, the random and
    the pretrained network evaluated with identical settings, results.json written."""
    exp = tmp_path / "exp"
    proc = run_demo("--quick", "--max-steps", "2", "--images", "64", "--builtin-seed", "3", "--arch", "resnet_test",
                    "--exp-dir", str(exp))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((exp / "results.json").read_text())
    assert results["pretrained"]["knn_top1"] == round(stats(exp / "eval_pretrained")[-1]["knn_top1"], 2)
    assert 0 < results["minutes"] < 1.5 and demo.pretrain_steps(exp / "pretrain") == 2
    for run in ("eval_random", "pretrain", "eval_pretrained"):
        command = (exp / run / "stats.txt").read_text().splitlines()[0].split()
        assert command[command.index("--builtin-seed") + 1] == "3", run
        assert command[command.index("--dataset") + 1] == "builtin", run
    assert "seed 3" in results["data"] and "10 classes" in results["data"]


@pytest.mark.slow
def test_segmentation_demo_compares_three_backbones_through_one_head(tmp_path):
    """--task segmentation: VICRegL (alpha 0.75) pretrained for its time, VICReg (alpha 1) for as many
    steps with otherwise identical flags, on mosaic scenes with 8x8 maps; then the same head (same flags
    and seed) on them and on a random network; results.json holds each head's final mIoU; the images
    come from --builtin-seed everywhere."""
    exp = tmp_path / "exp"
    proc = run_demo("--task", "segmentation", "--quick", "--max-steps", "2", "--images", "64", "--builtin-seed", "3",
                    "--arch", "resnet_test", "--exp-dir", str(exp))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((exp / "results.json").read_text())
    assert set(results) == {"random", "vicreg", "vicregl", "minutes", "data"} and 0 < results["minutes"] < 3
    for name in ("random", "vicreg", "vicregl"):
        val = [json.loads(l[len("Val: "):]) for l in (exp / f"head_{name}" / "stats.txt").read_text().splitlines()
               if l.startswith("Val: ")]
        assert results[name]["miou"] == round(val[-1]["mIoU"], 2) and 0 < results[name]["miou"] <= 100
    commands = {run: (exp / run / "stats.txt").read_text().splitlines()[0].split()
                for run in ("head_random", "head_vicreg", "head_vicregl", "vicreg", "vicregl")}

    def value(run, flag):
        return commands[run][commands[run].index(flag) + 1]

    for run in commands:
        assert value(run, "--builtin-seed") == "3" and value(run, "--builtin-size") == "64", run
        assert value(run, "--builtin-layout") == "mosaic" and value(run, "--dilated") == "1", run
    drop = {"--pretrained", "--exp-dir", "--alpha", "--time-budget", "--max-steps"}

    def kept(c):
        return [a for i, a in enumerate(c) if a not in drop and c[i - 1] not in drop]

    assert kept(commands["head_random"]) == kept(commands["head_vicreg"]) == kept(commands["head_vicregl"])
    assert value("head_random", "--stages") == "4" and "--pretrained" not in commands["head_random"]
    assert kept(commands["vicreg"]) == kept(commands["vicregl"])
    assert value("vicregl", "--num_matches") == "20" and value("vicregl", "--no-flip-grid") == "0"
    alphas = {run: float(value(run, "--alpha")) for run in ("vicreg", "vicregl")}
    assert alphas == {"vicreg": 1.0, "vicregl": 0.75}
    assert "--time-budget" in commands["vicregl"] and "--time-budget" not in commands["vicreg"]
    assert demo.pretrain_steps(exp / "vicreg") == demo.pretrain_steps(exp / "vicregl") == 2
    assert value("vicreg", "--max-steps") == "2"
    with Image.open(exp / "features.png") as im:  # image, random, vicreg, vicregl: four columns
        assert im.size == figure_size(4, 4, 160, 160)


def test_segmentation_demo_refuses_real_images(tmp_path):
    proc = run_demo("--task", "segmentation", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "built-in dataset" in proc.stderr and "Traceback" not in proc.stderr


def test_brief_progress_lines():
    assert demo.brief('{"ep": 0, "st": 5, "lr": 0.1, "l": 1.5}') == "epoch 0 step 5: loss 1.500\n"
    assert demo.brief('{"ep": 0, "it": 100, "lr": 0.1, "loss": 0.25, "t": "000000010"}') == \
        "head iteration 100: loss 0.250\n"
    val = 'Val: {"it": 1000, "mIoU": 24.723, "aAcc": 59.3806, "mAcc": 38.8, "IoU": {"background": 85.49}}'
    assert demo.brief(val) == "iteration 1000: mIoU 24.7%, pixel accuracy 59.4%\n"
    assert demo.brief("loaded weights\n") == "loaded weights\n"


def test_help_shows_no_none_defaults():
    # Flags whose default is None explain their default in their own words; the formatter must not add
    # "(default: None)" after it, while the other flags keep their "(default: ...)".
    text = " ".join(demo.get_args_parser().format_help().split())
    assert "(default: None)" not in text
    assert "(default: 7.5 for the built-in dataset" in text
    assert "'cpu' or 'cuda' (default: auto)" in text
