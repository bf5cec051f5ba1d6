"""Evaluation of a pretrained backbone: linear probe, fine-tuning, 1% / 10% subsets, k-NN.

    python evaluate.py --data-dir /path/to/imagenet --pretrained backbone.pth --exp-dir exp/lincls \\
        --arch resnet50 --lr-head 0.02
    python evaluate.py --dataset builtin --builtin-size 32 --crop-size 32 --resize-size 32 \\
        --arch resnet_test --exp-dir exp/lin --epochs 10 --knn
    torchrun --nproc_per_node=8 evaluate.py --data-dir ... --weights finetune --lr-backbone 0.01 ...

Reads top to bottom: arguments and their checks, data, model and weights, optimiser, resume, k-NN,
loop. Rank 0 writes ``exp_dir/stats.txt`` (the command line, then JSON lines) and
``exp_dir/checkpoint.pth`` (written atomically at the end of every epoch, resumed automatically).
"""
import argparse
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

import builtin_data
import datasets
import models
import training
import utils
from models.checkpoints import CheckpointError, load_backbone_weights
from models.knn import extract_features, knn_accuracy, knn_evaluate, topk_correct, unpadded_mask
from transforms import eval_transform, linear_train_transform
from utils import UserError

# The semi-supervised lists of SimCLR, which the reference downloaded at run time: one ImageNet
# training file name per line (e.g. n01440764_10026.JPEG).
SUBSET_URL = "https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/{percent}percent.txt"
DOWNLOAD_TIMEOUT_S = 30


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VICRegL evaluation: linear probe, fine-tuning and k-NN", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="dataset root with train/ and val/ class folders (the ImageNet layout); "
                        "defaults to $IMAGENET_PATH")
    g.add_argument("--dataset", default="imagenet1k",
                   choices=["imagenet1k", "imagefolder", "builtin", "cifar10", "cifar100", "stl10"],
                   help="imagenet1k / imagefolder: <data-dir>/{train,val}/<class>/<image> (any labelled "
                        "folder dataset); builtin: the procedural dataset (no download, --builtin-* options); "
                        "cifar10, cifar100, stl10: the official files under --data-dir (as torchvision downloads "
                        "them), training set vs test set")
    g.add_argument("--download", action="store_true",
                   help="with --dataset cifar10/cifar100/stl10: download the official files into --data-dir "
                        "when they are missing")
    g.add_argument("--dataset_from_numpy", action="store_true",
                   help="read {train,val}_images.npy (paths) and {train,val}_labels.npy under --data-dir")
    g.add_argument("--train-percent", type=int, default=100, choices=(100, 10, 1),
                   help="train on 100%% of the training images, or on the 10%% / 1%% subsets of the "
                        "semi-supervised protocol (list from --train-files, else downloaded)")
    g.add_argument("--train-files", type=Path, default=None,
                   help="local list of the training images to use, one file name per line (as SimCLR's "
                        "1percent.txt / 10percent.txt: n01440764_10026.JPEG); matched by file name. "
                        "Needed offline with --train-percent 1 or 10")
    g.add_argument("--crop-size", type=int, default=224,
                   help="side of the training random-resized crop and of the validation centre crop "
                        "(32 for 32-pixel images)")
    g.add_argument("--resize-size", type=int, default=256,
                   help="validation: shorter side resized to this before the centre crop")
    g.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest area fraction of the random-resized training crops (the reference's 0.08); "
                        "larger values suit small images such as the built-in dataset's")
    g.add_argument("--train-images", type=int, default=0,
                   help="use this many training images, drawn at random (--seed), for the probe and the k-NN "
                        "bank (0: all): bounds the evaluation's time on large datasets")
    g.add_argument("--val-images", type=int, default=0,
                   help="validate on this many validation images, drawn at random (--seed) (0: all)")
    builtin_data.add_builtin_arguments(g)
    g.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU/process")
    utils.add_threads_argument(g)
    datasets.add_max_image_pixels_argument(g)

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help=f"backbone: one of {', '.join(models.available_archs())}")
    g.add_argument("--pretrained", default=None,
                   help="backbone weights: an exported backbone (backbone.pth, the published "
                        "<arch>_alpha<a>.pth), a pretraining checkpoint (model.pth, _fullckpt.pth), as a "
                        "path or URL; loaded strictly. Without it the backbone is random (a baseline)")
    g.add_argument("--small-input", action="store_true",
                   help="ResNet with a 3x3 stride-1 stem and no max-pool, for 32-pixel images (must match "
                        "how the backbone was pretrained)")
    g.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="ConvNeXt stochastic depth while fine-tuning (no effect on a frozen backbone)")
    g.add_argument("--weights", default="freeze", choices=("finetune", "freeze"),
                   help="freeze: linear probe, the backbone frozen and in eval mode; finetune: train the "
                        "backbone too, at --lr-backbone")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch size, split evenly over the processes (also for validation)")
    g.add_argument("--lr-head", type=float, default=0.3,
                   help="learning rate of the linear head (0.02 for ResNets, 0.3 for ConvNeXts)")
    g.add_argument("--lr-backbone", type=float, default=0.0,
                   help="learning rate of the backbone with --weights finetune (0 keeps its weights; "
                        "BatchNorm statistics still adapt)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="SGD weight decay")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the head's initialisation (and of a random backbone), the data order and "
                        "the augmentations: a run and its resumed continuation see the same random numbers")

    g = p.add_argument_group("k-NN")
    g.add_argument("--knn", action="store_true",
                   help="also evaluate a weighted k-NN classifier on the frozen features (before training)")
    g.add_argument("--knn-only", action="store_true", help="run the k-NN evaluation only, no linear training")
    g.add_argument("--feature-probe", action="store_true",
                   help="linear probe on features computed once (centre crops as for the k-NN bank, no "
                        "augmentation; standardised with the training features' mean and std, which are then "
                        "folded into the head) instead of on augmented crops every epoch: the frozen backbone "
                        "runs once instead of --epochs times, so the probe takes seconds on a CPU. Needs "
                        "--weights freeze")
    g.add_argument("--knn-k", type=int, default=20, help="number of neighbours")
    g.add_argument("--knn-temperature", type=float, default=0.07,
                   help="neighbours vote with weight exp(cosine similarity / temperature)")

    g = p.add_argument_group("run")
    g.add_argument("--exp-dir", type=Path, default=Path("./checkpoint/lincls/"),
                   help="folder for stats.txt and checkpoint.pth (resumed automatically)")
    g.add_argument("--print-freq", type=int, default=100, help="training steps between two log lines")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the numbers of stats.txt and the images per second to TensorBoard event "
                        "files in <exp-dir>/tensorboard/ (needs pip install tensorboard)")
    g.add_argument("--stop-after-epochs", type=int, default=0,
                   help="end this process after this many epochs (checkpoint written; 0: run to "
                        "--epochs): rerun the same command to continue, e.g. to fit a job's time limit")
    g.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cuda' or 'cpu'")
    utils.add_trust_argument(g)
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    g.add_argument("--dist-url", default="env://", help="rendezvous URL of the process group")
    return p


