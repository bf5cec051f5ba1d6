"""The ten-minute demo (``make demo``): pretrain on the built-in dataset, then compare the result with a
randomly initialised copy of the same network by k-NN and by a linear probe.

    python demo.py                      # everything in exp/demo/
    python demo.py --epochs 5 --quick   # a faster, smaller run

It only runs the project's own scripts (main_vicregl.py, evaluate.py) as a user would, one after the
other, and reads their stats.txt files; everything they wrote stays in --exp-dir. Running it again
resumes or reuses what is already there.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VICRegL demo on the built-in dataset",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exp-dir", type=Path, default=Path("exp/demo"), help="where every output goes")
    p.add_argument("--arch", default="resnet_mini", help="backbone (small-input ResNets suit the 32-pixel images)")
    p.add_argument("--epochs", type=int, default=DEMO["epochs"], help="pretraining epochs")
    p.add_argument("--probe-epochs", type=int, default=DEMO["probe_epochs"], help="linear-probe epochs")
    p.add_argument("--images", type=int, default=DEMO["images"], help="built-in training images")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer images and epochs): checks the "
                   "pipeline in a minute or two, too short to learn much")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    return p


# Settings of the demo's pretraining (see the README for the table they produce).
DEMO = dict(epochs=8, probe_epochs=10, images=4096)
PRETRAIN = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-max-objects", "1", "--small-input",
            "--size-crops", "32", "16", "--num-crops", "2", "4", "--min_scale_crops", "0.3", "0.1",
            "--max_scale_crops", "1", "0.4", "--num_matches", "8", "2", "--mlp", "1024-1024-1024",
            "--maps-mlp", "256-256-256", "--batch-size", "128", "--warmup-epochs", "1", "--optimizer", "adamw",
            "--base-lr", "0.02", "--weight-decay", "0.01", "--num-workers", "1", "--log-tensors-interval", "20"]
EVALUATE = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-max-objects", "1", "--crop-size", "32",
            "--resize-size", "32", "--small-input", "--batch-size", "256", "--lr-head", "0.1",
            "--min-crop-scale", "0.5", "--workers", "1", "--knn"]


def brief(line: str) -> str:
    """One short progress line for a JSON stats line (the full line is in stats.txt), or ''."""
    try:
        stats = json.loads(line)
    except ValueError:
        return line
    if "st" in stats and "l" in stats:  # main_vicregl.py
        return f"epoch {stats['ep']} step {stats['st']}: loss {stats['l']:.3f}\n"
    if "acc1" in stats and "epoch" in stats:  # evaluate.py
        return f"probe epoch {stats['epoch']}: val top-1 {stats['acc1']:.1f}%\n"
    return ""


def run(cmd, log: Path) -> None:
    """Run one of the project's scripts, showing its output and keeping a copy in ``log``."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            text = brief(line) if line.startswith("{") else line  # JSON lines are in stats.txt
            if text:
                sys.stdout.write("  " + text)
                sys.stdout.flush()
        if proc.wait() != 0:
            sys.exit(f"demo: {cmd[0]} failed (exit {proc.returncode}); see {log}")


def summary(exp: Path) -> dict:
    """The last summary line of an evaluate.py run."""
    lines = [json.loads(l) for l in (exp / "stats.txt").read_text().splitlines() if l.startswith("{")]
    return [l for l in lines if l.get("summary")][-1]


def main() -> None:
    args = get_args_parser().parse_args()
    if args.quick:
        args.epochs, args.probe_epochs, args.images = 2, 2, 512
    exp = args.exp_dir.resolve()
    exp.mkdir(parents=True, exist_ok=True)
    start = time.time()
    common = ["--arch", args.arch, "--device", args.device]
    run(["main_vicregl.py", *PRETRAIN, *common, "--builtin-images", str(args.images), "--epochs", str(args.epochs),
         "--exp-dir", str(exp / "pretrain")], exp / "pretrain.log")
    results = {}
    for name, extra in (("random", []), ("pretrained", ["--pretrained", str(exp / "pretrain" / "backbone.pth")])):
        out = exp / f"eval_{name}"
        run(["evaluate.py", *EVALUATE, *common, *extra, "--builtin-images", str(args.images),
             "--epochs", str(args.probe_epochs), "--exp-dir", str(out)], exp / f"eval_{name}.log")
        results[name] = summary(out)
    minutes = (time.time() - start) / 60
    table = [f"| backbone ({args.arch}) | k-NN top-1 (%) | linear probe top-1 (%) |", "|---|---|---|"]
    for name, s in results.items():
        table.append(f"| {name} | {s['knn_top1']:.1f} | {s['best_acc1']:.1f} |")
    text = "\n".join(table)
    (exp / "results.md").write_text(text + f"\n\n{minutes:.1f} minutes, built-in dataset, 10 classes (chance 10%)\n")
    print(f"\n{text}\n\nbuilt-in dataset, 10 classes (chance 10%); {minutes:.1f} minutes; outputs in {exp}")


if __name__ == "__main__":
    main()
