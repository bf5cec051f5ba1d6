"""Images per second of a full VICRegL training step (forward, losses, backward, optimiser step).

    python bench/train_step.py                       # GPU: resnet50 and convnext_small, 2x224 + 6x96, B 64, fp16
    python bench/train_step.py --device cpu          # CPU: tiny shapes (see --arch / --crops defaults below)

Compares, in one process and on the same random batch:
- plain: the textbook losses (D x D covariances, Python loops over pairs and slots, see
  bench/losses.py), one-parameter-at-a-time optimiser, no other option: what a direct port does;
- ours: the losses of models/losses.py, multi-tensor/fused optimiser, channels-last, grouped
  views for backbones without BatchNorm, and torch.compile with --compile.
Data loading is left out (random tensors already on the device).

    python bench/train_step.py --reference /path/to/VICRegL --device cpu --fp16 0   # CPU: resnet50, 96x2,64x2, B 8

With --reference DIR (a checkout of github.com/facebookresearch/VICRegL) the baseline is the original
implementation instead: bench/reference_step.py runs it in a separate process (its modules have the
same names as ours), on the same device, with our model's initial weights and the same inputs, and
times forward + backward + AdamW step the same way. Both sides run without DistributedDataParallel and
without stochastic depth; the original also computes its logged statistics in every step, as it did.
The first step's losses of both are printed beside the speeds (relative difference): they must agree.
"""
import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import models.vicregl as vicregl  # noqa: E402
import utils  # noqa: E402
from bench.losses import plain_global, plain_local  # noqa: E402
from models.vicregl import VICRegL, VICRegLConfig  # noqa: E402

GPU_DEFAULTS = dict(archs=["resnet50", "convnext_small"], crops="224x2,96x6", batch=64, mlp="8192-8192-8192",
                    maps_mlp="512-512-512")
# Tiny nets with the paper's map geometry (7x7 and 3x3): small-input resnet_test at 56/24 px, convnext_test
# at 224/96 px; narrower expanders so that the plain formulation fits in a laptop's memory.
CPU_DEFAULTS = dict(archs=["resnet_test", "convnext_test"], crops={"resnet_test": "56x2,24x6"}, batch=32,
                    mlp="1024-1024-1024", maps_mlp="128-128-128")
CPU_CROPS = "224x2,96x6"
# The original has neither the test nets nor the small-input stem: its smallest ResNet at small crops.
REFERENCE_CPU_DEFAULTS = dict(archs=["resnet50"], crops="96x2,64x2", batch=8)
LR, WEIGHT_DECAY, NUM_CLASSES = 1e-4, 0.05, 1000
# First-step losses of ours and the original (relative): float32 differs only by summation order
# (a float64 run agrees to about 1e-8); bfloat16 / float16 rounding can also flip a nearest-neighbour match.
LOSS_RTOL = {0: 1e-4, 1: 1e-2}
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_step.py")


def parse_crops(text):
    sizes = []
    for part in text.split(","):
        size, count = part.split("x")
        sizes += [int(size)] * int(count)
    return sizes


def batch(arch, sizes, b, device, small_input):
    views = [torch.randn(b, 3, s, s, device=device) for s in sizes]
    locs = []
    for s in sizes:
        n = models.map_size(arch, s, small_input=small_input)
        locs.append(torch.rand(b, n, n, 2, device=device) * s)
    return views, locs, torch.randint(0, 1000, (b,), device=device)


