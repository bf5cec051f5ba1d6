"""Time the original VICRegL implementation's training step (run by `bench/train_step.py --reference`).

    python bench/reference_step.py ORIGINAL_DIR INPUTS.pt

ORIGINAL_DIR is a checkout of github.com/facebookresearch/VICRegL. INPUTS.pt is written by
train_step.py and holds plain tensors and numbers only: our model's state dict, the views (B, 3, s, s),
the location grids (B, N, N, 2), the labels (B,) and the settings (arch, expanders, steps, device).
The original's model is built from its own argument parser, loaded with those weights and trained on
those inputs: forward, backward and AdamW step, as in its training loop.

Nothing of the checkout is edited or patched: the model, losses and optimiser never call .cuda()
(only its main() and make_inputs() do, and neither is used), and the process group it expects is
given as a one-process group (gloo on the CPU, nccl on CUDA). As on our side: no DistributedDataParallel
or SyncBatchNorm (a no-op in one process), no stochastic depth, cudnn.benchmark left off.

Prints one JSON line on stdout: {"seconds": per timed step, "first_loss": loss of the first step},
or {"error": "..."} (exit status 1). Nothing here imports our project: the original's modules
(utils, transforms, main_vicregl, ...) have the same names as ours.
"""
import json
import os
import socket
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def isolate(original: str) -> None:
    """Put the checkout first on the import path and drop this folder and our project root from it."""
    ours = {HERE, os.path.dirname(HERE)}
    sys.path[:] = [original] + [p for p in sys.path if os.path.abspath(p or os.curdir) not in ours]


def init_group(device) -> None:
    """A one-process group: the original gathers embeddings over processes in every loss term."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)


def build_original(cfg: dict, state_dict: dict, exp_dir: str):
    """The original's VICRegL and AdamW from its own parser and factories -> (model, optimizer)."""
    import main_vicregl  # the checkout's, thanks to isolate()
    from optimizers import build_optimizer
    argv = ["--exp-dir", exp_dir, "--arch", cfg["arch"], "--mlp", cfg["mlp"], "--maps-mlp", cfg["maps_mlp"],
            "--alpha", str(cfg["alpha"]), "--num_matches", *[str(n) for n in cfg["num_matches"]],
            "--optimizer", "adamw", "--weight-decay", str(cfg["weight_decay"]),
            # our backbones are built without stochastic depth; the same computation needs the same here
            "--drop-path-rate", "0"]
    args = main_vicregl.get_arguments().parse_args(argv)
    args.num_classes = cfg["num_classes"]  # the original set this while building its dataset
    model = main_vicregl.VICRegL(args).to(cfg["device"])
    model.load_state_dict(state_dict, strict=True)
    optimizer = build_optimizer(args, model)
    for group in optimizer.param_groups:  # its loop writes the scheduled lr into every group each step
        group["lr"] = cfg["lr"]
    return model, optimizer


def time_steps(model, optimizer, inputs: dict, cfg: dict):
    """Warm up, then time cfg['steps'] training steps -> (seconds per step, first step's loss)."""
    device = torch.device(cfg["device"])
    fp16 = bool(cfg["fp16"])
    # the same precision as our side of the comparison (the original only knew float16 on CUDA)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if fp16 and device.type == "cuda" else None
    first = []

    def one_step():
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=fp16):
            loss, _ = model(inputs)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if not first:
            first.append(loss.detach())

    for _ in range(cfg["warmup"]):
        one_step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        one_step()
    sync()
    return (time.perf_counter() - start) / cfg["steps"], float(first[0])


def run(original: str, path: str) -> dict:
    """Load INPUTS.pt, build and time the original -> {"seconds", "first_loss"}."""
    payload = torch.load(path, weights_only=True)  # plain tensors and numbers, written by train_step.py
    cfg = payload["config"]
    device = torch.device(cfg["device"])
    init_group(device)
    try:
        model, optimizer = build_original(cfg, payload["state_dict"], os.path.dirname(path))
        inputs = dict(views=[v.to(device) for v in payload["views"]],
                      locations=[loc.to(device) for loc in payload["locations"]],
                      labels=payload["labels"].to(device))
        seconds, loss = time_steps(model, optimizer, inputs, cfg)
    finally:
        torch.distributed.destroy_process_group()
    return {"seconds": seconds, "first_loss": loss}


def main() -> int:
    original, path = sys.argv[1:3]
    isolate(os.path.abspath(original))
    try:
        result = run(original, path)
    except Exception as e:  # the parent prints this one line; the traceback stays on stderr
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".strip().splitlines()[0]}
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
