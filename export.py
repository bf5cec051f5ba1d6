"""Backbone weights as files for other libraries: Detectron2 (ResNets) and timm (ResNets, ConvNeXts).

    python export.py detectron2 --checkpoint exp/backbone.pth --out exp/vicregl_r50.pkl
    python export.py timm --checkpoint convnext_small_alpha0.75.pth --out exp/convnext_small_timm.pth

``--checkpoint`` takes every form that ``evaluate.py --pretrained`` takes: an exported backbone
(plain keys: our ``backbone.pth``, the published ``<arch>_alpha<a>.pth``), a pretraining checkpoint
(our ``model.pth``, the published ``_fullckpt.pth``) or a state dict wrapped under ``state_dict``, as a
path or URL. The architecture is recognised from the weights' names and shapes unless ``--arch``
names it, and the weights must fit it strictly.

* ``detectron2``: a pickle ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics":
  True}`` under Detectron2's ResNet names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``,
  ``res2.0.shortcut.weight`` ...), then the config lines that build the matching network.
* ``timm``: a ``torch.save``'d state dict of plain tensors under timm's names
  (``models/timm_convert.py``), checked by loading it strictly into the timm model when timm is
  installed, then the line that creates that model.

Files are written to a temporary file and renamed, so an interrupted export never leaves a partial file.
"""
import argparse
import copyreg
import os
import pickle
import re
from typing import IO, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import models
from models.checkpoints import (TRUST_FLAG, CheckpointError, extract_backbone_state_dict, guess_arch, misfit,
                                read_checkpoint)
from models.timm_convert import TIMM_ARCHS, timm_model_args, to_timm, to_timm_state_dict
from utils import UserError, exit_on_user_error, save_atomic

__all__ = ["detectron2_name", "to_detectron2", "detectron2_config", "write_atomic", "dump_detectron2",
           "get_args_parser", "main"]

# ----------------------------------------------------------------------------- Detectron2 names

_BN = r"(?P<p>weight|bias|running_mean|running_var)"
# (ours, Detectron2's) for the stem, then for the part of a block name after "layer<k>.<m>."
_STEM_NAMES = [(r"conv1\.weight", "stem.conv1.weight"), (rf"bn1\.{_BN}", "stem.conv1.norm.{p}")]
_BLOCK_NAMES = [(r"conv(?P<i>\d)\.weight", "conv{i}.weight"), (rf"bn(?P<i>\d)\.{_BN}", "conv{i}.norm.{p}"),
                (r"downsample\.0\.weight", "shortcut.weight"), (rf"downsample\.1\.{_BN}", "shortcut.norm.{p}")]
# Depths that Detectron2's build_resnet_backbone knows, with their blocks per stage.
_D2_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def detectron2_name(key: str) -> Optional[str]:
    """Our ResNet parameter name -> Detectron2's (``layer1.0.bn2.bias`` -> ``res2.0.conv2.norm.bias``);
    None for ``num_batches_tracked`` (Detectron2 keeps no such entry). Unknown names raise KeyError."""
    if key.endswith(".num_batches_tracked"):
        return None
    block = re.fullmatch(r"layer(?P<k>[1-4])\.(?P<m>\d+)\.(?P<rest>.+)", key)
    prefix, rest, rules = ((f"res{int(block['k']) + 1}.{block['m']}.", block["rest"], _BLOCK_NAMES) if block
                           else ("", key, _STEM_NAMES))
    for pattern, template in rules:
        found = re.fullmatch(pattern, rest)
        if found:
            return prefix + template.format(**found.groupdict())
    raise KeyError(key)