def step_time(arch, args, plain: bool, device, save=None):
    """Seconds per training step and the first step's loss; ``save``: a path where the initial weights,
    inputs and settings are written for bench/reference_step.py."""
    torch.manual_seed(0)
    sizes = parse_crops(args.crops if isinstance(args.crops, str) else args.crops.get(arch, CPU_CROPS))
    small = args.small_input and models.backbone_family(arch) == "resnet"
    positions = sorted({models.map_size(arch, s, small_input=small) ** 2 for s in sizes})
    num_matches = (min(20, positions[-1]), min(4, positions[0]))
    cfg = VICRegLConfig(arch=arch, mlp=args.mlp, maps_mlp=args.maps_mlp, num_classes=NUM_CLASSES,
                        num_matches=num_matches, backbone_kwargs=models.backbone_kwargs(arch, small_input=small))
    model = VICRegL(cfg).to(device)
    if plain:
        vicregl.global_loss, vicregl.local_loss = (lambda e, *a: plain_global(e, *a)), \
            (lambda m, l, nm, *_: plain_local(m, l, nm))
        model.__class__ = type("PlainVICRegL", (VICRegL,), {"has_batchnorm": True})  # one view at a time
    else:
        vicregl.global_loss, vicregl.local_loss = GLOBAL, LOCAL
        if device.type == "cuda" or args.channels_last:
            model.backbone.to(memory_format=torch.channels_last)
        if args.compile:
            model.backbone.forward = torch.compile(model.backbone.forward, dynamic=False)
    groups = utils.param_groups_weight_decay(model.named_parameters(), WEIGHT_DECAY)
    fused = not plain and device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=LR, fused=fused or None, foreach=None if fused else not plain)
    scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" else None
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    views, locs, labels = batch(arch, sizes, args.batch, device, small)
    if save is not None:
        save_inputs(save, model, (views, locs, labels), cfg, args, device)
    if not plain and (device.type == "cuda" or args.channels_last):
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    first = []

    def one_step():
        with torch.autocast(device.type, dtype=dtype, enabled=bool(args.fp16)):
            loss, _ = model(views, locs, labels)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if not first:
            first.append(loss.detach())  # read after the timing: no host sync inside it

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps, float(first[0])


def save_inputs(path, model, inputs, cfg, args, device):
    """Write what bench/reference_step.py needs as plain tensors and numbers (it loads with
    weights_only=True): state dict, views (B, 3, s, s), locations (B, N, N, 2), labels (B,), settings."""
    views, locs, labels = inputs

    def cpu(t):
        return t.detach().cpu().contiguous()

    torch.save({
        "state_dict": {k: cpu(v) for k, v in model.state_dict().items()},
        "views": [cpu(v) for v in views], "locations": [cpu(loc) for loc in locs], "labels": cpu(labels),
        "config": dict(arch=cfg.arch, mlp=cfg.mlp, maps_mlp=cfg.maps_mlp, alpha=cfg.alpha,
                       num_matches=list(cfg.num_matches), num_classes=cfg.num_classes, lr=LR,
                       weight_decay=WEIGHT_DECAY, device=str(device), fp16=int(bool(args.fp16)),
                       steps=args.steps, warmup=args.warmup),
    }, path)


def _top_level(path):
    """Names of the classes and functions defined at the top of a Python file, {name: ast node}."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    return {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


def check_reference(directory, archs):
    """UserError unless ``directory`` holds the original implementation with every arch in ``archs``.

    The files are parsed, not imported: nothing of the checkout runs in this process.
    """
    flag = f"--reference {directory}"
    main_file = os.path.join(directory, "main_vicregl.py")
    if not os.path.isdir(directory):
        raise utils.UserError(f"{flag}: no such directory (give a checkout of github.com/facebookresearch/VICRegL)")
    if not os.path.isfile(main_file):
        raise utils.UserError(f"{flag}: no main_vicregl.py there; "
                              "not a checkout of github.com/facebookresearch/VICRegL")
    try:
        found = _top_level(main_file)
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise utils.UserError(f"{flag}: cannot read main_vicregl.py ({type(e).__name__}); "
                              "is this a checkout of github.com/facebookresearch/VICRegL?") from None
    methods = {n.name for n in ast.walk(found["VICRegL"]) if isinstance(n, ast.FunctionDef)} \
        if isinstance(found.get("VICRegL"), ast.ClassDef) else set()
    if "get_arguments" not in found or not {"global_loss", "local_loss"} <= methods:
        raise utils.UserError(f"{flag}: main_vicregl.py has no get_arguments() and VICRegL class with "
                              "global_loss/local_loss; not the original implementation")
    for arch in archs:
        family = "convnext" if "convnext" in arch else "resnet"  # how the original picks the module
        path = os.path.join(directory, f"{family}.py")
        known = sorted(n for n in _top_level(path) if n.startswith(family)) if os.path.isfile(path) else []
        if arch not in known:
            raise utils.UserError(f"--arch {arch}: not in the original implementation's {family}.py "
                                  f"(it has: {', '.join(known) or 'nothing'})")


def original_time(directory, path):
    """Run bench/reference_step.py on the inputs at ``path`` -> (seconds per step, first loss)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, RUNNER, os.path.abspath(directory), path], capture_output=True,
                          text=True, cwd=os.path.dirname(path), env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "error" in result or "seconds" not in result:
        detail = result.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise utils.UserError(f"--reference {directory}: the original implementation failed: {detail}")
    return result["seconds"], result["first_loss"]


