"""The ten-minute demo: pretrain, then compare the result with a randomly initialised copy of the same
network by k-NN and by a linear probe, with the same evaluation settings for both.

    python demo.py                                        # the built-in dataset (make demo): exp/demo/
    python demo.py --data-dir ~/photos                    # your images: ~/photos/{train,val}/<class>/<image>
    python demo.py --dataset cifar10 --data-dir ~/data --download
    python demo.py --data-dir ~/photos --minutes 5        # a smaller time budget
    python demo.py --task segmentation                    # dense features: exp/demo-seg/ (28 minutes)

Every run sizes itself to --minutes, counted from the start of the command (default: 7.5 for the
built-in dataset, so that make demo with its install stays within ten minutes; 10 for real images),
with 2% of it kept in reserve: the random network is evaluated first, which
measures what an evaluation costs; pretraining then gets the time that is left after a second
evaluation of that cost (main_vicregl.py --time-budget: its learning-rate schedule follows the clock
and ends with the budget), and the pretrained network is evaluated exactly as the random one. The k-NN
bank and the probe's training set are a random subset of the training images, sized to the budget.
Images of any size work: large ones are first shrunk once (shorter side 32 pixels, the working
resolution) into a copy in the experiment folder, so that neither pretraining nor evaluation decodes
large files again and again.

With --task segmentation it compares dense features instead, on the built-in dataset's masks:
VICRegL (global and local loss) and VICReg (global loss only) pretrained for the same number of steps,
and a random network, each under the same frozen linear segmentation head (mIoU); see segmentation_demo.

It runs the project's own scripts (main_vicregl.py, evaluate.py) as a user would, one after the other,
and reads their stats.txt files; everything they wrote stays in --exp-dir, with results.json (and
results.md) beside. Running it again resumes or reuses what is already there: use another --exp-dir
for a fresh run.
"""
import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# the run's clock starts here, before torch is imported: --minutes bounds the whole process
STARTED = time.time()

import builtin_data
import datasets
import utils
from models.checkpoints import CheckpointError, read_checkpoint
from utils import UserError