def to_detectron2(sd: Mapping[str, Tensor]) -> Dict[str, np.ndarray]:
    """Our ResNet state dict (plain keys) -> {Detectron2 name: float numpy array of the same shape}."""
    out, unknown = {}, []
    for key, value in sd.items():
        try:
            name = detectron2_name(key)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            value = value.detach().cpu()
            out[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bf16
    if unknown:
        raise CheckpointError(f"no Detectron2 name for {', '.join(unknown[:8])}")
    return out


def detectron2_config(d2: Mapping[str, np.ndarray], weights: str) -> List[str]:
    """Detectron2 config lines (YAML) that build the ResNet whose Detectron2 weights are ``d2``.

    Widths come from the shapes (wide ResNets scale the stem, res2 and the bottleneck width); the
    depth from the blocks per stage. Networks that build_resnet_backbone cannot make get a note."""
    from transforms import EVAL_STD, IMAGENET_MEAN, PRETRAIN_STD  # late: torchvision is slow to import
    blocks = [1 + max(int(k.split(".")[1]) for k in d2 if k.startswith(f"res{s}.")) for s in (2, 3, 4, 5)]
    bottleneck = "res2.0.conv3.weight" in d2
    depth = sum(blocks) * (3 if bottleneck else 2) + 2
    res2_out = d2[f"res2.0.conv{3 if bottleneck else 2}.weight"].shape[0]
    mean = ", ".join(f"{255 * m:.3f}".rstrip("0") for m in IMAGENET_MEAN)
    std = ", ".join(f"{255 * s:.3f}".rstrip("0") for s in EVAL_STD)
    lines = ["MODEL:", f'  WEIGHTS: "{os.path.abspath(weights)}"',
             f"  PIXEL_MEAN: [{mean}]",
             f"  PIXEL_STD: [{std}]  # pretraining used {PRETRAIN_STD[0]} for red: {255 * PRETRAIN_STD[0]:.2f}",
             "  RESNETS:", f"    DEPTH: {depth}",
             "    STRIDE_IN_1X1: False  # the stride is in the 3x3 convolution",
             '    NORM: "FrozenBN"  # or "SyncBN" to fine-tune the BatchNorm layers',
             f"    STEM_OUT_CHANNELS: {d2['stem.conv1.weight'].shape[0]}",
             f"    RES2_OUT_CHANNELS: {res2_out}"]
    if bottleneck:
        width = d2["res2.0.conv1.weight"].shape[0]  # Detectron2: NUM_GROUPS * WIDTH_PER_GROUP
        groups = width // d2["res2.0.conv2.weight"].shape[1]
        lines += [f"    NUM_GROUPS: {groups}", f"    WIDTH_PER_GROUP: {width // groups}"]
    lines += ["INPUT:", '  FORMAT: "RGB"']
    if _D2_DEPTHS.get(depth) != blocks or (not bottleneck and res2_out != 64):
        lines.append(f"# note: Detectron2's build_resnet_backbone cannot build this network ({blocks} "
                     f"{'bottleneck' if bottleneck else 'basic'} blocks, res2 {res2_out} channels): it knows depths "
                     f"{'/'.join(map(str, _D2_DEPTHS))}, 18 and 34 only 64 channels wide; register a backbone "
                     f"that builds these stages with ResNet.make_stage")
    return lines


# ----------------------------------------------------------------------------- writing files

def _reduce_array(a: np.ndarray):
    # NumPy 2 pickles arrays through numpy._core, which NumPy 1.x (common next to Detectron2) cannot
    # import; the public ndarray constructor over a bytearray reads back under every NumPy version.
    a = np.ascontiguousarray(a)
    return np.ndarray, (a.shape, a.dtype.str, bytearray(a.tobytes()))


class _PortablePickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, np.ndarray: _reduce_array}


def dump_detectron2(obj, f: IO[bytes]) -> None:
    """Pickle ``obj`` (dicts, strings, numpy arrays) so that any NumPy version reads it back."""
    _PortablePickler(f, protocol=4).dump(obj)


