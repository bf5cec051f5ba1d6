"""Linear frozen segmentation: train a BatchNorm + 1x1-convolution head on a frozen backbone
and report mIoU. Plain PyTorch: one process on a CPU, or torchrun / SLURM on GPUs.

    python segmentation/train.py --dataset builtin --arch resnet_mini --builtin-size 64 --stages 1 2 3 4 \
        --dilated 0 --lr 0.1 --iters 1000 --pretrained exp/demo-seg/vicregl/backbone.pth --exp-dir exp/seg_builtin
    torchrun --nproc_per_node=8 segmentation/train.py --dataset voc --data-dir /data/VOCdevkit \
        --arch convnext_small --pretrained convnext_small_alpha0.75.pth --exp-dir exp/seg_voc

Reads top to bottom: arguments and their defaults per dataset and backbone, data, model, optimiser,
resume, loop, evaluation. Rank 0 writes ``exp_dir/stats.txt`` (the command line, then JSON lines;
evaluation lines start with ``Val: ``) and ``exp_dir/checkpoint.pth`` (head, optimiser, iteration;
written atomically and resumed automatically).
"""
import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, Sequence

# Run as `python segmentation/train.py` the script's folder comes first on sys.path, where
# segmentation/datasets.py would shadow the repository's datasets.py: put the root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import builtin_data  # noqa: E402
import datasets  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from models.checkpoints import CheckpointError, load_backbone_weights  # noqa: E402
from segmentation import head as seg_head  # noqa: E402
from segmentation import metrics  # noqa: E402
from segmentation import transforms as seg_transforms  # noqa: E402
from segmentation.datasets import VOCSegmentation, build_segmentation_dataset  # noqa: E402
from utils import UserError  # noqa: E402

IGNORE_INDEX = 255

# The protocol per dataset (mmsegmentation's configs as the paper used them). The built-in dataset's
# crop and scale are its image side (--builtin-size).
DATASET_DEFAULTS = {
    "voc": dict(iters=40000, crop_size=(512, 512), scale=(2048, 512), train_split="train_aug"),
    "ade20k": dict(iters=160000, crop_size=(512, 512), scale=(2048, 512), train_split="train"),
    "cityscapes": dict(iters=40000, crop_size=(512, 1024), scale=(2048, 1024), train_split="train"),
    "builtin": dict(iters=2000, crop_size=None, scale=None, train_split="train"),
}