ROOT = Path(__file__).resolve().parent


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to a flag's help, except where the default is None: those flags say in
    their own words what happens without them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VICRegL demo: pretrain, then k-NN and a linear probe against a random network",
                                formatter_class=_HelpFormatter)
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                   help="classification: pretrain, then k-NN and a linear probe against a random network; "
                        "segmentation (built-in dataset only): VICRegL and VICReg pretrained for the same number of steps, "
                        "then a frozen linear segmentation head on each and on a random network (mIoU)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="your images: DIR/train/<class>/<image> and DIR/val/<class>/<image> (any size, the same "
                        "class folders in both); with --dataset cifar10/cifar100/stl10, the folder of the official "
                        "files. Without it, and without --dataset, the built-in dataset")
    p.add_argument("--dataset", default=None, choices=["imagefolder", "cifar10", "cifar100", "stl10"],
                   help="how to read --data-dir (default: imagefolder, class folders)")
    p.add_argument("--download", action="store_true",
                   help="with --dataset cifar10/cifar100/stl10: download the official files into --data-dir when "
                        "they are missing (before the clock starts)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the whole run, evaluations included, counted from the start of the "
                        "command (a --download is not counted; 2%% is kept in reserve) (default: 7.5 for the built-in "
                        "dataset, 10 for real images, 28 for --task segmentation)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="at most this many pretraining steps (0: as many as fit in --minutes); "
                        "for a quick check of the pipeline")
    p.add_argument("--exp-dir", type=Path, default=None,
                   help="where every output goes (default exp/demo for the built-in dataset, "
                        "exp/demo-<dataset or folder name> for real images, exp/demo-seg for --task segmentation)")
    p.add_argument("--arch", default="resnet_mini", help="backbone (a ResNet, with its standard stem)")
    p.add_argument("--images", type=int, default=BUILTIN_IMAGES, help="built-in dataset: training images")
    p.add_argument("--builtin-seed", type=int, default=0, help="built-in dataset: which images are drawn")
    p.add_argument("--quick", action="store_true", help="a short run that checks the pipeline, too short to learn "
                   "much: --minutes 1.5 (segmentation: 3, with short heads)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    datasets.add_max_image_pixels_argument(p)  # also passed on to main_vicregl.py and evaluate.py
    return p


# The pretraining recipe for 32-pixel images, chosen on real CIFAR-10 images and used for the built-in
# ones as well. docs/experiments.md ("Results on CIFAR-10 images") has the runs behind each choice and what
# was tried without a gain.
# - Standard ResNet stem (no --small-input): its stride-4 stem leaves a 32-pixel crop 16 times fewer
#   positions than the small-input stem, so many more images fit in the budget. Its last feature map is
#   then 1x1, and the local loss matches that single position (--num_matches 1 1).
# - Four 32-pixel crops per image, no small crops (the losses pair each of the first two with every other):
#   fewer steps than two crops in the same time, but more learnt per decoded image and per step.
# - No Gaussian blur (--blur-prob 0 0): the reference's sigma of up to 2 pixels, meant for 224- and
#   96-pixel crops, wipes out most of a 32-pixel crop.
# - Global expander 512-512-512, local 256-256-256: at this backbone's size the expanders are most of a
#   step's cost, and narrower ones leave more steps in the budget.
# - Pretraining runs for the time it is given (--time-budget): --epochs and --warmup-epochs only shape the
#   schedule (the warmup's share of the run). A small dataset on a fast machine may finish its epochs
#   earlier, and then the schedule ends with them.
SIDE = 32  # working resolution: crops of 32 pixels, evaluation at 32
BATCH = 128
PRETRAIN = ["--size-crops", "32", "--num-crops", "4", "--min_scale_crops", "0.3", "--max_scale_crops", "1",
                 "--num_matches", "1", "1", "--mlp", "512-512-512", "--maps-mlp", "256-256-256", "--epochs", "100",
                 "--warmup-epochs", "5", "--optimizer", "adamw", "--base-lr", "0.02", "--weight-decay", "0.01",
                 "--blur-prob", "0", "0",
                 "--channels-last", "--log-tensors-interval", "30"]
# Small training images of one size are decoded into memory once and their views made a batch at a time
# in the training process (--in-memory --num-workers 0), which then trains on every core: more steps than
# with a loader worker making the views image by image (docs/speed.md). Other images (of several sizes,
# or more than IN_MEMORY_BYTES decoded) keep the worker.
IN_MEMORY = ["--in-memory", "--num-workers", "0"]
WORKER = ["--num-workers", "1"]
IN_MEMORY_BYTES = 1 << 30
EVALUATE = ["--crop-size", "32", "--resize-size", "32", "--batch-size", "256",
                 "--feature-probe", "--epochs", "100", "--lr-head", "0.01", "--weight-decay", "1e-4",
                 "--workers", "1", "--knn", "--knn-k", "20", "--knn-temperature", "0.07"]
# k-NN with 20 neighbours, as evaluate.py: 200 helped a little on CIFAR-10 and hurt much on the built-in
# textures (docs/experiments.md, "Tried without a gain").
# Evaluation subsets grow with the budget: 1,500 images a minute (bank and queries, once per backbone)
# keep both evaluations to about a tenth of the budget at the feature-extraction speed of a slow 2-core
# CPU (docs/experiments.md, "20,000 + 10,000 images").
BANK_PER_MINUTE, QUERIES_PER_MINUTE, MIN_BANK, MIN_QUERIES = 1000, 500, 1000, 500
MIN_TRAIN_IMAGES, MIN_VAL_IMAGES, MIN_PRETRAIN_S = 16, 2, 20.0
# The built-in dataset: 32-pixel scenes with one object (its texture is the class); images are drawn on
# demand, so the training set can be large.
BUILTIN = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-max-objects", "1"]
BUILTIN_IMAGES, BUILTIN_VAL_IMAGES = 20000, 2000
BUILTIN_MINUTES, REAL_MINUTES, QUICK_MINUTES = 7.5, 10.0, 1.5
# Start-up and export of the pretraining process, outside the time it measures itself.
PRETRAIN_OVERHEAD_S = 10.0
# The share of the budget kept in reserve, so that the run ends within --minutes although the second
# evaluation and the pretraining's last step overrun their estimates by seconds (docs/experiments.md,
# "20,000 + 10,000 images").
MARGIN = 0.02


def brief(line: str) -> str:
    """One short progress line for a JSON stats line or a segmentation "Val: " line (the full line is in
    stats.txt), or ''."""
    try:
        stats = json.loads(line[len("Val: "):] if line.startswith("Val: ") else line)
    except ValueError:
        return line
    if "mIoU" in stats:  # segmentation/train.py's evaluation
        return f"iteration {stats['it']}: mIoU {stats['mIoU']:.1f}%, pixel accuracy {stats['aAcc']:.1f}%\n"
    if "it" in stats and "loss" in stats:  # segmentation/train.py
        return f"head iteration {stats['it']}: loss {stats['loss']:.3f}\n"
    if "st" in stats and "l" in stats:  # main_vicregl.py
        return f"epoch {stats['ep']} step {stats['st']}: loss {stats['l']:.3f}\n"
    if "acc1" in stats and "epoch" in stats:  # evaluate.py
        if stats.get("summary") or (stats["epoch"] + 1) % 10 == 0 or stats["epoch"] < 1:
            return f"probe epoch {stats['epoch']}: val top-1 {stats['acc1']:.1f}%\n"
        return ""
    if "knn_top1" in stats and "summary" not in stats:
        return f"k-NN top-1 {stats['knn_top1']:.1f}%\n"
    return ""


def run(cmd: List[str], log: Path) -> float:
    """Run one of the project's scripts, showing its output and keeping a copy in ``log``; returns the
    seconds it took."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    utils.append_text(str(log), "")  # a log that cannot be written stops the demo before the script starts
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            utils.append_text(str(log), line)  # a failed write (full disk) is a one-line UserError
            text = brief(line) if line.startswith(("{", "Val: ")) else line  # JSON lines are in stats.txt
            if text:
                sys.stdout.write("  " + text)
                sys.stdout.flush()
    except UserError:
        proc.kill()  # nobody would read its output any more
        proc.wait()
        raise
    if proc.wait() != 0:
        raise UserError(f"{cmd[0]} failed (exit {proc.returncode}); its output is in {log}")
    return time.time() - start


def stats_lines(exp: Path, prefix: str = "") -> List[dict]:
    """The JSON lines of ``exp``/stats.txt that start with ``prefix`` followed by "{", parsed."""
    return [json.loads(l[len(prefix):]) for l in (exp / "stats.txt").read_text().splitlines()
            if l.startswith(prefix + "{")]


def summary(exp: Path) -> dict:
    """The last summary line of an evaluate.py run."""
    return [l for l in stats_lines(exp) if l.get("summary")][-1]


def pretrain_steps(exp: Path) -> int:
    """Steps done by a main_vicregl.py run, as its checkpoint counts them (stats.txt may miss the last
    ones: a run that the clock ends logs no line for its last step); for a checkpoint without the count,
    the last logged step + 1 (0 without a log line)."""
    ckpt = exp / "model.pth"
    if ckpt.is_file():
        try:
            steps = read_checkpoint(ckpt).get("steps")
        except CheckpointError as e:
            raise UserError(str(e)) from None
        if isinstance(steps, int):
            return steps
    return max((l.get("st", -1) for l in stats_lines(exp)), default=-1) + 1


# ----------------------------------------------------------------------------- sizing (real images)

def batch_size_for(train_images: int, batch: int = BATCH) -> int:
    """The pretraining batch: ``batch``, or for a small training set the largest power of two that
    leaves at least two batches per epoch."""
    fit = 2 ** int(math.log2(max(train_images // 2, 1)))
    return min(batch, fit)


def eval_subsets(train_images: int, val_images: int, minutes: float) -> Tuple[int, int]:
    """(k-NN bank and probe training images, validation images) for a budget of ``minutes``: a share of
    the budget (BANK_PER_MINUTE, QUERIES_PER_MINUTE, with a floor), never more than there are."""
    bank = max(MIN_BANK, round(BANK_PER_MINUTE * minutes))
    queries = max(MIN_QUERIES, round(QUERIES_PER_MINUTE * minutes))
    return min(train_images, bank), min(val_images, queries)


def pretrain_minutes(minutes: float, elapsed_s: float, eval_s: float, evals_left: int = 1, pretrainings: int = 1,
                     overhead_s: float = PRETRAIN_OVERHEAD_S, margin: float = MARGIN) -> float:
    """Each pretraining's --time-budget (minutes): what is left of ``minutes`` after ``elapsed_s`` seconds
    so far, ``evals_left`` more evaluations as long as the first (``eval_s``), each pretraining
    process's own start-up and export and a reserve of ``margin`` of the budget, shared by
    ``pretrainings`` runs. A UserError when less than MIN_PRETRAIN_S seconds would be left for each."""
    total_s = minutes * 60 * (1 - margin)
    left = (total_s - elapsed_s - evals_left * eval_s - pretrainings * overhead_s) / pretrainings
    if left < MIN_PRETRAIN_S:
        raise UserError(f"--minutes {minutes:g} is too short for this data: an evaluation takes "
                        f"{eval_s:.0f} s and {left:.0f} s would be left for each pretraining (at least "
                        f"{MIN_PRETRAIN_S:.0f} s needed)")
    return left / 60


# ----------------------------------------------------------------------------- real images

def check_data(dataset: str, data_dir: Path, download: bool) -> Dict[str, int]:
    """Counts of a real dataset, {"train": .., "val": .., "classes": ..}; anything unusable (missing
    folder, no classes, too few images, class folders that differ between train/ and val/) is a
    one-line UserError."""
    name = "imagenet1k" if dataset == "imagefolder" else dataset
    try:
        train = datasets.build_dataset(name, data_dir, "train", download=download)
        val = datasets.build_dataset(name, data_dir, "val")
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if getattr(train, "num_classes", 0) < 2:
        raise UserError(f"{data_dir}: the demo compares classifiers and needs at least 2 classes, found "
                        f"{getattr(train, 'num_classes', 0)}")
    if dataset == "imagefolder" and train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise UserError(f"{data_dir}/train and {data_dir}/val must have the same class folders "
                        f"({len(train.classes)} and {len(val.classes)}; e.g. '{only[0]}' is in one only)")
    if len(train) < MIN_TRAIN_IMAGES or len(val) < MIN_VAL_IMAGES:
        raise UserError(f"{data_dir}: {len(train)} training and {len(val)} validation images; the demo needs "
                        f"at least {MIN_TRAIN_IMAGES} and {MIN_VAL_IMAGES}")
    return {"train": len(train), "val": len(val), "classes": train.num_classes}


def _header_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) of an image file from its header only; None when it cannot be read."""
    try:
        with datasets.open_regular_file(path) as f, datasets.open_image(f) as im:
            return im.size
    except (OSError, SyntaxError, ValueError):
        return None


def _shorter_side(path: str) -> int:
    size = _header_size(path)
    return min(size) if size else 0


def needs_shrinking(paths: List[str], side: int, sample: int = 64) -> bool:
    """Whether images are larger than twice ``side`` (shorter side), judged on up to ``sample`` files
    spread over ``paths``."""
    step = max(len(paths) // sample, 1)
    return any(_shorter_side(p) > 2 * side for p in paths[::step][:sample])


def _shrink_one(job: Tuple[str, str, int]) -> bool:
    """Write ``src`` with its shorter side resized to ``side`` (never enlarged) as a PNG ``dst``; False
    when ``src`` cannot be read (it is left out, as the training scripts would skip it)."""
    from PIL import Image
    src, dst, side = job
    try:
        with datasets.open_regular_file(src) as f, datasets.open_image(f) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, at least side x side
            im = im.convert("RGB")
            scale = side / min(im.size)
            if scale < 1:
                im = im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))),
                               Image.BICUBIC)
            im.save(dst, format="PNG")
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def working_images(data_dir: Path, exp: Path, side: int = SIDE) -> Path:
    """The class folders to train on: ``data_dir`` itself when its images are small already, else a copy
    under ``exp/images-<side>px`` with every image's shorter side shrunk to ``side`` pixels (made once,
    in parallel; a finished copy is reused)."""
    samples = {split: datasets.ImageFolderDataset(data_dir / split).samples for split in ("train", "val")}
    if not needs_shrinking([path for path, _ in samples["train"]], side):
        return data_dir
    out = exp / f"images-{side}px"
    if (out / ".complete").is_file():
        return out
    jobs = []
    for split, items in samples.items():
        for path in (Path(p) for p, _ in items):
            dst = out / split / path.parent.name / f"{path.name}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(path), str(dst), side))
    print(f"shrinking {len(jobs)} images to a shorter side of {side} pixels into {out}", flush=True)
    with multiprocessing.Pool(2) as pool:
        ok = sum(pool.imap_unordered(_shrink_one, jobs, chunksize=64))
    if ok < len(jobs):
        print(f"warning: {len(jobs) - ok} unreadable images left out", flush=True)
    (out / ".complete").write_text(f"{ok} images from {data_dir}\n")
    return out


