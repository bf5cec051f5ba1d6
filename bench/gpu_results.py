"""VICRegL against VICReg at a GPU's budget: the two comparisons that a 2-core CPU cannot make.

    python bench/gpu_results.py --cifar-dir DIR --out OUT              # both, within --minutes (9)
    python bench/gpu_results.py --cifar-dir DIR --out OUT --parts classification --minutes 5
    python bench/gpu_results.py --cifar-dir DIR --out OUT --reference VICREGL  # the speed row first

classification: resnet18 with the small-input stem (so that a 32-pixel crop gives a 4x4 map, 16
positions for the local loss) pretrained on DIR (class folders DIR/train/<class>/ and DIR/val/<class>/
of 32-pixel images, such as a CIFAR-10 slice) for --epochs with alpha 0.75 (VICRegL) and 1.0 (VICReg,
the global loss only), in the same time; then k-NN and a linear probe on the frozen features of both
and of the random network, with the same settings. The recipe is the usual one for ResNets on CIFAR:
LARS at 0.3 for a batch of 256, weight decay 1e-4, 2 crops of 32 pixels and 4 of 16, no blur;
mixed precision on a GPU.

segmentation: `make demo-seg`'s design at a GPU's size, on each of --seg-seeds (three image seeds):
--seg-images mosaic scenes of 96 pixels, resnet_mini with layer3 and layer4 dilated, so that a 96-pixel
crop gives a 12x12 map (20 of its 144 positions matched), batch 256; VICRegL pretrained for its share of
the seed's time and VICReg for as many steps; then the same frozen linear head on the last stage of
each and of a random network, scored by mIoU on the validation scenes.

speed (with --reference, a checkout of github.com/facebookresearch/VICRegL): our training step against
the original's, `bench/train_step.py --reference` at the paper's sizes on this device (resnet50 and
convnext_small, 2x224 + 6x96 crops, batch 64, fp16); it runs first, and the other parts share what it
leaves of --minutes.

Each part gets its share of --minutes, and each pretraining what its part has left after the
evaluations (whose cost the random network's evaluation measures); --epochs is an upper bound. As each
run ends, OUT/results.json and OUT/results.md (the tables, with the device's name) are rewritten, so a
run cut short keeps what it finished; every command's output is in OUT/<run>.log (classification_vicregl,
segmentation_eval_random, ...).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

ALPHAS = {"vicreg": 1.0, "vicregl": 0.75}
NAMES = {"random": "random initialisation", "vicreg": "VICReg (alpha 1.0)", "vicregl": "VICRegL (alpha 0.75)"}
CLS_PRETRAIN = ["--small-input", "--size-crops", "32", "16", "--num-crops", "2", "4", "--num_matches", "8", "2",
                "--mlp", "2048-2048-2048", "--maps-mlp", "512-512-512", "--warmup-epochs", "10",
                "--optimizer", "lars", "--base-lr", "0.3", "--weight-decay", "1e-4",
                "--blur-prob", "0", "0", "--channels-last", "--in-memory", "--log-tensors-interval", "30"]
CLS_EVALUATE = ["--small-input", "--crop-size", "32", "--resize-size", "32", "--batch-size", "256",
                "--feature-probe", "--epochs", "100", "--lr-head", "0.01", "--weight-decay", "1e-4",
                "--knn", "--knn-k", "20", "--knn-temperature", "0.07"]
SEG_SIDE, SEG_BATCH = 96, 256
TABLES = {"classification": (("k-NN top-1 (%)", "knn_top1"), ("linear top-1 (%)", "linear_top1")),
          "segmentation": (("mIoU (%)", "miou"), ("pixel accuracy (%)", "aacc"))}


def replaced(flags: Sequence[str], flag: str, *values: str) -> List[str]:
    """``flags`` with the values that follow ``flag`` replaced by ``values`` (as many as there were)."""
    flags = list(flags)
    at = flags.index(flag)
    flags[at + 1:at + 1 + len(values)] = values
    return flags


def device_name(device: str) -> str:
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the results and every run's outputs go")
    p.add_argument("--parts", nargs="+", default=None, choices=list(PARTS),
                   help="which comparisons to run (default: all; speed only with --reference)")
    p.add_argument("--reference", type=Path, default=None,
                   help="speed: a checkout of github.com/facebookresearch/VICRegL to time against")
    p.add_argument("--minutes", type=float, default=9.0, help="time budget of the whole command")
    p.add_argument("--cifar-dir", type=Path, default=None,
                   help="classification: class folders DIR/train/<class>/ and DIR/val/<class>/ of 32-pixel images")
    p.add_argument("--arch", default="resnet18", help="classification: backbone (a ResNet)")
    p.add_argument("--epochs", type=int, default=200, help="classification: pretraining epochs (at most)")
    p.add_argument("--batch-size", type=int, default=256, help="classification: pretraining batch")
    p.add_argument("--seg-images", type=int, default=50000, help="segmentation: built-in training scenes")
    p.add_argument("--seg-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="segmentation: --builtin-seed of the scenes, one comparison each")
    p.add_argument("--head-iters", type=int, default=2000, help="segmentation: iterations of each linear head")
    p.add_argument("--seg-val-images", type=int, default=1000, help="segmentation: evaluation scenes")
    p.add_argument("--workers", type=int, default=10, help="data-loading processes of every run")
    p.add_argument("--max-steps", type=int, default=0, help="cap on each pretraining's steps (0: none); for a check")
    p.add_argument("--device", default="auto", help="'auto', 'cuda' or 'cpu'")
    return p


class Results:
    """OUT/results.json and OUT/results.md, rewritten whenever a number comes in."""

    def __init__(self, out: Path, device: str):
        self.out, self.data = out, {"device": device}

    def add(self, part: str, name: str, value: dict) -> None:
        if "minutes" in value:
            value = {**value, "minutes": round(value["minutes"], 2)}
        self.data.setdefault(part, {})[name] = value
        self.save()

    def save(self) -> None:
        demo.write_text(self.out / "results.json", json.dumps(self.data, indent=1) + "\n")
        demo.write_text(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        lines = []
        if "speed" in self.data:
            lines += [f"speed against the original ({self.data['device']}):", "", "```",
                      *self.data["speed"]["train_step"]["lines"], "```", ""]
        for part, columns in TABLES.items():
            rows = self.data.get(part)
            if not rows:
                continue
            seeded = all("seed" in r for r in rows.values())
            lines += [f"{part} ({self.data['device']}):", "",
                      "| backbone | pretraining | " + "image seed | " * seeded + " | ".join(c for c, _ in columns)
                      + " | minutes |", "|---" * (len(columns) + 3 + seeded) + "|"]
            lines += [f"| {r['arch']} | {NAMES[name.split()[0]]}{r.get('what', '')}"
                      + (f" | {r['seed']}" if seeded else "") + " | "
                      + " | ".join(f"{r[key]:.1f}" for _, key in columns) + f" | {r['minutes']:.1f} |"
                      for name, r in rows.items()]
            lines.append("")
        return "\n".join(lines)


def compare(args, results: Results, part: str, minutes: float, evaluate: List[str], score, pretrain: List[str],
            batch: int, images: int) -> None:
    """The random network evaluated (``evaluate`` + --exp-dir, scored by ``score(exp)``), then for each alpha
    a pretraining (``pretrain`` + --alpha) in an equal share of what is left of ``minutes`` and the same
    evaluation of its backbone; each result added to ``results`` under ``part`` as it comes. Outputs go
    to OUT/<part>_<name> (pretraining) and OUT/<part>_eval_<name>, logs beside them."""
    start = time.time()

    def evaluated(name: str, extra: List[str]) -> Tuple[float, dict]:
        exp = args.out / f"{part}_eval_{name}"
        seconds = demo.run([*evaluate, *extra, "--exp-dir", str(exp)], args.out / f"{part}_eval_{name}.log")
        return seconds, score(exp)

    eval_s, scores = evaluated("random", [])
    results.add(part, "random", {**scores, "minutes": eval_s / 60})
    budget = demo.pretrain_minutes(minutes, time.time() - start, eval_s, evals_left=len(ALPHAS),
                                   pretrainings=len(ALPHAS))
    cap = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    print(f"{part}: {images:,} training images; each pretraining gets {budget:.1f} minutes", flush=True)
    for name, alpha in ALPHAS.items():
        exp = args.out / f"{part}_{name}"
        pretrain_s = demo.run([*pretrain, *args.fp16, "--alpha", str(alpha), "--time-budget", f"{budget:.3f}", *cap,
                               "--exp-dir", str(exp)], args.out / f"{part}_{name}.log")
        eval_s, scores = evaluated(name, ["--pretrained", str(exp / "backbone.pth")])
        steps = demo.pretrain_steps(exp)
        what = f", {steps:,} step{'s' * (steps != 1)} of {batch} ({steps * batch / images:.3g} epochs)"
        results.add(part, name, {**scores, "minutes": (pretrain_s + eval_s) / 60, "steps": steps, "what": what,
                                 "pretrain_minutes": round(pretrain_s / 60, 2)})


def classification(args, results: Results, minutes: float) -> None:
    counts = demo.check_data("imagefolder", args.cifar_dir, False)
    data = ["--dataset", "imagenet1k", "--data-dir", str(args.cifar_dir), "--arch", args.arch, "--device", args.device]

    def score(exp: Path) -> dict:
        s = demo.summary(exp)
        return {"arch": args.arch, "knn_top1": s["knn_top1"], "linear_top1": s["best_acc1"]}

    evaluate = ["evaluate.py", *CLS_EVALUATE, *data, "--workers", str(args.workers)]
    pretrain = ["main_vicregl.py", *CLS_PRETRAIN, *data, "--epochs", str(args.epochs), "--batch-size",
                str(args.batch_size), "--num-workers", str(args.workers)]
    compare(args, results, "classification", minutes, evaluate, score, pretrain, args.batch_size, counts["train"])


def segmentation(args, results: Results, minutes: float) -> None:
    """demo.segmentation_demo's comparison (equal steps: VICRegL for its share of the time, then VICReg
    for as many steps) at --seg-images scenes of SEG_SIDE pixels, once per seed in --seg-seeds, each
    seed with an equal share of what is left of ``minutes``; rows "<method> seed <S>"."""
    start = time.time()
    for k, seed in enumerate(args.seg_seeds):
        share = (minutes - (time.time() - start) / 60) / (len(args.seg_seeds) - k)
        segmentation_seed(args, results, share, seed)


def segmentation_seed(args, results: Results, minutes: float, seed: int) -> None:
    start, part = time.time(), "segmentation"
    common = [*replaced(demo.SEG_DATA, "--builtin-size", str(SEG_SIDE)), "--builtin-images", str(args.seg_images),
              "--builtin-seed", str(seed), "--arch", "resnet_mini", "--device", args.device]
    head = ["segmentation/train.py", *common, *replaced(demo.SEG_HEAD, "--workers", str(args.workers)),
            "--builtin-val-images", str(args.seg_val_images), "--iters", str(args.head_iters)]
    pretrain = ["main_vicregl.py", *common, *replaced(replaced(replaced(
        demo.SEG_PRETRAIN, "--size-crops", str(SEG_SIDE)), "--num-workers", str(args.workers)),
        "--batch-size", str(SEG_BATCH)), *args.fp16]
    tag = f"_s{seed}"

    def head_of(name: str, extra: List[str]) -> Tuple[float, dict]:
        exp = args.out / f"{part}_eval_{name}{tag}"
        seconds = demo.run([*head, *extra, "--exp-dir", str(exp)], args.out / f"{part}_eval_{name}{tag}.log")
        return seconds, {"arch": "resnet_mini", "seed": seed, **demo.head_miou(exp)}

    head_s, scores = head_of("random", [])
    results.add(part, f"random seed {seed}", {**scores, "minutes": head_s / 60})
    both = demo.pretrain_minutes(minutes, time.time() - start, head_s, evals_left=2, pretrainings=1,
                                 overhead_s=2 * demo.PRETRAIN_OVERHEAD_S)
    print(f"{part} seed {seed}: {args.seg_images:,} training scenes; VICRegL gets "
          f"{both * demo.SEG_VICREGL_SHARE:.1f} minutes, VICReg as many steps", flush=True)
    steps = 0
    for name in ("vicregl", "vicreg"):
        exp = args.out / f"{part}_{name}{tag}"
        limit = (["--time-budget", f"{both * demo.SEG_VICREGL_SHARE:.3f}",
                  *(["--max-steps", str(args.max_steps)] if args.max_steps else [])]
                 if name == "vicregl" else ["--max-steps", str(steps)])
        pretrain_s = demo.run([*pretrain, "--alpha", str(demo.SEG_ALPHAS[name]), *limit, "--exp-dir", str(exp)],
                              args.out / f"{part}_{name}{tag}.log")
        steps = demo.pretrain_steps(exp)
        head_s, scores = head_of(name, ["--pretrained", str(exp / "backbone.pth")])
        what = (f", {steps:,} step{'s' * (steps != 1)} of {SEG_BATCH} "
                f"({steps * SEG_BATCH / args.seg_images:.3g} epochs)")
        results.add(part, f"{name} seed {seed}", {**scores, "minutes": (pretrain_s + head_s) / 60, "steps": steps,
                                                  "what": what, "pretrain_minutes": round(pretrain_s / 60, 2)})


def speed(args, results: Results, minutes: float) -> None:
    """bench/train_step.py --reference: its table, as printed, goes into the results."""
    log = args.out / "speed.log"
    demo.run(["bench/train_step.py", "--reference", str(args.reference), "--device", args.device], log)
    lines = log.read_text().splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("arch"))
    results.add("speed", "train_step", {"lines": lines[header - 1:]})


PARTS = {"speed": speed, "classification": classification, "segmentation": segmentation}


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    start = time.time()
    if args.parts is None:
        args.parts = [part for part in PARTS if part != "speed" or args.reference is not None]
    if "speed" in args.parts and args.reference is None:
        raise UserError("--parts speed needs --reference (a checkout of github.com/facebookresearch/VICRegL)")
    if "classification" in args.parts and args.cifar_dir is None:
        raise UserError("--parts classification needs --cifar-dir (class folders train/ and val/)")
    if args.minutes <= 0 or args.max_steps < 0 or args.workers < 0:
        raise UserError(f"--minutes must be > 0, --max-steps and --workers >= 0 (got {args.minutes:g}, "
                        f"{args.max_steps}, {args.workers})")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, device_name(args.device))
    args.fp16 = [] if results.data["device"] == "CPU" else ["--fp16"]  # mixed precision on a GPU
    print(f"device: {results.data['device']}", flush=True)
    parts = sorted(set(args.parts), key=list(PARTS).index)  # speed first: it is short and not budgeted
    for k, part in enumerate(parts):
        budgeted = [later for later in parts[k:] if later != "speed"]
        PARTS[part](args, results, (args.minutes - (time.time() - start) / 60) / max(len(budgeted), 1))
    results.data["minutes"] = round((time.time() - start) / 60, 2)
    results.save()
    print("\n" + results.markdown(), flush=True)


if __name__ == "__main__":
    utils.exit_on_user_error(main)()
