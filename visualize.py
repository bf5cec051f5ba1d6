"""Pictures of what a VICRegL backbone learned and how its training went, as PNG files.

    python visualize.py features --checkpoint exp/backbone.pth --image photo.jpg
    python visualize.py matches  --hub convnext_small_alpha0p75 --image photo.jpg
    python visualize.py curves   exp/stats.txt other_exp/

* ``features``: the first three principal components of the dense features of one or more images,
  as RGB, next to each image (one row per image).
* ``matches``: two random crops of one image with the location matches (nearest cell centres in
  image coordinates, as the local loss pairs them) and the feature-space matches (nearest
  neighbours between the two crops' feature maps) drawn between them.
* ``curves``: every loss term and the online probe's accuracy against the step, from one or more
  ``stats.txt`` files written by ``main_vicregl.py``.

The backbone comes from a checkpoint (``--checkpoint``: an exported backbone.pth, a training
model.pth or a published file; the architecture is read from model.pth's arguments or recognised
from the weights' shapes), from a hub entry point (``--hub``, with ``--weights`` to load a local
file instead of downloading) or is randomly initialised (``--random``, a baseline to compare with).
``features`` and ``matches`` are drawn with Pillow and numpy; ``curves`` with matplotlib, which only
that subcommand needs (``pip install matplotlib``). The pictures themselves are drawn by the package
``pictures/`` (``pictures.features``, ``pictures.matches``, ``pictures.curves``), whose ``render_*``
functions return ``PIL.Image`` objects for use from other code, ``curves_figure`` the matplotlib Figure;
this script parses the command line and loads the backbones and images.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import nn

import models
from models.checkpoints import CheckpointError, load_backbone as load_checkpoint_backbone
from pictures.curves import CURVES_DPI, DEFAULT_KEYS, _matplotlib, _stats_path, read_stats, render_curves
from pictures.features import render_features
from pictures.matches import compute_matches, render_matches
from utils import UserError, add_trust_argument, exit_on_user_error, resolve_device

__all__ = ["LoadedBackbone", "load_backbone", "load_images", "main"]

# ----------------------------------------------------------------------------- backbones


@dataclass
class LoadedBackbone:
    backbone: nn.Module  # in eval mode
    arch: str
    small_input: bool
    source: str  # a short description for titles: "random", a path, a hub entry point


def _check_arch(arch: str, small_input: Optional[bool]) -> None:
    try:
        family = models.backbone_family(arch)
    except ValueError as e:
        raise UserError(str(e)) from None
    if small_input and family != "resnet":
        raise UserError("--small-input applies to ResNet backbones only")


def _load_hub(name: str, weights: Optional[str], random_init: bool, trusted: bool) -> LoadedBackbone:
    import hubconf
    if name not in hubconf.__all__:
        raise UserError(f"unknown --hub entry point {name!r}; choose one of: {', '.join(hubconf.__all__)}")
    arch = name.rsplit("_alpha", 1)[0]
    try:
        if random_init:
            backbone = getattr(hubconf, name)(pretrained=False)
        elif weights is not None:
            backbone = getattr(hubconf, name)(weights=weights, trust_checkpoint=trusted)
        else:
            backbone = getattr(hubconf, name)(pretrained=True, trust_checkpoint=trusted)
    except CheckpointError as e:
        hint = "" if weights else "\n  (offline? download the file elsewhere and pass it with --weights)"
        raise UserError(f"{e}{hint}") from None
    source = f"hub {name}" + (" (random init)" if random_init else f" ({weights})" if weights else "")
    return LoadedBackbone(backbone.eval(), arch, False, source)


def load_backbone(checkpoint: Optional[str] = None, *, hub: Optional[str] = None, weights: Optional[str] = None,
                  random_init: bool = False, arch: Optional[str] = None, small_input: Optional[bool] = None,
                  seed: int = 0, trusted: bool = False) -> LoadedBackbone:
    """A backbone in eval mode from exactly one source.

    checkpoint: backbone.pth / model.pth / a published file or URL; ``arch`` and ``small_input``
    default to model.pth's saved arguments, else to what the weights' shapes tell.
    hub: a ``hubconf`` entry point name, with ``weights`` (a local file) instead of the download,
    or ``random_init``. random_init alone: ``build_backbone(arch)`` seeded with ``seed``.
    ``trusted``: unpickle files that hold Python objects (--trust-checkpoint). Mistakes raise UserError.
    """
    if sum([checkpoint is not None, hub is not None, random_init and hub is None]) != 1:
        raise UserError("choose one backbone source: --checkpoint PATH, --hub NAME or --random --arch NAME")
    if weights is not None and hub is None:
        raise UserError("--weights goes with --hub (use --checkpoint PATH for a file on its own)")
    torch.manual_seed(seed)
    if checkpoint is not None:
        if arch is not None:
            _check_arch(arch, small_input)
        try:
            backbone, arch, small_input = load_checkpoint_backbone(checkpoint, arch, small_input, trusted=trusted)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return LoadedBackbone(backbone.eval(), arch, small_input, str(checkpoint))
    if hub is not None:
        if arch is not None or small_input:
            raise UserError("--hub implies the architecture: drop --arch / --small-input")
        if weights is not None and random_init:
            raise UserError("--weights and --random contradict each other")
        return _load_hub(hub, weights, random_init, trusted)
    if arch is None:
        raise UserError("--random needs --arch")
    _check_arch(arch, small_input)
    backbone, _ = models.build_backbone(arch, **({"small_input": True} if small_input else {}))
    return LoadedBackbone(backbone.eval(), arch, bool(small_input), "random init")


# ----------------------------------------------------------------------------- images


def load_images(paths: Sequence[str] = (), builtin_indices: Sequence[int] = (), builtin_size: int = 64,
                builtin_split: str = "val", seed: int = 0, layout: str = "single") -> List[Tuple[str, Image.Image]]:
    """(name, RGB image) for every file in ``paths``, then every sample of the built-in dataset."""
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                out.append((Path(p).name, im.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    if builtin_indices:
        from builtin_data import BuiltinDataset  # entry scripts may import the data modules
        try:
            data = BuiltinDataset(builtin_split, num_images=max(builtin_indices) + 1, image_size=builtin_size,
                                  seed=seed, layout=layout)
        except ValueError as e:
            raise UserError(f"built-in dataset: {e}") from None
        for i in builtin_indices:
            if i < 0:
                raise UserError(f"--builtin-index must be >= 0, got {i}")
            image, _, label = data.sample(i)
            out.append((f"built-in {builtin_split} #{i} (class {label})", image))
    return out


# ----------------------------------------------------------------------------- command line


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to help texts that do not state their default, unless it is empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (one of --checkpoint, --hub, --random)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH",
                     help="backbone weights: an exported backbone.pth, a training model.pth, a published "
                          "<arch>_alpha<a>.pth or _fullckpt.pth file, or an http(s) URL")
    src.add_argument("--hub", metavar="NAME",
                     help="a hubconf.py entry point, e.g. convnext_small_alpha0p75 (downloads the published "
                          "weights unless --weights or --random is given)")
    g.add_argument("--weights", metavar="PATH",
                   help="with --hub: load this local file (backbone or full checkpoint) instead of downloading")
    g.add_argument("--random", action="store_true",
                   help="randomly initialised backbone (seeded by --seed), a baseline to compare with; "
                        "needs --arch, or goes with --hub")
    g.add_argument("--arch", help="architecture, e.g. resnet50 or convnext_small (default with --checkpoint: "
                                  "model.pth's saved --arch, else recognised from the weights' shapes)")
    g.add_argument("--small-input", action="store_true", default=None,
                   help="ResNet with the small-input stem (3x3 stride-1 conv, no max-pool), as pretrained "
                        "with --small-input on 32-64 px images (default with --checkpoint: read from the file)")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seed of --random weights and of the crops of 'matches'")
    add_trust_argument(g)


def _add_image_args(p: argparse.ArgumentParser, default_indices: Sequence[int]) -> None:
    g = p.add_argument_group(f"input images (default: built-in samples {' '.join(map(str, default_indices))})")
    g.add_argument("--image", nargs="+", default=[], metavar="FILE", help="image files (any format Pillow reads)")
    g.add_argument("--builtin-index", nargs="+", type=int, default=None, metavar="I",
                   help="samples of the built-in procedural dataset (no download) to show")
    g.add_argument("--builtin-size", type=int, default=64, help="image side of the built-in samples")
    g.add_argument("--builtin-split", choices=["train", "val"], default="val", help="built-in split to draw from")
    g.add_argument("--builtin-layout", choices=["single", "mosaic"], default="single",
                   help="built-in scenes: one large object (single) or several mid-sized ones (mosaic)")


def _add_picture_args(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--panel", type=int, default=224, help="side of each panel in the picture, in pixels")
    p.add_argument("--out", help=f"output PNG (default: {default_name} next to --checkpoint, else in the current "
                                 "folder)")
    p.add_argument("--palette", action="store_true",
                   help="save with a 256-colour palette (smaller files, e.g. for documentation)")


def get_args_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        description="PNG pictures of a VICRegL backbone's dense features, of the matches between two crops, "
                    "and of training curves.", formatter_class=fmt,
        epilog="Run 'python visualize.py SUBCOMMAND --help' for each subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="{features,matches,curves}", required=True)

    f = sub.add_parser("features", formatter_class=fmt,
                       help="dense features as their first three principal components in RGB, next to each image",
                       description="Show each image next to its dense features: the first three principal "
                                   "components (PCA over every position of the feature map, jointly over all "
                                   "images) mapped to red, green and blue.")
    _add_backbone_args(f)
    _add_image_args(f, [0, 1, 2, 3])
    f = f.add_argument_group("picture")
    f.add_argument("--size", type=int, default=None,
                   help="side the images are resized (shorter side) and centre-cropped to before the backbone "
                        "(default: 14 cells, i.e. 448 px for stride-32 backbones, 112 for small-input ResNets)")
    f.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=4,
                   help="which feature map: 4 is the backbone's output (the maps the local loss sees); "
                        "3, 2, 1 are earlier stages with 2x, 4x, 8x finer cells but less semantic features")
    f.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest",
                   help="how the colour map is enlarged to the image: nearest shows the cells, bilinear is smoother")
    f.add_argument("--per-image-pca", action="store_true",
                   help="one PCA per image (more contrast) instead of one over all images (comparable colours)")
    f.add_argument("--clip-percent", type=float, default=1.0,
                   help="each component is scaled between its p-th and (100-p)-th percentiles")
    f.add_argument("--overlay", action="store_true", help="add a panel blending the image and the colours")
    f.add_argument("--compare-random", action="store_true",
                   help="add a column for a randomly initialised backbone of the same architecture (seeded by "
                        "--seed): what the colours of an untrained network look like")
    f.add_argument("--compare", nargs="+", default=[], metavar="LABEL=PATH",
                   help="more backbones of the same architecture, a column each with its own PCA: backbone "
                        "files (or URLs) as LABEL=PATH, or PATH (labelled by its folder's name), e.g. "
                        "vicreg=exp/demo-seg/vicreg/backbone.pth")
    f.add_argument("--label", default="", help="column title of the first backbone's features (default: PCA)")
    _add_picture_args(f, "features.png")

    m = sub.add_parser("matches", formatter_class=fmt,
                       help="two random crops of one image with their location and feature-space matches",
                       description="Sample two random-resized crops of one image (the first given) and draw "
                                   "the location matches (each kept cell joined to the cell of the other crop "
                                   "whose centre is nearest in image coordinates, as the local loss pairs them) "
                                   "and the feature-space matches (nearest neighbours between the crops' "
                                   "feature maps). Crops are neither flipped nor colour-distorted.")
    _add_backbone_args(m)
    _add_image_args(m, [0])
    m = m.add_argument_group("crops and matches")
    m.add_argument("--size-crops", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="sides the two crops are resized to for the backbone (default: 224 224, or 32 32 for a "
                        "small-input ResNet)")
    m.add_argument("--min_scale_crops", type=float, nargs=2, default=[0.4, 0.4], metavar=("A1", "A2"),
                   help="smallest area fraction of each crop (transforms.sample_crop)")
    m.add_argument("--max_scale_crops", type=float, nargs=2, default=[1.0, 1.0], metavar=("A1", "A2"),
                   help="largest area fraction of each crop")
    m.add_argument("--num_matches", type=int, nargs=2, default=None, metavar=("K1", "K2"),
                   help="location matches kept from crop 1 -> 2 and from crop 2 -> 1, as the loss's "
                        "--num_matches (default: 20 4, capped at the number of cells)")
    m.add_argument("--l2_all_matches", action="store_true",
                   help="draw the feature match of every cell (what the loss uses with --l2_all_matches 1) "
                        "instead of the best K1 / K2")
    _add_picture_args(m, "matches.png")

    c = sub.add_parser("curves", formatter_class=fmt, help="training curves of every loss term from stats.txt files",
                       description="Plot every loss term and the online probe's accuracy against the training "
                                   "step, one small plot per metric, one colour per run.")
    c.add_argument("stats", nargs="+", help="stats.txt files written by main_vicregl.py, or their experiment folders")
    c.add_argument("--keys", nargs="+", default=None,
                   help=f"metrics to plot (default: those of {' '.join(DEFAULT_KEYS)} that were logged; also "
                        "lr, top5, stdr, corr, stde, core, clsl_val, top5_val)")
    c.add_argument("--labels", nargs="+", default=None, help="legend names of the runs (default: folder names)")
    c.add_argument("--cols", type=int, default=4, help="plots per row")
    c.add_argument("--panel-size", type=int, nargs=2, default=[240, 170], metavar=("W", "H"),
                   help="size of each plot in pixels")
    c.add_argument("--out", help="output PNG (default: curves.png next to the first stats file)")
    c.add_argument("--palette", action="store_true",
                   help="save with a 256-colour palette (smaller files, e.g. for documentation)")
    return parser


def _save(fig: Image.Image, out: Path, palette: bool = False, dpi: Optional[int] = None) -> None:
    if palette:  # 256 colours, no dithering: about 3x smaller for figures with photos or noise
        fig = fig.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.save(out, format="PNG", optimize=True, **({"dpi": (dpi, dpi)} if dpi else {}))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    print(f"wrote {out} ({fig.width}x{fig.height})")


def _default_out(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    if getattr(args, "checkpoint", None) and "://" not in args.checkpoint:
        return Path(args.checkpoint).parent / name
    return Path(name)


def _loaded_from_args(args) -> LoadedBackbone:
    loaded = load_backbone(args.checkpoint, hub=args.hub, weights=args.weights, random_init=args.random,
                           arch=args.arch, small_input=args.small_input, seed=args.seed,
                           trusted=args.trust_checkpoint)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    loaded.backbone.to(device)
    return loaded


def _images_from_args(args, default_indices: Sequence[int]):
    indices = args.builtin_index if args.builtin_index is not None else ([] if args.image else default_indices)
    return load_images(args.image, indices, args.builtin_size, args.builtin_split, layout=args.builtin_layout)


def _run_features(args) -> None:
    loaded = _loaded_from_args(args)
    images = _images_from_args(args, [0, 1, 2, 3])
    compare = []
    if args.compare_random:
        baseline = load_backbone(random_init=True, arch=loaded.arch, small_input=loaded.small_input, seed=args.seed)
        compare.append(("random init", baseline.backbone.to(next(loaded.backbone.parameters()).device)))
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or "://" in label:  # a bare path (or URL): labelled by its folder
            label, path = Path(item).parent.name or item, item
        other = load_backbone(path, arch=loaded.arch, small_input=loaded.small_input, trusted=args.trust_checkpoint)
        compare.append((label, other.backbone.to(next(loaded.backbone.parameters()).device)))
    fig = render_features(loaded.backbone, images, args.size, args.stage, args.upsample, not args.per_image_pca,
                          args.clip_percent, args.panel, args.overlay, compare=compare, label=args.label, title=
                          "dense features, 3 principal components as RGB: "
                          f"{loaded.arch}{' (small input)' if loaded.small_input else ''}, "
                          f"{', '.join([args.label or loaded.source, *(name for name, _ in compare)])}")
    _save(fig, _default_out(args, "features.png"), args.palette)


def _run_matches(args) -> None:
    loaded = _loaded_from_args(args)
    name, image = _images_from_args(args, [0])[0]
    sizes = args.size_crops or ([32, 32] if loaded.small_input else [224, 224])
    for s in sizes:
        if loaded.backbone.map_size(s) < 1:
            raise UserError(f"--size-crops {s} is too small for {loaded.arch}")
    for lo, hi in zip(args.min_scale_crops, args.max_scale_crops):
        if not 0 < lo <= hi <= 1:
            raise UserError(f"crop scales must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    cells = [loaded.backbone.map_size(s) ** 2 for s in sizes]
    k = args.num_matches or [min(20, cells[0]), min(4, cells[1])]
    result = compute_matches(loaded.backbone, image, sizes, list(zip(args.min_scale_crops, args.max_scale_crops)),
                             k, args.l2_all_matches, args.seed)
    fig = render_matches(image, result, args.panel, f"{name}, {loaded.arch} from {loaded.source} (seed {args.seed})")
    _save(fig, _default_out(args, "matches.png"), args.palette)


def _run_curves(args) -> None:
    _matplotlib()  # before any other work: say at once that it is missing
    if args.labels is not None and len(args.labels) != len(args.stats):
        raise UserError(f"--labels names {len(args.labels)} runs but {len(args.stats)} stats files were given")
    if args.cols < 1 or min(args.panel_size) < 80:
        raise UserError("--cols must be >= 1 and --panel-size at least 80 80")
    runs = [read_stats(p, label) for p, label in zip(args.stats, args.labels or [None] * len(args.stats))]
    for run in runs:
        if not run.series:
            raise UserError(f"{run.path} holds no metrics (no JSON line)")
        if run.skipped:
            print(f"warning: {run.path}: skipped {run.skipped} line(s) that are not a flat JSON object of numbers "
                  f"and strings (the first: line {run.first_skipped})", file=sys.stderr, flush=True)
    fig = render_curves(runs, args.keys, args.cols, tuple(args.panel_size))
    out = Path(args.out) if args.out else _stats_path(args.stats[0]).parent / "curves.png"
    _save(fig, out, args.palette, CURVES_DPI)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    {"features": _run_features, "matches": _run_matches, "curves": _run_curves}[args.command](args)


if __name__ == "__main__":
    main()