def one_size(dataset) -> Optional[Tuple[int, int]]:
    """(width, height) when every image of ``dataset`` has it (files: from their headers), else None."""
    if not isinstance(dataset, datasets.ImageFileDataset):
        return dataset[0][0].size  # arrays (CIFAR, STL-10) and the built-in scenes have one size
    first = None
    for path, _ in dataset.samples:
        size = _header_size(path)
        if size is None or (first is not None and size != first):
            return None
        first = size
    return first


def loading_flags(dataset) -> List[str]:
    """IN_MEMORY for a training set of one image size that fits in IN_MEMORY_BYTES, else WORKER."""
    size = one_size(dataset)
    fits = size is not None and len(dataset) * 3 * size[0] * size[1] <= IN_MEMORY_BYTES
    return IN_MEMORY if fits else WORKER


def compare(args, minutes: float, exp: Path, data: List[str], counts: Dict[str, int],
            loading: Sequence[str] = WORKER) -> Tuple[Dict[str, dict], str]:
    """Evaluate the random network, pretrain for what is left of ``minutes``, evaluate the pretrained one;
    (results, description of the run)."""
    bank, queries = eval_subsets(counts["train"], counts["val"], minutes)
    evaluate = ["evaluate.py", *EVALUATE, *data, "--train-images", str(bank), "--val-images", str(queries)]
    eval_s = run([*evaluate, "--exp-dir", str(exp / "eval_random")], exp / "eval_random.log")
    budget = pretrain_minutes(minutes, time.time() - args.start, eval_s)
    cap = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    run(["main_vicregl.py", *PRETRAIN, *loading, *data, "--batch-size", str(batch_size_for(counts["train"])),
         "--time-budget", f"{budget:.3f}", *cap, "--exp-dir", str(exp / "pretrain")], exp / "pretrain.log")
    run([*evaluate, "--pretrained", str(exp / "pretrain" / "backbone.pth"), "--exp-dir", str(exp / "eval_pretrained")],
        exp / "eval_pretrained.log")
    results = {name: summary(exp / f"eval_{name}") for name in ("random", "pretrained")}
    what = (f"{counts['classes']} classes (chance {100 / counts['classes']:.0f}%); "
            f"{pretrain_steps(exp / 'pretrain')} pretraining steps; k-NN bank and probe on {bank} training "
            f"images, {queries} validation images")
    return results, what


