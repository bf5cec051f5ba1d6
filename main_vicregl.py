"""VICRegL pretraining: one plain process on a CPU, torchrun on a GPU node, or SLURM (run_with_submitit.py).

    python main_vicregl.py --dataset builtin --arch resnet_test --exp-dir exp/demo ...
    torchrun --nproc_per_node=8 main_vicregl.py --fp16 --data-dir /path/to/imagenet --exp-dir exp/r50 ...

Reads top to bottom: arguments and their checks, data, model, optimiser, resume, loop. Rank 0 writes
``exp_dir/stats.txt`` (the command line, then JSON lines), ``exp_dir/model.pth`` (training state,
written atomically, resumed automatically) and, at the end, ``exp_dir/backbone.pth`` (plain keys,
loadable with strict=True by hubconf.py and evaluate.py).
"""
import argparse
import os
import secrets
import signal
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import builtin_data
import datasets
import models
import shared_images
import training
import transforms
import utils
from models.knn import knn_evaluate
from models.losses import check_num_matches
from models.vicregl import VICRegL, VICRegLConfig, parse_mlp
from utils import UserError

DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "lars": 1e-6}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VICRegL pretraining", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--exp-dir", type=Path, default=Path("./exp"),
                   help="folder for stats.txt, model.pth (resumed automatically) and backbone.pth")
    g.add_argument("--log-tensors-interval", type=int, default=60,
                   help="seconds between two JSON log lines in stats.txt and on stdout")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the numbers of stats.txt, the images per second and the learning rate to "
                        "TensorBoard event files in <exp-dir>/tensorboard/ (needs pip install tensorboard)")
    g.add_argument("--checkpoint-freq", type=int, default=1, help="save model.pth every this many epochs")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice (data order, crops, initialisation): a run and its "
                        "resumed continuation see the same random numbers")
    g.add_argument("--device", default="auto",
                   help="'auto' (cuda when available, else cpu), 'cuda' or 'cpu'")
    utils.add_trust_argument(g)

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="imagenet1k",
                   choices=["imagenet1k", "folder", "builtin", "cifar10", "cifar100", "stl10"],
                   help="imagenet1k: train/ and val/ class folders under --data-dir; folder: a folder of "
                        "images without labels; builtin: the procedural dataset (no download); cifar10, "
                        "cifar100, stl10: the official files under --data-dir (as torchvision downloads them; "
                        "stl10 pretrains on its 100,000 unlabelled images plus its training set, without the "
                        "online probe)")
    g.add_argument("--download", action="store_true",
                   help="with --dataset cifar10/cifar100/stl10: download the official files into --data-dir "
                        "when they are missing")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="dataset root; defaults to $IMAGENET_PATH (or $IMAGENET_NUMPY_PATH with "
                        "--dataset_from_numpy), where the reference hard-coded its cluster paths")
    g.add_argument("--dataset_from_numpy", action="store_true",
                   help="read train_images.npy (paths) and train_labels.npy under --data-dir")
    builtin_data.add_builtin_arguments(g)
    g.add_argument("--size-crops", type=int, nargs="+", default=[224, 96],
                   help="side of the crops of each group (large crops first)")
    g.add_argument("--num-crops", type=int, nargs="+", default=[2, 6], help="number of crops of each group")
    g.add_argument("--min_scale_crops", type=float, nargs="+", default=[0.4, 0.08],
                   help="smallest area fraction of each group's crops")
    g.add_argument("--max_scale_crops", type=float, nargs="+", default=[1, 0.4],
                   help="largest area fraction of each group's crops")
    g.add_argument("--blur-prob", type=float, nargs=2, default=[1.0, 0.1], metavar=("EVEN", "ODD"),
                   help="probability of the Gaussian blur (sigma 0.1-2 pixels) of the crops with an even and an "
                        "odd index in their group (the reference's 1.0 and 0.1; small images such as 32-pixel "
                        "crops lose most of their detail to it: 0 0 turns it off)")
    g.add_argument("--no-flip-grid", type=int, default=1,
                   help="1: keep the location grid of a flipped crop unflipped (what the published "
                        "models used); 0: mirror it with the crop")
    g.add_argument("--num-workers", type=int, default=10, help="data-loading processes per GPU/process")
    g.add_argument("--in-memory", action="store_true",
                   help="decode every training image once into memory (N x 3 x H x W bytes; the images must all "
                        "have one size) and make the views of a whole batch at once: much less work per image, "
                        "for small images such as CIFAR's (with --num-workers 0 the training threads get "
                        "every core)")
    datasets.add_max_image_pixels_argument(g)

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="convnext_small",
                   help=f"backbone: one of {', '.join(models.available_archs())}")
    g.add_argument("--drop-path-rate", type=float, default=0.1, help="ConvNeXt stochastic depth rate")
    g.add_argument("--layer-scale-init-value", type=float, default=0.0,
                   help="ConvNeXt layer scale (0: none, as the published models)")
    g.add_argument("--small-input", action="store_true",
                   help="ResNet with a 3x3 stride-1 stem and no max-pool, for 32-pixel images "
                        "(a 32-pixel crop then gives a 4x4 map)")
    g.add_argument("--dilated", type=int, default=0, choices=(0, 1),
                   help="ResNet: 1 replaces the strides of layer3 and layer4 by dilation (output stride 8: "
                        "a 64-pixel crop gives an 8x8 map), as the segmentation heads read it; 0 (default) "
                        "keeps the original network")
    g.add_argument("--mlp", default="8192-8192-8192", help="global expander widths")
    g.add_argument("--maps-mlp", default="512-512-512", help="local (per position) expander widths")

    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, default=0.75,
                   help="weight of the global loss; the local loss gets 1 - alpha")
    g.add_argument("--num_matches", type=int, nargs=2, default=[20, 4],
                   help="positions kept by location matching: from the first view of a pair, and back")
    g.add_argument("--l2_all_matches", type=int, default=1,
                   help="1: feature-space matching keeps every position; 0: it keeps --num_matches")
    g.add_argument("--inv-coeff", type=float, default=25.0, help="invariance coefficient")
    g.add_argument("--var-coeff", type=float, default=25.0, help="variance coefficient")
    g.add_argument("--cov-coeff", type=float, default=1.0, help="covariance coefficient")
    g.add_argument("--fast-vc-reg", type=int, default=0,
                   help="1: local variance/covariance once per view instead of per matched pair")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--warmup-epochs", type=int, default=10, help="epochs of linear learning-rate warmup")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimisation steps (0: no cap); a cap below --epochs' steps "
                        "compresses their schedule into it: the warmup keeps its share (--warmup-epochs out of "
                        "--epochs) and the cosine ends at the last step (with --time-budget the clock sets the schedule and "
                        "this only caps the steps)")
    g.add_argument("--time-budget", type=float, default=0.0,
                   help="minutes of training (0: no limit), counted from the start of the run (data and model "
                        "building included; a resumed run continues the count saved in model.pth): the "
                        "learning-rate schedule (warmup and cosine, shaped by --warmup-epochs out of --epochs) "
                        "follows the clock instead of the steps (or the steps, where they are further along "
                        "in --epochs than the clock is in the budget, so that the cosine also ends when "
                        "--epochs comes first), and the run ends cleanly, checkpoint and "
                        "backbone written, when one more step would overrun the budget (or after --epochs / "
                        "--max-steps, if they come first)")
    g.add_argument("--batch-size", type=int, default=512,
                   help="global batch size (split evenly over the processes)")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"], help="optimiser")
    g.add_argument("--base-lr", type=float, default=0.0005,
                   help="learning rate for a batch of 256 (scaled linearly with --batch-size)")
    g.add_argument("--end-lr-ratio", type=float, default=0.001,
                   help="final learning rate as a fraction of the peak")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (default 0.05 for adamw, 1e-6 for lars)")
    g.add_argument("--maps-lr-ratio", type=float, default=0.1,
                   help="kept for compatibility; it had no effect in the reference and has none here")
    g.add_argument("--fp16", action="store_true",
                   help="mixed precision: float16 with a gradient scaler on CUDA, bfloat16 on CPU")

    g = p.add_argument_group("speed (the results do not depend on these)")
    g.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for the backbone (faster convolutions on recent GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone (minutes of compilation, then faster steps)")
    g.add_argument("--fused-optimizer", type=int, default=1,
                   help="1: AdamW's fused kernel on CUDA (multi-tensor elsewhere) and multi-tensor LARS; "
                        "0: one parameter at a time")
    utils.add_threads_argument(g)

    g = p.add_argument_group("evaluation")
    g.add_argument("--val-batch-size", type=int, default=-1, help="validation batch (-1: --batch-size)")
    g.add_argument("--evaluate", action="store_true",
                   help="evaluate the online linear probe on the validation split every --eval-freq epochs")
    g.add_argument("--evaluate-only", action="store_true", help="evaluate the saved model.pth and exit")
    g.add_argument("--eval-freq", type=int, default=10, help="epochs between validations")
    g.add_argument("--knn", action="store_true",
                   help="also a k-NN evaluation of the backbone's frozen features (training split as the bank, "
                        "validation split as queries) every --eval-freq epochs and at the end")
    g.add_argument("--knn-k", type=int, default=20, help="k-NN: number of neighbours")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN: temperature of the vote weights")

    g = p.add_argument_group("distributed")
    g.add_argument("--world-size", type=int, default=1,
                   help="kept for compatibility: the world size comes from the launcher")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    g.add_argument("--dist-url", default="env://", help="rendezvous URL of the process group")
    return p


# ----------------------------------------------------------------------------- checks

def resolve_args(args: argparse.Namespace, job_id: Optional[str] = None) -> argparse.Namespace:
    """Fill derived defaults in place: weight decay, data dir, val batch, and ``%j`` in --exp-dir
    (``job_id``: the SLURM job id, so that a requeued job finds its own folder)."""
    if job_id and "%j" in str(args.exp_dir):
        args.exp_dir = Path(str(args.exp_dir).replace("%j", str(job_id)))
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    if args.data_dir is None and args.dataset == "imagenet1k":
        env = "IMAGENET_NUMPY_PATH" if args.dataset_from_numpy else "IMAGENET_PATH"
        if os.environ.get(env):
            args.data_dir = Path(os.environ[env])
    if args.val_batch_size == -1:
        args.val_batch_size = args.batch_size
    return args


def crop_grid_sizes(args) -> List[int]:
    """Side of the location grid of each crop group = side of the backbone's map for that crop."""
    return [models.map_size(args.arch, s, small_input=args.small_input, replace_stride_with_dilation=dilation(args))
            for s in args.size_crops]


def dilation(args) -> Optional[List[bool]]:
    """--dilated as torchvision's replace_stride_with_dilation (None: the original strides)."""
    return [False, True, True] if args.dilated else None


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Every configuration error, found before any work starts, naming the flag."""
    try:
        models.backbone_family(args.arch)
        parse_mlp(args.mlp, "--mlp")
        parse_mlp(args.maps_mlp, "--maps-mlp")
        datasets.set_max_image_pixels(args.max_image_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    groups = {"--size-crops": args.size_crops, "--num-crops": args.num_crops,
              "--min_scale_crops": args.min_scale_crops, "--max_scale_crops": args.max_scale_crops}
    if len({len(v) for v in groups.values()}) != 1:
        raise UserError("--size-crops, --num-crops, --min_scale_crops and --max_scale_crops need one value "
                        "per crop group; got " + ", ".join(f"{k} {v}" for k, v in groups.items()))
    if sum(args.num_crops) < 2 or min(args.num_crops) < 1:
        raise UserError(f"--num-crops {args.num_crops}: every group needs a crop and the two first crops "
                        f"are the pair of large views, so at least 2 crops in all")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must lie in [0, 1], got {args.alpha}")
    if not all(0.0 <= p <= 1.0 for p in args.blur_prob):
        raise UserError(f"--blur-prob needs two probabilities in [0, 1] (even and odd crops), got {args.blur_prob}")
    for flag, value in (("--batch-size", args.batch_size), ("--val-batch-size", args.val_batch_size)):
        if value < 1 or value % world_size:
            raise UserError(f"{flag} {value} must be a positive multiple of the number of processes "
                            f"({world_size})")
    if args.epochs < 1 or args.warmup_epochs < 0:
        raise UserError(f"--epochs must be >= 1 and --warmup-epochs >= 0 (got {args.epochs}, {args.warmup_epochs})")
    if args.max_steps < 0 or args.time_budget < 0:
        raise UserError(f"--max-steps and --time-budget must be >= 0 (got {args.max_steps}, {args.time_budget})")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    if args.small_input and models.backbone_family(args.arch) != "resnet":
        raise UserError("--small-input applies to ResNet backbones only")
    if args.dilated and models.backbone_family(args.arch) != "resnet":
        raise UserError("--dilated applies to ResNet backbones only")
    sides = crop_grid_sizes(args)
    for size, side in zip(args.size_crops, sides):
        if side < 1:
            raise UserError(f"--size-crops {size} is too small for --arch {args.arch}: its feature map "
                            f"would be empty")
    if args.alpha < 1:
        positions = [side * side for side, n in zip(sides, args.num_crops) for _ in range(n)]
        try:
            check_num_matches(positions, args.num_matches)
        except ValueError as e:
            raise UserError(f"{e}; crop sizes {args.size_crops} give {sides} grids for --arch {args.arch}") from None


# ----------------------------------------------------------------------------- building blocks

def build_data(args, info: utils.DistInfo, split: str):
    sides = crop_grid_sizes(args)
    kw = dict(size_crops=args.size_crops, num_crops=args.num_crops, min_scale_crops=args.min_scale_crops,
              max_scale_crops=args.max_scale_crops, no_flip_grid=bool(args.no_flip_grid), grid_sizes=sides)
    try:
        # Training views get their colour distortion a whole batch at a time (collate_views).
        tf = (transforms.MultiCropTrainDataTransform(**kw, batch_colours=True, blur_p=args.blur_prob)
              if split == "train"
              else transforms.MultiCropValDataTransform(**kw))
        dataset = datasets.build_dataset(args.dataset, args.data_dir, split, tf,
                                         from_numpy=args.dataset_from_numpy,
                                         num_images=(args.builtin_images if split == "train"
                                                     else args.builtin_val_images),
                                         image_size=args.builtin_size, num_classes=args.builtin_classes,
                                         max_objects=args.builtin_max_objects, layout=args.builtin_layout,
                                         seed=args.builtin_seed, download=args.download, with_unlabeled=True)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if split == "train" and args.in_memory:
        start = time.time()
        dataset = in_memory(dataset, tf, info)
        if info.rank == 0:
            _, _, height, width = dataset.images.shape
            where = (f", one copy per machine in {os.path.dirname(dataset.file)}, shared by its processes"
                     if dataset.file else "")
            print(f"--in-memory: {len(dataset)} training images of {width}x{height} decoded in "
                  f"{time.time() - start:.1f} s ({dataset.images.numel() / 2 ** 20:.0f} MiB{where})", flush=True)
    return dataset, _loader(args, info, dataset, split)


def in_memory(dataset, tf, info: utils.DistInfo) -> shared_images.InMemoryImages:
    """--in-memory: ``dataset`` decoded into memory. With several processes, the first process of each
    machine (local rank 0) decodes into a file in shared memory that the others of the machine map,
    so that the images are decoded and held once per machine, not once per process; the file is
    removed as soon as every process has mapped it. A UserError in every process when it fails."""
    if info.world_size == 1:
        try:
            return shared_images.InMemoryImages(dataset, tf)
        except ValueError as e:
            raise UserError(f"--in-memory: {e}") from None
    # a name of this run and machine: process 0's random number and the host (the temporary folder
    # may be shared between machines)
    token = utils.max_over_processes([secrets.randbits(62) if info.rank == 0 else 0])[0]
    name = f"vicregl-images-{token:016x}-{socket.gethostname()}"
    images, error, shape = None, None, [0, 0, 0]  # failed, height, width
    if info.local_rank == 0:
        try:
            images = shared_images.InMemoryImages(dataset, tf, share_as=name)
            shape = [0, *images.images.shape[2:]]
        except (ValueError, OSError) as e:
            error, shape = e, [1, 0, 0]
    failed, height, width = utils.max_over_processes(shape)
    if failed:  # every process leaves, none waits for the others
        raise UserError(f"--in-memory: {error}" if error else
                        "--in-memory: the images could not be decoded (the first process of a machine says why)")
    try:
        if images is None:  # the machine's first process chose the folder
            try:
                path = shared_images.find_shared(name)
                images = shared_images.InMemoryImages.mapped(dataset, tf, path, len(dataset), height, width)
            except OSError as e:
                error = e
        failed = utils.any_process(error is not None)  # every process has mapped the file
    finally:
        if info.local_rank == 0 and images is not None:
            images.unshare()
    if failed:
        raise UserError(f"--in-memory: {error}" if error else
                        "--in-memory: another process could not map the shared images (it says why)")
    return images


def _loader(args, info: utils.DistInfo, dataset, split: str, train: Optional[bool] = None):
    batch = args.batch_size if split == "train" else args.val_batch_size
    if split == "train" and len(dataset) < batch:
        raise UserError(f"--batch-size {batch} is larger than the training set ({len(dataset)} images)")
    return datasets.build_loader(dataset, batch, info.world_size, info.rank,
                                 train=split == "train" if train is None else train,
                                 num_workers=args.num_workers, seed=args.seed, pin_memory=info.device.type == "cuda",
                                 collate_fn=transforms.collate_views if split == "train" else None)


def build_knn_data(args, info: utils.DistInfo):
    """Ordered loaders of the training split (the bank) and the validation split (the queries), seen
    as in evaluation: resize to int(crop·256/224), centre crop --size-crops[0], std 0.229."""
    crop = args.size_crops[0]
    tf = transforms.eval_transform(crop, int(crop * 256 / 224))
    loaders = []
    for split in ("train", "val"):
        try:
            dataset = datasets.build_dataset(args.dataset, args.data_dir, split, tf,
                                             from_numpy=args.dataset_from_numpy,
                                             num_images=(args.builtin_images if split == "train"
                                                     else args.builtin_val_images),
                                             image_size=args.builtin_size, num_classes=args.builtin_classes,
                                             max_objects=args.builtin_max_objects, layout=args.builtin_layout,
                                             seed=args.builtin_seed, download=args.download)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        if not getattr(dataset, "num_classes", 0):
            raise UserError("--knn needs labels: this dataset has no classes")
        loaders.append(_loader(args, info, dataset, "val", train=False))
    return loaders


def build_model(args, num_classes: int, device: torch.device) -> VICRegL:
    bk = models.backbone_kwargs(args.arch, drop_path_rate=args.drop_path_rate,
                                layer_scale_init_value=args.layer_scale_init_value,
                                zero_init_residual=True, small_input=args.small_input,
                                replace_stride_with_dilation=dilation(args))
    cfg = VICRegLConfig(arch=args.arch, mlp=args.mlp, maps_mlp=args.maps_mlp, alpha=args.alpha,
                        num_classes=num_classes, num_matches=tuple(args.num_matches),
                        l2_all_matches=bool(args.l2_all_matches), inv_coeff=args.inv_coeff,
                        var_coeff=args.var_coeff, cov_coeff=args.cov_coeff, fast_vc_reg=bool(args.fast_vc_reg),
                        backbone_kwargs=bk)
    return VICRegL(cfg).to(device)


def build_optimizer(args, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # lr is set by the schedule at every step.
    fast = bool(args.fused_optimizer)
    if args.optimizer == "lars":
        return utils.LARS(model.parameters(), lr=0.0, weight_decay=args.weight_decay, foreach=fast)
    groups = utils.param_groups_weight_decay(model.named_parameters(), args.weight_decay)
    if fast and device.type == "cuda":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    return torch.optim.AdamW(groups, lr=0.0, foreach=fast)


def precision(args, device: torch.device):
    """(autocast context factory, gradient scaler or None)."""
    if not args.fp16:
        return nullcontext, None
    if device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


# ----------------------------------------------------------------------------- checkpoints

def with_module_prefix(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys as DDP writes them, also without DDP, so files interchange with the reference's."""
    return {k if k.startswith("module.") else f"module.{k}": v for k, v in sd.items()}


# Options that must equal the saved ones to resume: they change the model, the loss or the optimiser.
RESUME_CHECKED = ("arch", "small_input", "dilated", "mlp", "maps_mlp", "alpha", "optimizer")


def load_resume_state(path: Path, args) -> Optional[dict]:
    """exp_dir/model.pth if present; any problem is a UserError that leaves the file untouched."""
    return training.load_resume_state(path, "VICRegL training", ("epoch", "model", "optimizer"), args,
                                      RESUME_CHECKED, trusted=args.trust_checkpoint)


def restore(ckpt: dict, model: nn.Module, optimizer, scaler, path: Path) -> None:
    states = dict(ckpt, model={k[len("module."):] if k.startswith("module.") else k: v
                               for k, v in ckpt["model"].items()})
    training.restore(path, states, model=model, optimizer=optimizer)
    if scaler is not None and ckpt.get("scaler"):
        training.restore(path, states, scaler=scaler)


# ----------------------------------------------------------------------------- logging

def format_stats(epoch: int, step: int, lr: float, elapsed: float, logs: Dict[str, torch.Tensor]) -> dict:
    """One stats.txt line: ep, st, lr, t (elapsed seconds, 9 digits), then the metrics rounded
    (top-k percentages to 4 decimals, the rest to 6)."""
    stats = {training.EPOCH: epoch, training.STEP: step, training.LR: lr, training.TIME: f"{int(elapsed):09d}"}
    for k, v in logs.items():
        v = float(v)
        stats[k] = round(v, 4) if k.startswith("top") else round(v, 6)
    return stats


# ----------------------------------------------------------------------------- preemption

def check_pending(pending, current):
    """Check the previous step's loss (already computed by now), keep the current one for later."""
    if pending is not None:
        check_loss(*pending)
    return current


def check_loss(step: int, loss: torch.Tensor, logs: Dict[str, torch.Tensor]) -> None:
    training.check_finite(loss, step, logs, hint="lower --base-lr, or run without --fp16 to investigate")


# ----------------------------------------------------------------------------- loop

def to_device(batch, device, channels_last: bool = False):
    (views, locations), labels = batch
    nb = device.type == "cuda"  # pinned memory: the copies overlap with compute
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [v.to(device, non_blocking=nb, memory_format=fmt) for v in views]
    locations = [g.to(device, non_blocking=nb) for g in locations]
    return views, locations, labels.to(device, non_blocking=nb)


@dataclass
class Run:
    """The parts of one run that its steps, log lines and epoch ends use; fixed once built."""
    args: argparse.Namespace
    info: utils.DistInfo
    model: VICRegL  # whose weights are saved
    ddp: nn.Module  # what trains: ``model``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]  # float16 on CUDA only
    autocast: Callable  # () -> the mixed-precision context (nullcontext without --fp16)
    train_loader: torch.utils.data.DataLoader
    val_loader: Optional[torch.utils.data.DataLoader]  # --evaluate, --evaluate-only
    knn_loaders: Optional[List[torch.utils.data.DataLoader]]  # --knn: (bank, queries)
    logger: utils.JsonLogger
    ckpt_path: Path  # exp_dir/model.pth
    start: float  # time.time() at the start of the run: the ``t`` of stats.txt
    num_classes: int  # 0: no labels, so no online probe

    @property
    def main_proc(self) -> bool:
        return self.info.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


@dataclass
class LoopState:
    """What the loop carries from one step to the next."""
    last_log: float  # time.time() of the last stats.txt line
    progress: training.Progress  # images per second and time left
    pending: Optional[tuple] = None  # GPUs: (step, loss, logs) of the previous step, checked one step late
    skipped_before: int = 0  # this process's unreadable files counted up to the last epoch line


def train(args, stop_signals=(signal.SIGTERM, signal.SIGUSR1)) -> Optional[int]:
    """Pretrain as ``args`` says. Returns None when done, or the signal number that stopped the
    run after a checkpoint of the current step (the next run resumes from it)."""
    info = utils.init_distributed(args.device, args.dist_url, args.local_rank)
    check_args(args, info.world_size)
    utils.set_cpu_threads(info.device, args.num_workers, args.threads)
    if args.tensorboard:
        utils.require_tensorboard()  # a missing package fails now, not after building the data and model
    start = time.time()

    # data (before the model: a missing folder fails in a second, not after building a large net)
    train_set, train_loader = build_data(args, info, "train")
    val_loader = build_data(args, info, "val")[1] if (args.evaluate or args.evaluate_only) else None
    knn_loaders = build_knn_data(args, info) if args.knn else None
    num_classes = getattr(train_set, "num_classes", 0)
    ckpt_path = args.exp_dir / "model.pth"
    ckpt = load_resume_state(ckpt_path, args)  # a bad file fails here, before the model is built

    # model and optimiser
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes, info.device)
    if info.world_size > 1 and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, model, info.device)
    autocast, scaler = precision(args, info.device)

    # resume
    start_epoch, start_step = resume(ckpt, model, optimizer, scaler, ckpt_path)
    ddp = wrap_model(args, model, info)
    first_step = start_epoch * len(train_loader) + start_step  # TensorBoard's global step is `st`
    logger = open_logger(args, info, first_step)
    if info.rank == 0 and ckpt is not None:
        print(f"resuming from {ckpt_path}: epoch {start_epoch}, step {start_step} of that epoch", flush=True)
    run = Run(args, info, model, ddp, optimizer, scaler, autocast, train_loader, val_loader, knn_loaders, logger,
              ckpt_path, start, num_classes)
    if args.evaluate_only:
        return evaluate_saved(run, ckpt, start_epoch, first_step)

    # loop
    stop = training.StopSignal(stop_signals)
    schedule = training.Schedule(args, len(train_set), start, ckpt, stop.agree_clock)
    state = LoopState(last_log=time.time(),
                      progress=training.Progress(logger, schedule.total_steps, args.batch_size, first_step))
    steps_per_epoch = len(train_loader)
    for epoch in range(start_epoch, args.epochs):
        if epoch * steps_per_epoch >= schedule.total_steps:
            break
        ddp.train()
        skip = start_step if epoch == start_epoch else 0
        position = skip  # steps done in this epoch
        for i, batch in enumerate(datasets.epoch_iterator(train_loader, epoch, skip), start=skip):
            step = epoch * steps_per_epoch + i
            lr = schedule.learning_rate(step)
            if step >= schedule.total_steps:
                break
            last_step = i == steps_per_epoch - 1 or step + 1 == schedule.total_steps  # of the epoch or the run
            log_now = last_step or stop.agree(time.time() - state.last_log >= args.log_tensors_interval)
            loss, logs = train_step(run, state, batch, step, lr, metrics=log_now)
            if log_now:
                log_step(run, state, epoch, step, lr, logs, last_step)
            state.progress.show(step + 1, f"ep {epoch} step {i + 1}/{steps_per_epoch}", lambda: float(loss))
            position = i + 1
            if stop.requested(step, info.device):
                return stop_at_signal(run, state, stop.signum, epoch, position)
        if end_of_epoch(run, state, epoch, position, schedule.total_steps):
            break
    export_backbone(run)
    return None


