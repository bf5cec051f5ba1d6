"""Images per second of a full VICRegL training step (forward, losses, backward, optimiser step).

    python bench/train_step.py                       # GPU: resnet50 and convnext_small, 2x224 + 6x96, B 64, fp16
    python bench/train_step.py --device cpu          # CPU: tiny shapes (see --arch / --crops defaults below)

Compares, in one process and on the same random batch:
- plain: the textbook losses (D x D covariances, Python loops over pairs and slots, see
  bench/losses.py), one-parameter-at-a-time optimiser, no other option: what a direct port does;
- ours: the losses of models/losses.py, multi-tensor/fused optimiser, channels-last, grouped
  views for backbones without BatchNorm, and torch.compile with --compile.
Data loading is left out (random tensors already on the device).
"""
import argparse
import os
import sys
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


def step_time(arch, args, plain: bool, device):
    torch.manual_seed(0)
    sizes = parse_crops(args.crops if isinstance(args.crops, str) else args.crops.get(arch, CPU_CROPS))
    small = args.small_input and models.backbone_family(arch) == "resnet"
    positions = sorted({models.map_size(arch, s, small_input=small) ** 2 for s in sizes})
    num_matches = (min(20, positions[-1]), min(4, positions[0]))
    cfg = VICRegLConfig(arch=arch, mlp=args.mlp, maps_mlp=args.maps_mlp, num_classes=1000, num_matches=num_matches,
                        backbone_kwargs=models.backbone_kwargs(arch, small_input=small))
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
    groups = utils.param_groups_weight_decay(model.named_parameters(), 0.05)
    fused = not plain and device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=fused or None, foreach=None if fused else not plain)
    scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" else None
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    views, locs, labels = batch(arch, sizes, args.batch, device, small)
    if not plain and (device.type == "cuda" or args.channels_last):
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]

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

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


GLOBAL, LOCAL = vicregl.global_loss, vicregl.local_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--arch", nargs="+", default=None, help="architectures (default: see the docstring)")
    p.add_argument("--crops", default=None, help="crop sizes and counts, e.g. 224x2,96x6 (default: see above)")
    p.add_argument("--batch", type=int, default=None, help="batch per process")
    p.add_argument("--mlp", default=None, help="global expander")
    p.add_argument("--maps-mlp", default=None, help="local expander")
    p.add_argument("--fp16", type=int, default=1, help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--small-input", type=int, default=None,
                   help="small-input ResNet stem (default: 1 with the CPU defaults, 0 on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="also on CPU (always on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone in 'ours'")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = p.parse_args()
    device = utils.resolve_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    args.arch = args.arch or defaults["archs"]
    args.crops = args.crops or defaults["crops"]
    args.batch = args.batch or defaults["batch"]
    if args.small_input is None:
        args.small_input = int(device.type != "cuda")
    args.mlp = args.mlp or defaults["mlp"]
    args.maps_mlp = args.maps_mlp or defaults["maps_mlp"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; crops {args.crops}, batch {args.batch}, mlp {args.mlp}, maps-mlp {args.maps_mlp}, "
          f"fp16 {bool(args.fp16)}, compile {args.compile}", flush=True)
    print(f"{'arch':16s}{'plain img/s':>14s}{'ours img/s':>14s}{'ours/plain':>12s}")
    for arch in args.arch:
        t_plain = step_time(arch, args, True, device)
        t_ours = step_time(arch, args, False, device)
        print(f"{arch:16s}{args.batch / t_plain:14.1f}{args.batch / t_ours:14.1f}{t_plain / t_ours:11.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