def budget_minutes(args, default: float, quick: float = QUICK_MINUTES) -> float:
    """The run's budget: ``quick`` with --quick, else --minutes, else ``default``; a UserError for a
    budget <= 0 or a negative --max-steps."""
    minutes = quick if args.quick else default if args.minutes is None else args.minutes
    if minutes <= 0 or args.max_steps < 0:
        raise UserError(f"--minutes must be > 0 and --max-steps >= 0 (got {minutes:g}, {args.max_steps})")
    return minutes


def real_demo(args) -> Tuple[Path, Dict[str, dict], str]:
    """Pretraining and both evaluations on real images within --minutes; (exp, results, description)."""
    dataset = args.dataset or "imagefolder"
    if args.data_dir is None:
        raise UserError(f"--dataset {dataset} needs --data-dir")
    minutes = budget_minutes(args, REAL_MINUTES)
    counts = check_data(dataset, args.data_dir, args.download)
    if args.download:  # the clock starts after the download
        args.start = time.time()
    exp = (args.exp_dir or Path("exp") / f"demo-{dataset if dataset != 'imagefolder' else args.data_dir.resolve().name}").resolve()
    exp.mkdir(parents=True, exist_ok=True)
    data_dir = working_images(args.data_dir, exp) if dataset == "imagefolder" else args.data_dir
    name = "imagenet1k" if dataset == "imagefolder" else dataset
    data = ["--dataset", name, "--data-dir", str(data_dir), "--arch", args.arch, "--device", args.device,
            "--max-image-pixels", str(args.max_image_pixels)]
    loading = loading_flags(datasets.build_dataset(name, data_dir, "train", with_unlabeled=True))
    results, what = compare(args, minutes, exp, data, counts, loading)
    return exp, results, f"{args.data_dir} ({dataset}), {what}"