def write_atomic(path: str, dump: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``dump(f)`` into a new temporary file next to ``path``, then rename it over
    ``path`` (parent folders are created): an error or a crash never leaves a partial file, and a
    failed write (full disk, read-only folder) is a UserError naming the file and the cause."""
    save_atomic(dump, path, write=lambda dump, f: dump(f), resumable=False)


# ----------------------------------------------------------------------------- reading weights

def _read_weights(path: str, trusted: bool) -> Dict[str, Tensor]:
    try:
        return extract_backbone_state_dict(read_checkpoint(path, trusted=trusted), path)
    except CheckpointError as e:
        raise UserError(" ".join(str(e).split())) from None


def _check_arch_name(arch: Optional[str]) -> Optional[str]:
    """The family of --arch ('resnet' / 'convnext'), None without --arch; unknown names are refused."""
    if arch is None:
        return None
    try:
        return models.backbone_family(arch)
    except ValueError as e:
        raise UserError(str(e)) from None


def _is_small_input(sd: Mapping[str, Tensor]) -> bool:
    conv1 = sd.get("conv1.weight")
    return conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 3  # 3x3 stem instead of 7x7


def _resolve_arch(sd: Mapping[str, Tensor], arch: Optional[str]) -> str:
    """--arch, or the architecture recognised from the weights; the weights must fit it strictly."""
    guess = guess_arch(sd)
    arch = arch or guess
    if arch is None:
        raise UserError("cannot recognise the architecture of the --checkpoint weights: pass --arch "
                        f"(one of: {', '.join(models.available_archs())})")
    with torch.device("meta"):  # shapes only, nothing allocated
        net, _ = models.build_backbone(arch)
    lines = misfit(net.state_dict(), sd)
    if lines:
        hint = f"; the file looks like a {guess} checkpoint: pass --arch {guess}" if guess and guess != arch else ""
        raise UserError(f"the --checkpoint weights do not fit --arch {arch}: "
                        f"{'; '.join(line.strip() for line in lines)}{hint}")
    return arch


# ----------------------------------------------------------------------------- subcommands

def run_detectron2(args: argparse.Namespace) -> None:
    family = _check_arch_name(args.arch)
    if not args.out.endswith(".pkl"):
        raise UserError(f"--out {args.out} must end with .pkl (Detectron2 reads only .pkl files as pickles)")
    sd = _read_weights(args.checkpoint, args.trust_checkpoint)
    if family == "convnext" or "downsample_layers.0.0.weight" in sd:
        raise UserError("Detectron2 has no ConvNeXt backbone: export ConvNeXt weights with 'export.py timm' "
                        "and use them through a timm-based backbone")
    if _is_small_input(sd):
        raise UserError("these weights are of a small-input ResNet (3x3 stride-1 stem, no max-pool, "
                        "--small-input), which Detectron2's ResNet stem cannot express")
    arch = _resolve_arch(sd, args.arch)
    d2 = to_detectron2(sd)
    blob = {"model": d2, "__author__": f"VICRegL export.py ({arch})",
            # Detectron2 matches these bare names (stem.*, res2.* ...) to its own prefixed ones
            # (backbone.bottom_up.res2.* ...) only with its name-matching heuristics.
            "matching_heuristics": True}
    write_atomic(args.out, lambda f: dump_detectron2(blob, f))
    print(f"wrote {len(d2)} tensors ({arch}, Detectron2 names) to {args.out}")
    print("Detectron2 config for these weights:")
    print("\n".join(detectron2_config(d2, args.out)))


def run_timm(args: argparse.Namespace) -> None:
    _check_arch_name(args.arch)
    sd = _read_weights(args.checkpoint, args.trust_checkpoint)
    if _is_small_input(sd):
        raise UserError("these weights are of a small-input ResNet (3x3 stride-1 stem, no max-pool, "
                        "--small-input), which timm's ResNet stem cannot express")
    arch = _resolve_arch(sd, args.arch)
    if arch not in TIMM_ARCHS:
        raise UserError(f"--arch {arch} has no timm counterpart (timm's ResNet stem is always 64 channels "
                        f"wide); convertible: {', '.join(TIMM_ARCHS)}")
    try:
        converted = {k: v.detach().cpu().contiguous() for k, v in to_timm_state_dict(sd, arch).items()}
        checked = _check_with_timm(sd, arch)
    except (CheckpointError, ValueError) as e:
        raise UserError(" ".join(str(e).split())) from None
    write_atomic(args.out, lambda f: torch.save(converted, f))
    name, kwargs = timm_model_args(arch, sd)
    print(f"wrote {len(converted)} tensors ({arch} as timm {name}) to {args.out}"
          + ("" if checked else " (timm is not installed: not checked against the timm model)"))
    print("load it with:\n" + _timm_loader_code(name, kwargs, args.out))


def _check_with_timm(sd: Mapping[str, Tensor], arch: str) -> bool:
    """Load the weights strictly into the timm model (raises when they do not fit); False without timm."""
    try:
        import timm  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    to_timm(sd, arch)
    return True


def _timm_loader_code(name: str, kwargs: dict, path: str) -> str:
    args = "".join(f", {k}={v!r}" for k, v in {"num_classes": 0, **kwargs}.items())
    # timm.create_model drops arguments that are None (ls_init_value=None: no layer scale)
    create = (f"timm.model_entrypoint({name!r})(pretrained=False{args})" if None in kwargs.values()
              else f"timm.create_model({name!r}, pretrained=False{args})")
    return (f"  import timm, torch\n  model = {create}\n"
            f"  model.load_state_dict(torch.load({path!r}, weights_only=True))")


# ----------------------------------------------------------------------------- command line

def _add_common(p: argparse.ArgumentParser, arch_help: str) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="backbone weights: an exported backbone (backbone.pth, the published <arch>_alpha<a>.pth), "
                        "a pretraining checkpoint (model.pth, _fullckpt.pth) or a wrapped state dict; path or URL")
    p.add_argument("--out", required=True, help="file to write (parent folders are created)")
    p.add_argument("--arch", default=None, help=arch_help)
    p.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true",
                   help="unpickle a --checkpoint that holds Python objects in full (only for files you trust: "
                        "such a file can run code)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write VICRegL backbone weights as a Detectron2 or a timm file.",
        epilog="Run 'python export.py SUBCOMMAND --help' for each subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="{detectron2,timm}", required=True)
    d = sub.add_parser("detectron2", help="ResNet weights as a Detectron2 .pkl, and the config lines to use it",
                       description="ResNet weights under Detectron2's names, as a .pkl for MODEL.WEIGHTS; prints "
                                   "the config lines that build the matching network.")
    _add_common(d, "ResNet architecture (resnet50, resnet50x2 ...); recognised from the weights when omitted")
    t = sub.add_parser("timm", help="ResNet or ConvNeXt weights as a timm state dict",
                       description="Weights under timm's names (resnet*, convnext_*), saved with torch.save; "
                                   "prints how to create the timm model that loads them strictly.")
    _add_common(t, f"architecture, one of {', '.join(TIMM_ARCHS)}; recognised from the weights when omitted")
    return parser


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    {"detectron2": run_detectron2, "timm": run_timm}[args.command](args)


if __name__ == "__main__":
    main()