def compare_with_original(arch, args, device):
    """Ours, then the original on the same weights and inputs -> (ours s, original s, ours loss, original loss)."""
    with tempfile.TemporaryDirectory(prefix="vicregl-bench-") as tmp:
        path = os.path.join(tmp, "inputs.pt")
        t_ours, loss_ours = step_time(arch, args, False, device, save=path)
        t_orig, loss_orig = original_time(args.reference, path)
    return t_ours, t_orig, loss_ours, loss_orig


GLOBAL, LOCAL = vicregl.global_loss, vicregl.local_loss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--arch", nargs="+", default=None, help="architectures (default: see the docstring)")
    p.add_argument("--crops", default=None, help="crop sizes and counts, e.g. 224x2,96x6 (default: see above)")
    p.add_argument("--batch", type=int, default=None, help="batch per process")
    p.add_argument("--mlp", default=None, help="global expander")
    p.add_argument("--maps-mlp", default=None, help="local expander")
    p.add_argument("--fp16", type=int, default=1, help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--small-input", type=int, default=None,
                   help="small-input ResNet stem (default: 1 with the CPU defaults, 0 on a GPU or with --reference)")
    p.add_argument("--channels-last", action="store_true", help="also on CPU (always on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone in 'ours'")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of github.com/facebookresearch/VICRegL: time the original implementation "
                        "instead of the plain formulation (same device, weights and inputs)")
    return p.parse_args()


def apply_defaults(args, device):
    """Fill the flags left unset from the GPU, CPU or --reference CPU defaults."""
    defaults = dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
    if args.reference and device.type != "cuda":
        defaults.update(REFERENCE_CPU_DEFAULTS)
    args.arch = args.arch or defaults["archs"]
    args.crops = args.crops or defaults["crops"]
    args.batch = args.batch or defaults["batch"]
    if args.small_input is None:
        args.small_input = int(device.type != "cuda" and not args.reference)
    if args.reference and args.small_input:
        raise utils.UserError("--small-input 1: the original implementation has no small-input stem; "
                              "drop it with --reference")
    args.mlp = args.mlp or defaults["mlp"]
    args.maps_mlp = args.maps_mlp or defaults["maps_mlp"]
    if args.steps < 1 or args.warmup < 0:
        raise utils.UserError("--steps must be at least 1 and --warmup at least 0")


def rate(images_per_s):
    """One decimal, two below 10 img/s (a CPU running ResNet-50)."""
    return f"{images_per_s:.1f}" if images_per_s >= 10 else f"{images_per_s:.2f}"


def print_reference_rows(args, device):
    print(f"{'arch':16s}{'original img/s':>16s}{'ours img/s':>14s}{'ours/original':>15s}{'loss rel. diff':>16s}")
    for arch in args.arch:
        t_ours, t_orig, loss_ours, loss_orig = compare_with_original(arch, args, device)
        rel = abs(loss_ours - loss_orig) / max(abs(loss_orig), 1e-12)
        print(f"{arch:16s}{rate(args.batch / t_orig):>16s}{rate(args.batch / t_ours):>14s}{t_orig / t_ours:14.2f}x"
              f"{rel:16.1e}", flush=True)
        if not rel <= LOSS_RTOL[int(bool(args.fp16))]:
            raise utils.UserError(f"{arch}: the first-step losses differ (ours {loss_ours:.6g}, original "
                                  f"{loss_orig:.6g}): the two did not compute the same step")


def print_plain_rows(args, device):
    print(f"{'arch':16s}{'plain img/s':>14s}{'ours img/s':>14s}{'ours/plain':>12s}")
    for arch in args.arch:
        t_plain, _ = step_time(arch, args, True, device)
        t_ours, _ = step_time(arch, args, False, device)
        print(f"{arch:16s}{args.batch / t_plain:14.1f}{args.batch / t_ours:14.1f}{t_plain / t_ours:11.2f}x",
              flush=True)


@utils.exit_on_user_error
def main():
    args = parse_args()
    try:
        device = utils.resolve_device(args.device)
        apply_defaults(args, device)
        for arch in args.arch:
            models.backbone_family(arch)
    except ValueError as e:
        raise utils.UserError(str(e)) from None
    if args.reference:
        check_reference(args.reference, args.arch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; crops {args.crops}, batch {args.batch}, mlp {args.mlp}, maps-mlp {args.maps_mlp}, "
          f"fp16 {bool(args.fp16)}, compile {args.compile}", flush=True)
    (print_reference_rows if args.reference else print_plain_rows)(args, device)


if __name__ == "__main__":
    main()