# ----------------------------------------------------------------------------- built-in dataset

def builtin_demo(args) -> Tuple[Path, Dict[str, dict], str]:
    """The same comparison on the built-in dataset (no download); (exp, results, description)."""
    minutes = budget_minutes(args, BUILTIN_MINUTES)
    if args.images < MIN_TRAIN_IMAGES:
        raise UserError(f"--images must be at least {MIN_TRAIN_IMAGES}, got {args.images}")
    exp = (args.exp_dir or Path("exp/demo")).resolve()
    exp.mkdir(parents=True, exist_ok=True)
    data = [*BUILTIN, "--builtin-images", str(args.images), "--builtin-val-images", str(BUILTIN_VAL_IMAGES),
            "--builtin-seed", str(args.builtin_seed), "--arch", args.arch, "--device", args.device]
    counts = {"train": args.images, "val": BUILTIN_VAL_IMAGES,
              "classes": builtin_data.BuiltinDataset("train", args.images).num_classes}
    loading = loading_flags(builtin_data.BuiltinDataset("train", args.images, image_size=SIDE))
    results, what = compare(args, minutes, exp, data, counts, loading)
    return exp, results, f"built-in dataset (seed {args.builtin_seed}), {what}"


# ----------------------------------------------------------------------------- segmentation (built-in)