# The protocol per backbone family: optimiser, schedule, features, head and inference.
FAMILY_DEFAULTS = {
    "resnet": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4, warmup_iters=0, poly_power=0.9, min_lr=1e-4,
                   dropout=0.1, stages=[4], inference="whole"),
    "convnext": dict(optimizer="adamw", lr=1e-4, weight_decay=0.05, warmup_iters=1500, poly_power=1.0,
                     min_lr=0.0, dropout=0.0, stages=[1, 2, 3, 4], inference="slide"),
}
ARCH_LR = {"convnext_xlarge": 8e-5}
WARMUP_RATIO = 1e-6  # the warmup starts at this fraction of the scheduled rate (mmcv's linear warmup)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VICRegL linear frozen segmentation", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--exp-dir", type=Path, default=Path("./checkpoint/seg"),
                   help="folder for stats.txt and checkpoint.pth (resumed automatically)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the head saved in exp_dir/checkpoint.pth and exit")
    g.add_argument("--print-freq", "--log-interval", dest="print_freq", type=int, default=50,
                   help="iterations between two JSON log lines (stats.txt and stdout)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the numbers of stats.txt and the images per second to TensorBoard event "
                        "files in <exp-dir>/tensorboard/ (needs pip install tensorboard)")
    g.add_argument("--eval-interval", type=int, default=4000,
                   help="iterations between evaluations on the validation split (0: only at the end)")
    g.add_argument("--checkpoint-interval", type=int, default=None,
                   help="iterations between checkpoints (default: --eval-interval, or 1000 when that is 0); "
                        "a checkpoint is always written at the end")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the head's initialisation (and of a random backbone), the data order and the "
                        "crops: a run and its resumed continuation see the same random numbers")
    g.add_argument("--stop-after-iters", type=int, default=0,
                   help="end this process after this many iterations (checkpoint written; 0: run to --iters): "
                        "rerun the same command to continue, e.g. to fit a job's time limit")
    utils.add_trust_argument(g)
    g.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cuda' or 'cpu'")
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    utils.add_threads_argument(g)
    g.add_argument("--fp16", action="store_true",
                   help="run the frozen backbone under float16 autocast on CUDA (bfloat16 on CPU); the head "
                        "trains in float32")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="voc", choices=["voc", "ade20k", "cityscapes", "builtin"],
                   help="voc: Pascal VOC 2012 (21 classes); ade20k: ADEChallengeData2016 (150); cityscapes: "
                        "gtFine train ids (19); builtin: the procedural dataset's masks (no download)")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="dataset root: VOCdevkit (or VOC2012), ADEChallengeData2016 or the Cityscapes folder "
                        "holding leftImg8bit/ and gtFine/ (or a folder above it)")
    g.add_argument("--train-split", default=None,
                   help="training split (default: train; for voc train_aug when the SBD annotations "
                        "(SegmentationClassAug) are installed, else train with a warning)")
    g.add_argument("--val-split", default="val", help="evaluation split")
    g.add_argument("--crop-size", type=int, nargs="+", default=None,
                   help="training crop: one side or HEIGHT WIDTH (default 512 512; cityscapes 512 1024; "
                        "builtin: the image side)")
    g.add_argument("--scale", type=int, nargs=2, default=None,
                   help="base (long, short) size for training rescales and the test resize (default 2048 512; "
                        "cityscapes 2048 1024; builtin: the image side, i.e. no resize at test time)")
    g.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0],
                   help="range of the random rescale ratio applied to --scale for training")
    g.add_argument("--cat-max-ratio", type=float, default=0.75,
                   help="redraw a training crop (up to 10 times) while one class covers this share of it "
                        "(1: never)")
    g.add_argument("--photometric", type=int, default=1,
                   help="1: random brightness, contrast, saturation and hue on training crops")
    builtin_data.add_builtin_arguments(g)
    datasets.add_max_image_pixels_argument(g)

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help=f"backbone: one of {', '.join(models.available_archs())}")
    g.add_argument("--pretrained", default=None,
                   help="backbone weights: an exported backbone (backbone.pth, the published "
                        "<arch>_alpha<a>.pth), a pretraining checkpoint (model.pth, _fullckpt.pth), as a path or "
                        "URL; loaded strictly. Without it the backbone is random (a baseline), unless resuming "
                        "a run that had one")
    g.add_argument("--small-input", action="store_true",
                   help="ResNet with the 3x3 stride-1 stem (as pretrained with --small-input on small images)")
    g.add_argument("--dilated", type=int, default=1,
                   help="ResNet: 1 dilates layer3 and layer4 (output stride 8, the protocol); 0 keeps strides")
    g.add_argument("--stages", type=int, nargs="+", default=None,
                   help="backbone stages (1..4) whose outputs are resized to the largest and concatenated "
                        "(default: 1 2 3 4 for ConvNeXt, 4 for ResNet)")
    g.add_argument("--dropout", type=float, default=None,
                   help="Dropout2d before the classifier (default 0.1 for ResNet, 0 for ConvNeXt)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None,
                   help="training iterations (default 40000 for voc and cityscapes, 160000 for ade20k, "
                        "2000 for builtin)")
    g.add_argument("--batch-size", type=int, default=16,
                   help="global batch size (split evenly over the processes): 16 in the protocol")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"],
                   help="default: sgd for ResNet, adamw (betas 0.9, 0.999) for ConvNeXt")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.01 for ResNet; 1e-4 for ConvNeXt, 8e-5 for convnext_xlarge)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on every head parameter (default 5e-4 with sgd, 0.05 with adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--warmup-iters", type=int, default=None,
                   help="linear warmup iterations (default 0 for ResNet; 1500 for ConvNeXt, or a tenth of "
                        "--iters when that is shorter)")
    g.add_argument("--poly-power", type=float, default=None,
                   help="power of the poly decay (default 0.9 for ResNet, 1 for ConvNeXt)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the poly decay (default 1e-4 for ResNet, 0 for ConvNeXt)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--inference", default=None, choices=["whole", "slide"],
                   help="whole-image or sliding-window inference (default whole for ResNet, slide for ConvNeXt)")
    g.add_argument("--window", type=int, nargs="+", default=None,
                   help="sliding window: one side or HEIGHT WIDTH (default: --crop-size)")
    g.add_argument("--stride", type=int, nargs="+", default=None,
                   help="sliding-window stride: one side or HEIGHT WIDTH (default: 2/3 of the window, 341 for 512)")
    g.add_argument("--val-batch-size", type=int, default=1,
                   help="images per process and evaluation step (images of different sizes go one by one)")

    g = p.add_argument_group("distributed")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    g.add_argument("--dist-url", default="env://", help="rendezvous URL of the process group")
    return p