# ----------------------------------------------------------------------------- checks

def check_args(args: argparse.Namespace) -> None:
    """Every configuration error, found before any work starts, naming the flag."""
    if args.data_dir is None and args.dataset in ("imagenet1k", "imagefolder") and os.environ.get("IMAGENET_PATH"):
        args.data_dir = Path(os.environ["IMAGENET_PATH"])
    try:
        family = models.backbone_family(args.arch)
        datasets.set_max_image_pixels(args.max_image_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.small_input and family != "resnet":
        raise UserError("--small-input applies to ResNet backbones only")
    if args.crop_size < 1 or args.resize_size < args.crop_size:
        raise UserError(f"--resize-size ({args.resize_size}) must be at least --crop-size ({args.crop_size})")
    if models.map_size(args.arch, args.crop_size, small_input=args.small_input) < 1:
        raise UserError(f"--crop-size {args.crop_size} is too small for --arch {args.arch}")
    if args.epochs < 1 and not args.knn_only:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.min_crop_scale <= 1:
        raise UserError(f"--min-crop-scale must be in (0, 1], got {args.min_crop_scale}")
    if args.knn_k < 1 or args.knn_temperature <= 0:
        raise UserError(f"--knn-k must be >= 1 and --knn-temperature > 0 (got {args.knn_k}, "
                        f"{args.knn_temperature})")
    if args.print_freq < 1 or args.stop_after_epochs < 0 or args.workers < 0:
        raise UserError("--print-freq must be >= 1, --stop-after-epochs and --workers >= 0")
    if args.feature_probe and args.weights != "freeze":
        raise UserError("--feature-probe trains the head on fixed features: it needs --weights freeze")
    if args.train_images < 0 or args.val_images < 0:
        raise UserError(f"--train-images and --val-images must be >= 0 (got {args.train_images}, {args.val_images})")
    if args.train_files is not None and not args.train_files.is_file():
        raise UserError(f"--train-files {args.train_files}: no such file")
    if args.tensorboard:
        utils.require_tensorboard()


# ----------------------------------------------------------------------------- data

class WithTransform(Dataset):
    """``base[i] = (image, label)`` -> ``(transform(image), label)``: one file listing serves both the
    augmented training loader and the k-NN bank. (A training loader from ``datasets.build_loader``
    seeds every sample's augmentation from (seed, epoch, index), so resumed runs see the same crops.)"""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def parse_file_list(text: str) -> List[str]:
    """Entries listed one per line (blank lines and # comments ignored), with '/' separators."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().replace("\\", "/").strip("/")
        if line:
            entries.append(line)
    return entries


def read_file_list(path: Path) -> List[str]:
    return parse_file_list(Path(path).read_text())


def download_file_list(percent: int, cache_dir: Path, url: Optional[str] = None,
                       timeout: float = DOWNLOAD_TIMEOUT_S) -> Tuple[List[str], str]:
    """(entries, where they came from) of SimCLR's ``percent``% list: read from
    ``cache_dir/<percent>percent.txt`` when an earlier run saved it there, else downloaded (rank 0
    saves it). Offline: a UserError that says to pass --train-files."""
    url = url or SUBSET_URL.format(percent=percent)
    cached = cache_dir / f"{percent}percent.txt"
    if cached.is_file():
        return read_file_list(cached), str(cached)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"--train-percent {percent} needs the list of the {percent}% subset, and downloading "
                        f"it from {url} failed ({reason}). Offline, download {percent}percent.txt from that "
                        f"address on another machine and pass --train-files /path/to/{percent}percent.txt") from None
    if utils.is_main_process():  # atomically: other processes may be reading an older copy
        utils.save_atomic(text.encode(), str(cached), write=lambda data, f: f.write(data))
    return parse_file_list(text), url


def select_files(dataset: Dataset, entries: Sequence[str], source: str) -> Subset:
    """The samples of a file dataset (``dataset.samples``: (path, label)) that ``entries`` list.

    An entry is a file name (``n01440764_10026.JPEG``, as SimCLR's lists, matched by name) or the
    end of a path (``airplane/0000.jpg``, for datasets whose file names repeat across classes).
    ``subset.unmatched`` counts the entries that match no image, ``subset.ambiguous`` the plain names
    that match several.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise UserError("--train-percent / --train-files select image files by name; this dataset has no "
                        "files (use --dataset imagenet1k or imagefolder)")
    wanted = {}  # number of path components -> entries
    for entry in entries:
        wanted.setdefault(entry.count("/") + 1, set()).add(entry)
    indices, hits = [], {}
    for i, (path, _) in enumerate(samples):
        parts = Path(path).parts
        for depth, names in wanted.items():
            tail = "/".join(parts[-depth:])
            if tail in names:
                indices.append(i)
                hits[tail] = hits.get(tail, 0) + 1
                break
    if not indices:
        example = "/".join(Path(samples[0][0]).parts[-2:])
        raise UserError(f"none of the {len(set(entries))} entries listed in {source} (e.g. {entries[0]}) is a "
                        f"training image (e.g. {example}); is it the list for this dataset?")
    subset = Subset(dataset, indices)
    subset.num_classes = dataset.num_classes
    subset.unmatched = len(set(entries)) - len(hits)
    subset.ambiguous = sum(1 for name, n in hits.items() if n > 1)
    return subset


def random_subset(dataset: Dataset, count: int, seed: int) -> Dataset:
    """``count`` samples of ``dataset`` drawn without replacement (the same ones for a given seed), in
    dataset order; the dataset itself when ``count`` is 0 or at least its size."""
    if count <= 0 or count >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    subset = Subset(dataset, chosen.sort().values.tolist())
    subset.num_classes = dataset.num_classes
    return subset


def build_data(args, info: utils.DistInfo):
    """(train loader, val loader, k-NN train loader or None, number of classes)."""
    kw = dict(from_numpy=args.dataset_from_numpy, image_size=args.builtin_size,
              num_classes=args.builtin_classes, seed=args.builtin_seed, max_objects=args.builtin_max_objects,
              layout=args.builtin_layout, download=args.download)
    val_tf = eval_transform(args.crop_size, args.resize_size)
    try:
        train_set = datasets.build_dataset(args.dataset, args.data_dir, "train", None,
                                           num_images=args.builtin_images, **kw)
        val_set = datasets.build_dataset(args.dataset, args.data_dir, "val", val_tf,
                                         num_images=args.builtin_val_images, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    num_classes = train_set.num_classes
    if num_classes < 2:
        raise UserError(f"the training set has {num_classes} classes: evaluation needs labelled data")
    if args.train_files is not None or args.train_percent < 100:
        if args.train_files is not None:
            entries, source = read_file_list(args.train_files), str(args.train_files)
        else:
            entries, source = download_file_list(args.train_percent, args.exp_dir)
        if not entries:
            raise UserError(f"{source} lists no file")
        full = len(train_set)
        train_set = select_files(train_set, entries, source)
        if info.rank == 0:
            print(f"training on {len(train_set)} of {full} images, listed in {source}"
                  + (f"; {train_set.unmatched} listed entries match no image" if train_set.unmatched else "")
                  + (f"; {train_set.ambiguous} names match several images (write <class>/<name> to pick one)"
                     if train_set.ambiguous else ""), flush=True)
    if (args.train_images and args.train_images < len(train_set)) or (args.val_images and args.val_images < len(val_set)):
        if info.rank == 0:
            print(f"evaluating on {min(args.train_images or len(train_set), len(train_set))} of {len(train_set)} "
                  f"training and {min(args.val_images or len(val_set), len(val_set))} of {len(val_set)} validation "
                  f"images, drawn at random (--train-images, --val-images)", flush=True)
        train_set = random_subset(train_set, args.train_images, args.seed)
        val_set = random_subset(val_set, args.val_images, args.seed)
    if len(train_set) < args.batch_size and not args.knn_only and not args.feature_probe:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    try:
        train_loader = None
        if not args.knn_only and not args.feature_probe:
            train_loader = datasets.build_loader(WithTransform(train_set, linear_train_transform(args.crop_size, args.min_crop_scale)),
                                                 args.batch_size, info.world_size, info.rank, train=True,
                                                 num_workers=args.workers, seed=args.seed,
                                                 pin_memory=info.device.type == "cuda")
        val_loader = datasets.build_loader(val_set, args.batch_size, info.world_size, info.rank, train=False,
                                           num_workers=args.workers, pin_memory=info.device.type == "cuda")
        knn_loader = None
        if args.knn or args.knn_only or args.feature_probe:  # the training images, unaugmented, in order
            knn_loader = datasets.build_loader(WithTransform(train_set, val_tf), args.batch_size,
                                               info.world_size, info.rank, train=False, num_workers=args.workers,
                                               pin_memory=info.device.type == "cuda")
    except ValueError as e:
        raise UserError(str(e)) from None
    return train_loader, val_loader, knn_loader, num_classes


# ----------------------------------------------------------------------------- model

class LinearClassifier(nn.Module):
    """``head(pooled features of backbone(x))``; with ``frozen`` the backbone runs without gradients."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.head = nn.Linear(width, num_classes)
        self.head.weight.data.normal_(mean=0.0, std=0.01)
        self.head.bias.data.zero_()
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics (and no drop path)
        return self

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pooled = self.backbone(x)[1]  # (B, C)
        return self.head(pooled)  # (B, num_classes)


def load_pretrained(backbone: nn.Module, source: str, arch: str, trusted: bool = False) -> None:
    """Strict loading (models/checkpoints.py); what does not fit is a UserError listing the keys."""
    try:
        load_backbone_weights(backbone, source, arch, progress=utils.is_main_process(), trusted=trusted)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def build_model(args, num_classes: int, device: torch.device) -> LinearClassifier:
    torch.manual_seed(args.seed)
    kw = models.backbone_kwargs(args.arch, small_input=args.small_input, drop_path_rate=args.drop_path_rate)
    backbone, width = models.build_backbone(args.arch, **kw)
    main_proc = utils.is_main_process()
    if args.pretrained:
        load_pretrained(backbone, args.pretrained, args.arch, args.trust_checkpoint)
        if main_proc:
            n = len(backbone.state_dict())
            print(f"loaded backbone weights from {args.pretrained}: all {n} {args.arch} keys found, "
                  f"0 missing, 0 unexpected", flush=True)
    elif main_proc:
        print(f"notice: no --pretrained given: the {args.arch} backbone is randomly initialised (seed "
              f"{args.seed}); the results are a random-features baseline", flush=True)
    return LinearClassifier(backbone, width, num_classes, frozen=args.weights == "freeze").to(device)


def build_optimizer(args, model: LinearClassifier):
    """SGD (momentum 0.9): the head at --lr-head and, when fine-tuning, the backbone at --lr-backbone;
    cosine annealing over the epochs, stepped once per epoch."""
    groups = [dict(params=model.head.parameters(), lr=args.lr_head)]
    if args.weights == "finetune":
        groups.append(dict(params=model.backbone.parameters(), lr=args.lr_backbone))
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.epochs, 1))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- checkpoint

CHECKED_ARGS = ("arch", "weights", "small_input", "dataset", "epochs", "train_percent")


def load_resume_state(path: Path, args) -> Optional[dict]:
    """exp_dir/checkpoint.pth if present; a file from another configuration, or whose best accuracies
    are not numbers, is a UserError."""
    ckpt = training.load_resume_state(path, "evaluate.py", ("epoch", "model", "optimizer", "scheduler", "best_acc"),
                                      args, CHECKED_ARGS, trusted=args.trust_checkpoint)
    if ckpt is None:
        return None
    if not all(isinstance(ckpt["best_acc"].get(k), (int, float)) for k in ("acc1", "acc5")):
        raise UserError(f"{path}: its 'best_acc' entry must hold the numbers acc1 and acc5; it was left "
                        f"untouched: use another --exp-dir")
    if not isinstance(ckpt.get("knn"), (dict, type(None))):
        raise UserError(f"{path}: its 'knn' entry must be a dict; it was left untouched: use another --exp-dir")
    return ckpt


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, best: dict, knn: Optional[dict],
                    args) -> None:
    training.save_state(path, lambda: dict(
        epoch=epoch, best_acc=best, model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), knn=knn, args=training.plain_args(args)), utils.is_main_process())


# ----------------------------------------------------------------------------- logging

def _sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    if utils.is_dist():
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------- loops

def train_one_epoch(model, ddp, loader, optimizer, epoch: int, args, info, logger, start: float,
                    epochs_left: int) -> float:
    """One epoch of SGD; returns the mean training loss over all processes."""
    ddp.train()  # LinearClassifier.train keeps a frozen backbone in eval mode
    # model randomness (drop path) as a function of (seed, rank, epoch): resumed runs replay it
    torch.manual_seed(training.step_seed(args.seed, info.rank, epoch))
    sums = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, samples
    steps = len(loader)
    progress = training.Progress(logger, epochs_left * steps, args.batch_size)
    for step, (images, target) in enumerate(datasets.epoch_iterator(loader, epoch)):
        nb = info.device.type == "cuda"
        images, target = images.to(info.device, non_blocking=nb), target.to(info.device, non_blocking=nb)
        loss = F.cross_entropy(ddp(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach().double() * target.shape[0],
                             torch.tensor(float(target.shape[0]), dtype=torch.float64, device=info.device)])
        if step % args.print_freq == 0:
            logger.log(dict(epoch=epoch, step=step, lr_head=optimizer.param_groups[0]["lr"],
                            lr_backbone=optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else 0.0,
                            loss=round(loss.item(), 6), time=int(time.time() - start)),
                       step=epoch * steps + step, extra=progress.scalars(step + 1))
        progress.show(step + 1, f"ep {epoch} step {step + 1}/{steps}", loss.item)
    sums = _sum_over_processes(sums)
    return float(sums[0] / sums[1].clamp(min=1))


@torch.no_grad()
def validate(model: nn.Module, loader, device) -> Dict[str, float]:
    """Mean loss, top-1 and top-5 (%) on the validation set, every image counted once over processes."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    seen = 0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        keep = unpadded_mask(loader, seen, target.shape[0]).to(device)  # drop the sampler's repeats
        seen += target.shape[0]
        logits, target = model(images)[keep], target[keep]
        loss = F.cross_entropy(logits, target, reduction="sum") if target.numel() else logits.sum()
        hits = topk_correct(logits, target, (1, 5)).double()
        sums += torch.cat([loss.double().view(1), hits, torch.tensor([float(target.numel())], device=device,
                                                                      dtype=torch.float64)])
    sums = _sum_over_processes(sums)
    n = float(sums[3].clamp(min=1))
    return dict(val_loss=round(float(sums[0]) / n, 6), acc1=round(100 * float(sums[1]) / n, 4),
                acc5=round(100 * float(sums[2]) / n, 4))


@torch.no_grad()
def head_metrics(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Mean loss, top-1 and top-5 (%) of ``head`` on features (N, C) with labels (N,)."""
    logits = head(features)  # (N, num_classes)
    hits = topk_correct(logits, labels, (1, 5)).double()
    n = max(labels.shape[0], 1)
    return dict(val_loss=round(float(F.cross_entropy(logits, labels)), 6), acc1=round(100 * float(hits[0]) / n, 4),
                acc5=round(100 * float(hits[1]) / n, 4))


def probe_on_features(model: LinearClassifier, optimizer, scheduler, features, args, logger,
                      start: float) -> Tuple[Dict[str, float], Dict[str, float]]:
    """--feature-probe: ``model.head`` trained for --epochs on fixed features (SGD and schedule of
    ``build_optimizer``, shuffled batches of --batch-size, seeded by --seed). ``features`` is (train
    (N, C), train labels (N,), val (M, C), val labels (M,)), the backbone's pooled outputs. The head sees
    them standardised (training mean and std per channel: the comparison of two backbones does not
    depend on the scale of their features); the standardisation is folded into it at the end, so that
    ``model`` maps images to logits as usual. Returns (last, best) validation metrics."""
    train_f, train_y, val_f, val_y = features
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)  # (C,)
    train_z, val_z = (train_f - mean) / std, (val_f - mean) / std
    order = torch.Generator().manual_seed(args.seed)
    steps = -(-train_y.shape[0] // args.batch_size)
    last, best = None, dict(acc1=0.0, acc5=0.0)
    for epoch in range(args.epochs):
        lr, loss_sum = optimizer.param_groups[0]["lr"], 0.0
        for idx in torch.randperm(train_y.shape[0], generator=order).to(train_z.device).split(args.batch_size):
            loss = F.cross_entropy(model.head(train_z[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * idx.shape[0]
        last = head_metrics(model.head, val_z, val_y)
        best = dict(acc1=max(best["acc1"], last["acc1"]), acc5=max(best["acc5"], last["acc5"]))
        logger.log(dict(epoch=epoch, loss=round(loss_sum / max(train_y.shape[0], 1), 6), **last, best_acc1=best["acc1"],
                        best_acc5=best["acc5"], lr_head=lr, lr_backbone=0.0, time=int(time.time() - start)),
                   step=(epoch + 1) * steps - 1, group="epoch")
        scheduler.step()
    with torch.no_grad():  # head(z) with z = (f - mean) / std  ==  (W / std) f + (b - (W / std) mean)
        model.head.weight.div_(std)
        model.head.bias.sub_(model.head.weight @ mean)
    return last, best


def run(args) -> None:
    try:
        info = utils.init_distributed(args.device, args.dist_url, args.local_rank)
    except ValueError as e:  # --device cuda without CUDA
        raise UserError(str(e)) from None
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    utils.set_cpu_threads(info.device, args.workers, args.threads)
    main_proc = info.rank == 0
    start = time.time()

    # data (before the model: a missing folder fails in a second, not after building a large net)
    train_loader, val_loader, knn_loader, num_classes = build_data(args, info)

    # model and weights
    model = build_model(args, num_classes, info.device)
    optimizer, scheduler = build_optimizer(args, model)

    # resume
    ckpt_path = args.exp_dir / "checkpoint.pth"
    ckpt = None if args.knn_only else load_resume_state(ckpt_path, args)
    start_epoch, best, knn = 0, dict(acc1=0.0, acc5=0.0), None
    if ckpt is not None:
        training.restore(ckpt_path, ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        start_epoch, best, knn = ckpt["epoch"], dict(ckpt["best_acc"]), ckpt.get("knn")
    # TensorBoard's global step: epoch * steps per epoch + step
    logger = utils.JsonLogger(args.exp_dir, main_proc, args.tensorboard,
                              purge_step=None if args.knn_only or train_loader is None
                              else start_epoch * len(train_loader))
    if ckpt is not None and main_proc:
        print(f"resuming from {ckpt_path}: epoch {start_epoch}, best top-1 {best['acc1']:.2f}", flush=True)

    # --feature-probe: the pooled features of the bank and of the validation images, computed once
    features = None
    if args.feature_probe and start_epoch < args.epochs:
        features = (*extract_features(model.backbone, knn_loader, info.device, normalize=False),
                    *extract_features(model.backbone, val_loader, info.device, normalize=False))
    # k-NN on the frozen features, before any training (a resumed run has it in its checkpoint)
    if knn_loader is not None and start_epoch == 0 and (args.knn or args.knn_only):
        t = time.time()
        if features is not None:
            knn = knn_accuracy(F.normalize(features[0], dim=1), features[1], F.normalize(features[2], dim=1),
                               features[3], args.knn_k, args.knn_temperature, num_classes=num_classes)
        else:
            knn = knn_evaluate(model.backbone, knn_loader, val_loader, info.device, args.knn_k,
                               args.knn_temperature, num_classes=num_classes)
        logger.log(dict(knn_k=args.knn_k, knn_temperature=args.knn_temperature, knn_top1=round(knn["top1"], 4),
                        knn_top5=round(knn["top5"], 4), time=round(time.time() - t, 1)), step=0, group="knn")
    knn_loader = None  # its persistent workers are not needed any more
    if args.knn_only:
        if main_proc:
            print(f"k-NN top-1 {knn['top1']:.2f}% top-5 {knn['top5']:.2f}% (k {args.knn_k}, "
                  f"T {args.knn_temperature})", flush=True)
        return

    ddp = model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None,
            broadcast_buffers=args.weights == "finetune")  # a frozen backbone's buffers never change
    last = None
    stop_at = args.epochs if not args.stop_after_epochs else min(args.epochs, start_epoch + args.stop_after_epochs)
    if features is not None:  # every epoch at once, on the features: nothing left for the loop below
        last, best = probe_on_features(model, optimizer, scheduler, features, args, logger, start)
        save_checkpoint(ckpt_path, model, optimizer, scheduler, args.epochs, best, knn, args)
        start_epoch = stop_at = args.epochs
    for epoch in range(start_epoch, stop_at):
        lrs = [g["lr"] for g in optimizer.param_groups]
        skipped_before = datasets.skipped_images(train_loader)
        loss = train_one_epoch(model, ddp, train_loader, optimizer, epoch, args, info, logger, start,
                               args.epochs - epoch)
        last = validate(model, val_loader, info.device)
        best = dict(acc1=max(best["acc1"], last["acc1"]), acc5=max(best["acc5"], last["acc5"]))
        logger.log(dict(epoch=epoch, loss=round(loss, 6), **last, best_acc1=best["acc1"], best_acc5=best["acc5"],
                        lr_head=lrs[0], lr_backbone=lrs[1] if len(lrs) > 1 else 0.0,
                        time=int(time.time() - start), **training.skipped_in_epoch(train_loader, skipped_before)),
                   step=(epoch + 1) * len(train_loader) - 1, group="epoch")  # at the epoch's last step
        scheduler.step()
        save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, best, knn, args)

    done = stop_at if start_epoch < stop_at else start_epoch
    if main_proc:
        if logger.tty:
            print()
        if done < args.epochs:
            print(f"stopped after epoch {done} of {args.epochs} (--stop-after-epochs); rerun the same command "
                  f"to continue from {ckpt_path}", flush=True)
            return
        summary = dict(summary=True, weights=args.weights, epochs=args.epochs, best_acc1=best["acc1"],
                       best_acc5=best["acc5"])
        if last is not None:
            summary.update(last_acc1=last["acc1"], last_acc5=last["acc5"])
        if knn is not None:
            summary.update(knn_top1=round(knn["top1"], 4))
        logger.log(summary)
        print(f"done: best top-1 {best['acc1']:.2f}%, top-5 {best['acc5']:.2f}% "
              f"({args.weights}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}, {utils.hms(time.time() - start)})", flush=True)


@training.entry_point
def main(args: argparse.Namespace) -> None:
    check_args(args)
    run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