# Dense features: VICRegL (alpha 0.75: global and local loss) against VICReg (alpha 1.0: the global
# loss only), pretrained for the same number of steps with otherwise identical flags on 64-pixel
# "mosaic" scenes (four objects of distinct classes, none dominant: one label per image explains
# little of their masks), and a random network; each gets the same frozen linear segmentation head
# (segmentation/train.py) on its last stage, trained with the same seed, and is scored by mIoU over
# background and the object classes. docs/dense.md has the runs behind each choice.
# - The ResNet's layer3 and layer4 dilated (--dilated 1, output stride 8) in pretraining as in the
#   heads: a 64-pixel crop gives an 8x8 map, whose 64 positions the local loss matches, 20 of them
#   kept (--num_matches 20 4, the original's proportion at 224 pixels). The small-input stem gives the
#   same maps at twice a step's cost.
# - Location grids mirrored with flipped views (--no-flip-grid 0): with the original's unmirrored ones,
#   61.6% of the matched cells at 8x8 show disjoint parts of the image.
# - VICRegL runs first, for the time it is given (--time-budget); VICReg then runs exactly as many steps
#   (--max-steps), which cost it about 0.6 of the time: its steps have no local loss.
SEG_SIDE = 64
SEG_DATA = ["--dataset", "builtin", "--builtin-layout", "mosaic", "--builtin-size", str(SEG_SIDE)]
SEG_PRETRAIN = ["--dilated", "1", "--size-crops", str(SEG_SIDE), "--num-crops", "2", "--min_scale_crops", "0.3",
                "--max_scale_crops", "1", "--num_matches", "20", "4", "--no-flip-grid", "0",
                "--mlp", "1024-1024-1024", "--maps-mlp", "256-256-256", "--epochs", "100", "--warmup-epochs", "5",
                "--optimizer", "adamw", "--base-lr", "0.01", "--weight-decay", "0.01", "--batch-size", "64",
                "--num-workers", "1", "--channels-last", "--log-tensors-interval", "30", "--builtin-val-images", "16"]
