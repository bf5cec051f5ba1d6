"""Does a finished linear segmentation head use local information? Three readings of its predictions.

    python bench/seg_diagnostics.py HEAD_DIR [HEAD_DIR ...]      # segmentation/train.py --exp-dir folders

For each head (HEAD_DIR/checkpoint.pth, with the backbone its run loaded), on the same evaluation
scenes as its run (or --val-images of them), all at full resolution:

- mIoU: as segmentation/train.py reports it (a check that the head was rebuilt as it was trained);
- repainted: mIoU after every image's predicted foreground (the pixels not predicted as background)
  is painted with the class predicted most often on it. A head that reads only "which image is this"
  loses nothing by this; a head that tells objects apart inside an image loses;
- other pixels: mIoU over the pixels that are not of the image's majority class (the object class
  with the most pixels in the true mask), background included: what one label per image cannot get;
- other objects: pixel accuracy on the pixels of the image's other object classes.

Built-in scenes only (masks 0 = background, c + 1 = object class c).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from models.checkpoints import read_checkpoint  # noqa: E402
from segmentation import head as seg_head  # noqa: E402
from segmentation import metrics  # noqa: E402
from segmentation import train as seg_train  # noqa: E402
from utils import UserError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("heads", nargs="+", type=Path, help="segmentation/train.py --exp-dir folders")
    p.add_argument("--val-images", type=int, default=0, help="evaluation scenes (0: as many as the head's run)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: automatic)")
    return p


def majority_object(mask: torch.Tensor, num_classes: int) -> int:
    """The object class (label >= 1) with the most pixels in ``mask``; 0 when there is none."""
    counts = torch.bincount(mask[(mask >= 1) & (mask < num_classes)].flatten(), minlength=num_classes)
    return int(counts.argmax()) if counts.sum() else 0


def repaint(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``pred`` with its foreground (pred != 0) painted with its most frequent foreground class."""
    fg = pred != 0
    if not fg.any():
        return pred
    counts = torch.bincount(pred[fg].flatten(), minlength=num_classes)
    return torch.where(fg, counts.argmax(), pred)


def head_args(exp: Path, val_images: int) -> argparse.Namespace:
    """The segmentation/train.py arguments the head at ``exp`` was trained with."""
    path = exp / "checkpoint.pth"
    if not path.is_file():
        raise UserError(f"{exp}: no checkpoint.pth (a segmentation/train.py --exp-dir folder was expected)")
    ckpt = read_checkpoint(path)
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or saved.get("dataset") != "builtin":
        raise UserError(f"{path}: not a head trained on the built-in scenes (--dataset builtin)")
    args = seg_train.get_args_parser().parse_args(["--exp-dir", str(exp)])
    for key, value in saved.items():
        if hasattr(args, key) and key not in ("exp_dir", "device"):
            setattr(args, key, value)
    if val_images:
        args.builtin_val_images = val_images
    seg_train.resolve_args(args)
    args.head_state = ckpt["head"]
    return args


def scores(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> Dict[str, float]:
    """The four readings (%) over (prediction, true mask) pairs of integer tensors of one shape:
    {"plain", "repainted", "other" (mIoU), "other_objects_acc"}."""
    k = num_classes
    confs = {name: torch.zeros(k, k, dtype=torch.int64) for name in ("plain", "repainted", "other")}
    right = total = 0
    for pred, y in pairs:
        pred, y = pred.long(), y.long()
        confs["plain"] += metrics.confusion_matrix(pred, y, k)
        confs["repainted"] += metrics.confusion_matrix(repaint(pred, k), y, k)
        others = (y != majority_object(y, k)) & (y < k)
        confs["other"] += metrics.confusion_matrix(pred[others], y[others], k)
        objects = others & (y != 0)
        right += int((pred[objects] == y[objects]).sum())
        total += int(objects.sum())
    out = {name: metrics.segmentation_scores(conf)["mIoU"] for name, conf in confs.items()}
    out["other_objects_acc"] = 100.0 * right / max(total, 1)
    return out


@torch.no_grad()
def diagnose(args: argparse.Namespace) -> Dict[str, float]:
    """scores() of the head that ``head_args`` rebuilt, on its evaluation scenes."""
    info = utils.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    val_set, loader = seg_train.build_val_loader(args, info)
    model = seg_train.build_model(args, val_set.num_classes, info)
    model.head.load_state_dict(args.head_state)
    model.eval()

    def pairs():
        for images, masks in loader:
            for x, y in zip(images, masks):
                logits = seg_head.predict(model, x[None], y.shape[-2:], args.inference, args.window, args.stride)
                yield logits.argmax(1)[0], y

    return scores(pairs(), val_set.num_classes)


def main(argv: List[str] = None) -> None:
    a = get_args_parser().parse_args(argv)
    utils.set_cpu_threads(torch.device("cpu"), 0, a.threads)
    print("| head | mIoU | repainted | other pixels (mIoU) | other objects (accuracy) |\n|---|---|---|---|---|")
    for exp in a.heads:
        s = diagnose(head_args(exp, a.val_images))
        print(f"| {exp} | {s['plain']:.1f} | {s['repainted']:.1f} | {s['other']:.1f} | "
              f"{s['other_objects_acc']:.1f} |", flush=True)


if __name__ == "__main__":
    utils.exit_on_user_error(main)()