# ----------------------------------------------------------------------------- arguments

def _pair(values: Optional[Sequence[int]], flag: str) -> Optional[List[int]]:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise UserError(f"{flag} takes one positive side or HEIGHT WIDTH, got {list(values)}")
    return [values[0], values[0]] if len(values) == 1 else list(values)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-dataset and per-backbone defaults (in place) and check every flag."""
    try:
        family = models.backbone_family(args.arch)
        datasets.set_max_image_pixels(args.max_image_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    fam, ds = FAMILY_DEFAULTS[family], DATASET_DEFAULTS[args.dataset]
    if args.dataset == "builtin":
        side = args.builtin_size
        ds = dict(ds, crop_size=(side, side), scale=(4 * side, side))  # test resize: none for square images
    args.family = family
    args.iters = ds["iters"] if args.iters is None else args.iters
    args.crop_size = _pair(args.crop_size, "--crop-size") or list(ds["crop_size"])
    args.scale = list(args.scale or ds["scale"])
    args.optimizer = args.optimizer or fam["optimizer"]
    args.lr = args.lr if args.lr is not None else ARCH_LR.get(args.arch, fam["lr"])
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if args.optimizer == "sgd" else 0.05
    if args.warmup_iters is None:
        args.warmup_iters = min(fam["warmup_iters"], args.iters // 10)
    args.poly_power = fam["poly_power"] if args.poly_power is None else args.poly_power
    args.min_lr = fam["min_lr"] if args.min_lr is None else args.min_lr
    args.dropout = fam["dropout"] if args.dropout is None else args.dropout
    args.stages = args.stages or list(fam["stages"])
    args.inference = args.inference or fam["inference"]
    args.window = _pair(args.window, "--window") or list(args.crop_size)
    args.stride = _pair(args.stride, "--stride") or [max(1, round(2 * w / 3)) for w in args.window]
    if args.checkpoint_interval is None:
        args.checkpoint_interval = args.eval_interval or 1000

    if args.dataset != "builtin" and args.data_dir is None:
        raise UserError(f"--dataset {args.dataset} needs --data-dir (or use --dataset builtin, no download)")
    if args.train_split is None:
        args.train_split = ds["train_split"]
        if args.dataset == "voc" and not VOCSegmentation.has_aug(args.data_dir):
            if utils.is_main_process():
                print(f"warning: no SBD annotations (SegmentationClassAug + ImageSets/Segmentation/aug.txt) under "
                  f"{args.data_dir}: training on VOC train (1464 images) instead of train_aug (10582) as "
                      f"the protocol does", file=sys.stderr)
            args.train_split = "train"
    if args.small_input and family != "resnet":
        raise UserError("--small-input applies to ResNet backbones only")
    if any(not 1 <= s <= 4 for s in args.stages):
        raise UserError(f"--stages takes stage numbers 1..4, got {args.stages}")
    checks = [(args.iters >= 1, f"--iters must be >= 1, got {args.iters}"),
              (args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (0 <= args.dropout < 1, f"--dropout must lie in [0, 1), got {args.dropout}"),
              (args.ratio_range[0] <= args.ratio_range[1] and args.ratio_range[0] > 0,
               f"--ratio-range needs 0 < low <= high, got {args.ratio_range}"),
              (0 < args.cat_max_ratio <= 1, f"--cat-max-ratio must lie in (0, 1], got {args.cat_max_ratio}"),
              (args.print_freq >= 1, "--print-freq must be >= 1"),
              (args.stop_after_iters >= 0 and args.workers >= 0 and args.threads >= 0,
               "--stop-after-iters, --workers and --threads must be >= 0"),
              (args.eval_interval >= 0 and args.checkpoint_interval >= 1,
               "--eval-interval must be >= 0 and --checkpoint-interval >= 1"),
              (args.val_batch_size >= 1, "--val-batch-size must be >= 1"),
              (all(s <= w for s, w in zip(args.stride, args.window)),
               f"--stride {args.stride} must not exceed --window {args.window}: pixels between windows "
               f"would get no prediction")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


# ----------------------------------------------------------------------------- schedule

def learning_rate(it: int, total: int, base_lr: float, min_lr: float = 0.0, power: float = 1.0,
                  warmup_iters: int = 0, warmup_ratio: float = WARMUP_RATIO) -> float:
    """Poly decay ``min_lr + (base_lr - min_lr) (1 - it/total)^power``; during the first
    ``warmup_iters`` iterations it is scaled by a factor rising linearly from ``warmup_ratio`` to 1
    (mmcv's 'linear' warmup, applied on top of the decayed rate)."""
    lr = min_lr + (base_lr - min_lr) * (1 - min(it, total) / total) ** power
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


# ----------------------------------------------------------------------------- data

def collate_lists(batch):
    """Evaluation batches: (list of images, list of masks), as sizes may differ."""
    images, masks = zip(*batch)
    return list(images), list(masks)


def builtin_options(args, split: str) -> dict:
    return dict(num_images=args.builtin_images if split == "train" else args.builtin_val_images,
                image_size=args.builtin_size, num_object_classes=args.builtin_classes, seed=args.builtin_seed,
                max_objects=args.builtin_max_objects, layout=args.builtin_layout)


def build_dataset(args, split: str, transform):
    try:
        name = args.train_split if split == "train" else args.val_split
        opts = builtin_options(args, split) if args.dataset == "builtin" else {}
        return build_segmentation_dataset(args.dataset, args.data_dir, name, transform, **opts)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def build_train_loader(args, info: utils.DistInfo):
    tf = seg_transforms.TrainTransform(args.scale, args.crop_size, args.ratio_range, args.cat_max_ratio,
                                       photometric=bool(args.photometric))
    dataset = build_dataset(args, "train", tf)
    if hasattr(dataset, "skip_unreadable"):
        dataset.skip_unreadable = True
    try:
        loader = datasets.build_loader(dataset, args.batch_size, info.world_size, info.rank, train=True,
                                       num_workers=args.workers, seed=args.seed,
                                       pin_memory=info.device.type == "cuda")
    except ValueError as e:
        raise UserError(str(e)) from None
    return dataset, loader


def data_error(e: BaseException) -> str:
    """The message of an error raised while reading the data. A loader worker's error comes back with
    the worker's traceback in its text, whose last line is the original error: that line is kept."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        kind, sep, rest = last.partition(": ")
        text = rest if sep and kind.replace(".", "").replace("_", "").isalnum() else last
    return text


def checked_batches(batches, what: str):
    """``batches``, with a file that cannot be read or holds bad labels turned into a one-line
    UserError naming ``what`` (training or evaluation data) and the file."""
    batches = iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError) as e:
            raise UserError(f"{what}: {data_error(e)}") from None
        yield batch


def build_val_loader(args, info: utils.DistInfo):
    """Every evaluation image exactly once over the processes (rank r takes r, r + W, ...): no
    padding duplicates, so the summed confusion matrix counts each pixel once."""
    dataset = build_dataset(args, "val", seg_transforms.EvalTransform(args.scale))
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=args.val_batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_lists, pin_memory=info.device.type == "cuda")
    return dataset, loader


# ----------------------------------------------------------------------------- model

def build_backbone(args, device: torch.device) -> nn.Module:
    kw = {}
    if args.family == "resnet":
        kw = dict(small_input=args.small_input,
                  replace_stride_with_dilation=[False, bool(args.dilated), bool(args.dilated)])
    backbone, _ = models.build_backbone(args.arch, **kw)
    if args.pretrained is not None:
        try:
            _, unexpected = load_backbone_weights(backbone, args.pretrained, args.arch, allow_unexpected=True,
                                                  trusted=args.trust_checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        if utils.is_main_process():
            extra = f", ignoring {len(unexpected)} non-backbone entries" if unexpected else ""
            print(f"loaded {args.arch} weights from {args.pretrained}{extra}", flush=True)
    elif utils.is_main_process():
        print(f"warning: no --pretrained: the {args.arch} backbone keeps its random initialisation "
              f"(seed {args.seed})", file=sys.stderr)
    return backbone.to(device)


def autocast_factory(args, device: torch.device):
    if not args.fp16:
        return nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_model(args, num_classes: int, info: utils.DistInfo) -> seg_head.Segmenter:
    torch.manual_seed(args.seed)  # a random backbone is then the same in every process
    backbone = build_backbone(args, info.device)
    features = seg_head.FrozenBackbone(backbone, [s - 1 for s in args.stages], autocast_factory(args, info.device))
    torch.manual_seed(args.seed)
    head = seg_head.LinearHead(features.out_channels, num_classes, args.dropout)
    if info.world_size > 1 and info.device.type == "cuda":  # statistics over the global batch
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return seg_head.Segmenter(features, head).to(info.device)


def build_optimizer(args, head: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on every head parameter, BatchNorm's included (mmsegmentation's default); the
    # learning rate is set by the schedule at every iteration.
    if args.optimizer == "sgd":
        return torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------- checkpoints

SAVED_ARGS = ("arch", "dataset", "stages", "small_input", "dilated", "builtin_classes")


def load_resume_state(path: Path, args) -> Optional[dict]:
    """exp_dir/checkpoint.pth if present and made by a compatible run; else None or UserError."""
    return training.load_resume_state(path, "segmentation", ("head", "optimizer", "iteration"), args, SAVED_ARGS,
                                      trusted=args.trust_checkpoint)


def save_checkpoint(path: Path, head: nn.Module, optimizer, it: int, args, main_proc: bool) -> None:
    training.save_state(path, lambda: dict(iteration=it, head=head.state_dict(), optimizer=optimizer.state_dict(),
                                           args=training.plain_args(args)), main_proc)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: seg_head.Segmenter, loader, num_classes: int, args, device, logger: Optional[utils.JsonLogger] = None):
    """Confusion matrix (K, K) over this process's share of the evaluation set, summed over processes."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    start = time.time()
    what = f"evaluation data ({args.dataset} {args.val_split})"
    for n, (images, masks) in enumerate(checked_batches(loader, what), 1):
        same = len({tuple(x.shape) for x in images}) == 1 and len({tuple(y.shape) for y in masks}) == 1
        groups = [(torch.stack(images), torch.stack(masks))] if same else \
            [(x[None], y[None]) for x, y in zip(images, masks)]
        for x, y in groups:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = seg_head.predict(model, x, y.shape[-2:], args.inference, args.window, args.stride)
            conf += metrics.confusion_matrix(logits.argmax(1), y, num_classes, IGNORE_INDEX)
        if logger is not None:
            logger.progress(f"eval {n}/{len(loader)} | {utils.hms(time.time() - start)}")
    metrics.all_reduce_sum(conf)
    model.train(was_training)
    return conf


def validation_line(it: int, conf: torch.Tensor, class_names, start: float) -> dict:
    return {training.ITERATION: it, **metrics.segmentation_scores(conf, class_names),
            training.TIME: training.elapsed_field(start)}


# ----------------------------------------------------------------------------- loop

def training_step(features: nn.Module, head: nn.Module, optimizer, images: torch.Tensor, masks: torch.Tensor,
                  lr: float, it: int) -> torch.Tensor:
    """One SGD/AdamW step of the head on a batch: images (B, 3, H, W), masks (B, H, W) -> loss (detached)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = head(features(images))  # (B, K, h, w) at the feature resolution
    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    if (masks != IGNORE_INDEX).any():
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
    else:  # every pixel ignored (possible with tiny crops): no signal, but keep DDP in step
        loss = logits.sum() * 0.0
    training.check_finite(loss.detach(), it, hint="lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def restore(ckpt: Optional[dict], head: nn.Module, optimizer, path: Path) -> int:
    """Load the head and optimiser from a resume checkpoint; the iteration to continue from."""
    if ckpt is None:
        return 0
    training.restore(path, ckpt, head=head, optimizer=optimizer)
    return int(ckpt["iteration"])


def train(args) -> None:
    info = utils.init_distributed(args.device, args.dist_url, args.local_rank)
    main_proc = info.rank == 0
    resolve_args(args)
    utils.set_cpu_threads(info.device, args.workers, args.threads)
    if args.tensorboard:
        utils.require_tensorboard()  # a missing package fails now, not after loading the backbone
    if args.batch_size < 1 or args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must be a positive multiple "
                        f"of the number of processes ({info.world_size})")
    start = time.time()

    # resume state first: it may say which --pretrained the run started with
    ckpt_path = args.exp_dir / "checkpoint.pth"
    ckpt = load_resume_state(ckpt_path, args)
    saved_pretrained = (ckpt or {}).get("args", {}).get("pretrained")
    if args.pretrained is None and ckpt is not None:
        args.pretrained = saved_pretrained
    elif ckpt is not None and str(args.pretrained) != str(saved_pretrained) and main_proc:
        print(f"warning: {ckpt_path} was trained on the backbone from --pretrained {saved_pretrained}; now "
              f"--pretrained {args.pretrained}: make sure it is the same backbone", file=sys.stderr)
    if args.eval_only and ckpt is None:
        raise UserError(f"--eval-only needs a trained head in {ckpt_path}; there is none")

    # data (before the model: a missing folder fails in a second, not after loading a large net)
    val_set, val_loader = build_val_loader(args, info)
    train_loader = None if args.eval_only else build_train_loader(args, info)[1]
    num_classes, class_names = val_set.num_classes, val_set.class_names

    # model, optimiser, resume
    model = build_model(args, num_classes, info)
    optimizer = build_optimizer(args, model.head)
    it = restore(ckpt, model.head, optimizer, ckpt_path)
    head = model.head if info.world_size == 1 else nn.parallel.DistributedDataParallel(
        model.head, device_ids=[info.device] if info.device.type == "cuda" else None)
    # TensorBoard's global step is `it`; the line at the resumed iteration `it` itself stays valid
    logger = utils.JsonLogger(args.exp_dir, main_proc, args.tensorboard, purge_step=None if args.eval_only else it + 1)
    if main_proc:
        print(f"{args.arch} features {model.features.out_channels} channels (stages {args.stages}) -> "
              f"{num_classes} classes; {args.optimizer} lr {args.lr} wd {args.weight_decay}; "
              f"{args.iters} iterations of {args.batch_size} {tuple(args.crop_size)} crops; "
              f"{args.inference} inference" + (f"; resuming from {ckpt_path} at iteration {it}" if ckpt else ""),
              flush=True)

    def validate(it: int) -> dict:
        line = validation_line(it, evaluate(model, val_loader, num_classes, args, info.device, logger),
                               class_names, start)
        logger.log(line, training.VAL_PREFIX, step=it)
        return line

    if args.eval_only:
        validate(it)
        return

    # loop: iterations over epochs of the training set; `skip` resumes in the middle of an epoch
    stop_at = min(args.iters, it + args.stop_after_iters) if args.stop_after_iters else args.iters
    epoch, skip = divmod(it, len(train_loader))
    model.train()
    progress = training.Progress(logger, args.iters, args.batch_size, first_step=it)
    loss_sum, loss_count = torch.zeros((), device=info.device), 0  # mean over each logging interval
    while it < stop_at:
        for images, masks in checked_batches(datasets.epoch_iterator(train_loader, epoch, skip),
                                             f"training data ({args.dataset} {args.train_split})"):
            lr = learning_rate(it, args.iters, args.lr, args.min_lr, args.poly_power, args.warmup_iters)
            torch.manual_seed(training.step_seed(args.seed, info.rank, it))  # dropout replays after a resume
            loss = training_step(model.features, head, optimizer, images.to(info.device, non_blocking=True),
                                 masks.to(info.device, non_blocking=True), lr, it)
            it += 1
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            if it % args.print_freq == 0 or it == stop_at:
                mean_loss = float(utils.all_reduce_mean(loss_sum / loss_count))
                logger.log({training.EPOCH: epoch, training.ITERATION: it, training.LR: lr,
                            "loss": round(mean_loss, 6), training.TIME: training.elapsed_field(start)},
                           step=it, extra=progress.scalars(it))
                loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            progress.show(it, f"it {it}/{args.iters} | lr {lr:.2e}", lambda: float(loss))
            if it % args.checkpoint_interval == 0 or it == stop_at:
                save_checkpoint(ckpt_path, model.head, optimizer, it, args, main_proc)
            if args.eval_interval and it % args.eval_interval == 0 and it < args.iters:
                validate(it)
            if it >= stop_at:
                break
        epoch, skip = epoch + 1, 0

    if it < args.iters:
        if main_proc:
            print(f"\nstopped at iteration {it} of {args.iters} (--stop-after-iters); rerun the same command to "
                  f"continue", flush=True)
        return
    line = validate(it)
    if main_proc:
        print(f"done: mIoU {line['mIoU']:.2f} on {args.dataset} {args.val_split} ({utils.hms(time.time() - start)})",
              flush=True)


@training.entry_point
def main(args: argparse.Namespace) -> None:
    train(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