SEG_HEAD = ["--stages", "4", "--dilated", "1", "--batch-size", "16", "--lr", "0.1", "--seed", "0",
            "--eval-interval", "0", "--workers", "1", "--print-freq", "100"]
SEG_ALPHAS = {"vicregl": 0.75, "vicreg": 1.0}  # VICRegL first: VICReg then runs as many steps
SEG_METHODS = {"random": "none (random initialisation)", "vicreg": "VICReg (alpha 1.0, global loss only)",
               "vicregl": "VICRegL (alpha 0.75, global + local loss)"}
# VICRegL's share of the pretraining time (VICReg's steps cost about 0.6 of VICRegL's).
SEG_VICREGL_SHARE = 0.62
SEG_HEAD_ITERS, SEG_VAL_IMAGES, SEG_MINUTES = 600, 500, 28.0
SEG_QUICK_HEAD_ITERS, SEG_QUICK_VAL_IMAGES, SEG_QUICK_MINUTES = 30, 32, 3.0


def head_miou(exp: Path) -> dict:
    """The final evaluation of a segmentation/train.py run: {"miou": .., "aacc": ..} (%)."""
    last = stats_lines(exp, "Val: ")[-1]
    return {"miou": round(last["mIoU"], 2), "aacc": round(last["aAcc"], 2)}


def segmentation_demo(args) -> Tuple[Path, Dict[str, dict], str]:
    """Random, VICReg and VICRegL backbones through the same frozen linear segmentation head, within
    --minutes: the random head runs first and measures what a head costs; VICRegL pretrains for its
    share of what is left after two more heads, and VICReg for as many steps. (exp, {name: {"miou",
    "aacc"}}, description)."""
    if args.data_dir is not None or args.dataset is not None:
        raise UserError("--task segmentation runs on the built-in dataset (its masks): drop --data-dir/--dataset")
    minutes = budget_minutes(args, SEG_MINUTES, SEG_QUICK_MINUTES)
    if args.images < MIN_TRAIN_IMAGES:
        raise UserError(f"--images must be at least {MIN_TRAIN_IMAGES}, got {args.images}")
    iters, val_images = (SEG_QUICK_HEAD_ITERS, SEG_QUICK_VAL_IMAGES) if args.quick else (SEG_HEAD_ITERS, SEG_VAL_IMAGES)
    exp = (args.exp_dir or Path("exp/demo-seg")).resolve()
    exp.mkdir(parents=True, exist_ok=True)
    common = [*SEG_DATA, "--builtin-images", str(args.images), "--builtin-seed", str(args.builtin_seed),
              "--arch", args.arch, "--device", args.device]
    head = ["segmentation/train.py", *common, *SEG_HEAD, "--builtin-val-images", str(val_images), "--iters", str(iters)]
    head_s = run([*head, "--exp-dir", str(exp / "head_random")], exp / "head_random.log")
    # both pretrainings share one budget: VICRegL's share of it as its --time-budget
    both = pretrain_minutes(minutes, time.time() - args.start, head_s, evals_left=len(SEG_ALPHAS), pretrainings=1,
                            overhead_s=len(SEG_ALPHAS) * PRETRAIN_OVERHEAD_S)
    cap = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    run(["main_vicregl.py", *common, *SEG_PRETRAIN, "--alpha", str(SEG_ALPHAS["vicregl"]),
         "--time-budget", f"{both * SEG_VICREGL_SHARE:.3f}", *cap, "--exp-dir", str(exp / "vicregl")],
        exp / "vicregl.log")
    steps = pretrain_steps(exp / "vicregl")
    run(["main_vicregl.py", *common, *SEG_PRETRAIN, "--alpha", str(SEG_ALPHAS["vicreg"]), "--max-steps", str(steps),
         "--exp-dir", str(exp / "vicreg")], exp / "vicreg.log")
    for name in SEG_ALPHAS:
        run([*head, "--pretrained", str(exp / name / "backbone.pth"), "--exp-dir", str(exp / f"head_{name}")],
            exp / f"head_{name}.log")
    run(["visualize.py", "features", "--random", "--arch", args.arch, "--label", "random",
         "--compare", *(f"{name}={exp / name / 'backbone.pth'}" for name in ("vicreg", "vicregl")),
         "--builtin-index", "0", "1", "2", "3", "--builtin-layout", "mosaic", "--builtin-size", str(SEG_SIDE),
         "--size", str(SEG_SIDE), "--stage", "2", "--panel", "160", "--device", args.device,
         "--out", str(exp / "features.png")], exp / "features.log")
    results = {name: head_miou(exp / f"head_{name}") for name in ("random", "vicreg", "vicregl")}
    what = (f"built-in mosaic scenes (seed {args.builtin_seed}) of {SEG_SIDE} pixels, "
            f"{builtin_data.BuiltinDataset('train', args.images).num_classes} object classes + background; "
            f"{steps} pretraining steps of 64 for each method; linear head on the last stage (8x8): "
            f"{iters} iterations of 16, {val_images} evaluation images")
    return exp, results, what