def resume(ckpt: Optional[dict], model: nn.Module, optimizer, scaler, path: Path) -> Tuple[int, int]:
    """Load ``ckpt`` (model.pth as load_resume_state read it, or None) into the model, optimiser and
    scaler. Returns where it stopped: (epoch, steps done in that epoch); (0, 0) for a fresh run."""
    if ckpt is None:
        return 0, 0
    restore(ckpt, model, optimizer, scaler, path)
    return ckpt["epoch"], ckpt.get("step_in_epoch", 0)


def wrap_model(args, model: VICRegL, info: utils.DistInfo) -> nn.Module:
    """The module that trains: ``model`` itself in one process, in DistributedDataParallel with several;
    with --compile, the backbone's forward is compiled in place (after loading the weights: the
    compiled module shares the parameters)."""
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda"
                                               else None) if info.world_size > 1 else model)
    if args.compile:
        model.backbone.forward = torch.compile(model.backbone.forward, dynamic=False)  # one graph per crop size
    return ddp


def open_logger(args, info: utils.DistInfo, first_step: int) -> utils.JsonLogger:
    """Rank 0 creates --exp-dir. The logger of stats.txt (and TensorBoard), which drops the events that
    an interrupted run wrote at or past ``first_step``, this run's first global step."""
    if info.rank == 0:
        args.exp_dir.mkdir(parents=True, exist_ok=True)
    return utils.JsonLogger(args.exp_dir, info.rank == 0, args.tensorboard,
                            purge_step=None if args.evaluate_only else first_step)