# ----------------------------------------------------------------------------- results

def results_json(results: Dict[str, dict], minutes: float) -> dict:
    """What results.json holds: k-NN and probe top-1 (%) of each backbone (the probe's best epoch, as
    evaluate.py reports it) and the run's wall-clock minutes."""
    return {**{name: {"knn_top1": round(s["knn_top1"], 2), "linear_top1": round(s["best_acc1"], 2)}
               for name, s in results.items()}, "minutes": round(minutes, 2)}


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a reader never sees half a file; a failed write is one line)."""
    utils.save_atomic(text.encode(), str(path), write=lambda data, f: f.write(data), resumable=False)


def main() -> None:
    args = get_args_parser().parse_args()
    args.start = STARTED  # the clock (moved past a download of the data)
    try:
        datasets.set_max_image_pixels(args.max_image_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.task == "segmentation":
        exp, results, what = segmentation_demo(args)
        minutes = (time.time() - args.start) / 60
        out = {**results, "minutes": round(minutes, 2)}
        table = [f"| backbone ({args.arch}) | pretraining | mIoU (%) | pixel accuracy (%) |", "|---|---|---|---|"]
        table += [f"| {name} | {SEG_METHODS[name]} | {r['miou']:.1f} | {r['aacc']:.1f} |" for name, r in results.items()]
    else:
        real = args.data_dir is not None or args.dataset is not None
        exp, results, what = real_demo(args) if real else builtin_demo(args)
        minutes = (time.time() - args.start) / 60
        out = results_json(results, minutes)
        table = [f"| backbone ({args.arch}) | k-NN top-1 (%) | linear probe top-1 (%) |", "|---|---|---|"]
        table += [f"| {name} | {out[name]['knn_top1']:.1f} | {out[name]['linear_top1']:.1f} |" for name in results]
    text = "\n".join(table)
    write_text(exp / "results.json", json.dumps({**out, "data": what}, indent=1) + "\n")
    write_text(exp / "results.md", f"{text}\n\n{what}; {minutes:.1f} minutes\n")
    print(f"\n{text}\n\n{what}; {minutes:.1f} minutes; outputs in {exp}")


if __name__ == "__main__":
    utils.exit_on_user_error(main)()