def evaluate_saved(run: Run, ckpt: Optional[dict], epoch: int, first_step: int) -> None:
    """--evaluate-only: validate the restored model.pth (``ckpt``, saved in ``epoch``), logged at the
    global step before ``first_step``, the step it stopped at. A UserError when there is none."""
    if ckpt is None:
        raise UserError(f"--evaluate-only needs a trained model: {run.ckpt_path} does not exist")
    at = max(first_step - 1, 0)
    if run.val_loader is not None:
        run.logger.log({training.EPOCH: epoch, **validate(run.model, run.val_loader, run.info.device, run.autocast)},
                       training.VAL_PREFIX, step=at)
    if run.knn_loaders is not None:
        run.logger.log({training.EPOCH: epoch, **knn(run.args, run.model, run.knn_loaders, run.info.device)},
                       training.VAL_PREFIX, step=at)
    return None


def train_step(run: Run, state: LoopState, batch, step: int, lr: float,
               metrics: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One optimisation step at learning rate ``lr`` on ``batch`` (((views, grids), labels) from the
    loader): the model's randomness seeded for global step ``step`` (a resumed run replays it), forward
    under autocast (the logged terms only with ``metrics``), the loss checked, backward and update.
    Returns this process's (loss, logs)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    views, locations, labels = to_device(batch, run.info.device, run.args.channels_last)
    torch.manual_seed(training.step_seed(run.args.seed, run.info.rank, step))
    with run.autocast():
        loss, logs = run.ddp(views, locations, labels if run.num_classes else None, metrics=metrics)
    if run.info.device.type == "cpu":
        check_loss(step, loss.detach(), logs)  # free on CPU: before the update
    else:  # on GPUs, the previous step's loss: no host synchronisation in this step
        state.pending = check_pending(state.pending, (step, loss.detach(), logs))
    backward_and_update(run.optimizer, run.scaler, loss)
    return loss, logs


def backward_and_update(optimizer: torch.optim.Optimizer, scaler, loss: torch.Tensor) -> None:
    """Gradients of ``loss`` (scaled by ``scaler``, the float16 gradient scaler, when there is one) and
    one optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def log_step(run: Run, state: LoopState, epoch: int, step: int, lr: float, logs: Dict[str, torch.Tensor],
             last_step: bool) -> None:
    """The stats.txt line (and TensorBoard points, at global step ``step``) of ``logs`` averaged over
    the processes; at the ``last_step`` of an epoch or of the run, also the unreadable files skipped
    since the previous such line. Collectives: every process calls it at the same steps."""
    logs = {k: utils.all_reduce_mean(v) for k, v in logs.items()}
    stats = format_stats(epoch, step, lr, time.time() - run.start, logs)
    if last_step:
        stats.update(training.skipped_in_epoch(run.train_loader, state.skipped_before))
        state.skipped_before = datasets.skipped_images(run.train_loader)
    run.logger.log(stats, step=step, extra=state.progress.scalars(step + 1))
    state.last_log = time.time()


def stop_at_signal(run: Run, state: LoopState, signum: Optional[int], epoch: int, position: int) -> int:
    """A stop signal arrived: check the last loss, save model.pth after the ``position``-th step of
    ``epoch`` (the next run resumes with the step after it) and return ``signum`` (SIGTERM if unknown)."""
    check_pending(state.pending, None)
    save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.scaler, run.args, epoch, position, run.main_proc,
                    run.steps_per_epoch)
    if run.main_proc:
        print(f"\nsignal {signum}: checkpoint saved at epoch {epoch}, step {position}; exiting", flush=True)
    return signum or signal.SIGTERM


def end_of_epoch(run: Run, state: LoopState, epoch: int, position: int, total_steps: int) -> bool:
    """After ``position`` steps of ``epoch``: check the last loss, save model.pth every --checkpoint-freq
    epochs and at the end of the run, then the validations due. Returns whether the run ends here
    (``total_steps`` reached or the last epoch done)."""
    args, next_epoch = run.args, epoch + 1
    state.pending = check_pending(state.pending, None)  # never save weights that a bad step touched
    final = next_epoch == args.epochs or epoch * run.steps_per_epoch + position >= total_steps
    if next_epoch % args.checkpoint_freq == 0 or final:
        # a run that ends within an epoch (--max-steps, --time-budget) saves where it is
        at = (next_epoch, 0) if position == run.steps_per_epoch else (epoch, position)
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.scaler, args, *at, run.main_proc,
                        run.steps_per_epoch)
    evaluate_epoch(run, epoch, final)
    return final


def evaluate_epoch(run: Run, epoch: int, final: bool) -> None:
    """The validations due after ``epoch``, logged at its last global step: the online probe every
    --eval-freq epochs (--evaluate), k-NN every --eval-freq epochs and at the end (--knn)."""
    args, next_epoch = run.args, epoch + 1
    at = next_epoch * run.steps_per_epoch - 1
    if run.val_loader is not None and args.evaluate and next_epoch % args.eval_freq == 0:
        run.logger.log({training.EPOCH: epoch, **validate(run.model, run.val_loader, run.info.device, run.autocast)},
                       training.VAL_PREFIX, step=at)
    if run.knn_loaders is not None and (next_epoch % args.eval_freq == 0 or final):
        run.logger.log({training.EPOCH: epoch, **knn(args, run.model, run.knn_loaders, run.info.device)},
                       training.VAL_PREFIX, step=at)


def export_backbone(run: Run) -> None:
    """backbone.pth: the backbone's weights with plain keys (what hubconf.py and evaluate.py load with
    strict=True); rank 0 says where, and how long the run took."""
    training.save_state(run.args.exp_dir / "backbone.pth", run.model.backbone.state_dict, run.main_proc)
    if run.main_proc:
        if run.logger.tty:
            print()
        print(f"done: {run.args.exp_dir / 'backbone.pth'} ({utils.hms(time.time() - run.start)})", flush=True)


def save_checkpoint(path: Path, model, optimizer, scaler, args, epoch: int, step_in_epoch: int,
                    main_proc: bool, steps_per_epoch: int) -> None:
    """model.pth: reference keys (epoch, model with module., optimizer) plus scaler, step_in_epoch, steps
    (done in all, with this run's steps per epoch: the last one is not always in stats.txt), args."""
    training.save_state(path, lambda: dict(
        epoch=epoch, step_in_epoch=step_in_epoch, steps=epoch * steps_per_epoch + step_in_epoch,
        model=with_module_prefix(model.state_dict()),
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
        args=training.plain_args(args)), main_proc)


def knn(args, model: VICRegL, loaders, device) -> Dict[str, float]:
    """k-NN top-1/top-5 (%) of the backbone's frozen features."""
    res = knn_evaluate(model.backbone, loaders[0], loaders[1], device, args.knn_k, args.knn_temperature)
    return {"knn_top1": round(res["top1"], 4), "knn_top5": round(res["top5"], 4)}


@torch.no_grad()
def validate(model: VICRegL, loader, device, autocast) -> Dict[str, float]:
    """Online probe on the validation split's centre crops: mean loss, top-1 and top-5 (%)."""
    if not hasattr(model, "classifier"):
        raise UserError("--evaluate needs labels: this dataset has no classes")
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    for (val_view, _), labels in loader:
        val_view, labels = val_view.to(device), labels.to(device)
        with autocast():
            out = model.evaluate(val_view, labels)
        n = labels.shape[0]
        sums += torch.tensor([float(out["clsl_val"]) * n, float(out["top1_val"]) * n,
                              float(out["top5_val"]) * n, n], device=device, dtype=torch.float64)
    if utils.is_dist():
        dist.all_reduce(sums)
    model.train()
    n = max(float(sums[3]), 1.0)
    return {"clsl_val": round(float(sums[0]) / n, 6), "top1_val": round(float(sums[1]) / n, 4),
            "top5_val": round(float(sums[2]) / n, 4)}


@training.entry_point
def main(args: argparse.Namespace) -> None:
    resolve_args(args, os.environ.get("SLURM_JOB_ID"))
    train(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
