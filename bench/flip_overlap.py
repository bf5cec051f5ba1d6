"""How often location-based matching pairs cells that show different parts of the image.

    python bench/flip_overlap.py        # the dense benchmark's views: 2 x 64 px (scale 0.3-1) of 64 px scenes
    python bench/flip_overlap.py --image 96 --size-crops 64 32 --num-crops 2 4 --min_scale_crops 0.3 0.1 \
        --max_scale_crops 1 0.4 --num_matches 20 4          # multi-crop, main_vicregl.py's --num_matches

The local loss matches cells of two views by the distance between their location grids (the cell
centres in image coordinates, ``models.losses.nearest``). With ``--no-flip-grid 1`` (the original's
default) the grid of a horizontally flipped view is not mirrored: position (k, l) of its feature map
shows image column N - 1 - l of the crop, but the grid says l, so a match can pair two cells that
share no pixel. This script draws the views of --images images with the pretraining's transform
(``transforms.MultiCropTrainDataTransform.sample_params`` and ``.locations``, the same crops for both
settings), matches them with ``models.losses.nearest`` over the view pairs and numbers of matches of
``models.losses.local_loss``, and reports the share of matched cell pairs whose true image regions
(what each feature-map cell shows) do not overlap, for --no-flip-grid 1 and 0.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import transforms  # noqa: E402
from models.losses import _view_pairs, nearest  # noqa: E402


def cell_boxes(crops: torch.Tensor, flips: torch.Tensor, grid: int) -> torch.Tensor:
    """What each feature-map position of a view shows: (K, N·N, 4) boxes (top, left, bottom, right)
    in image pixels, positions in row-major order. crops: (K, 4+) (i, j, h, w, ...); flips: (K,)
    bool. Position (k, l) of a flipped view shows column N - 1 - l of the crop's grid."""
    crops = crops[:, :4].double()
    steps = torch.arange(grid + 1, dtype=torch.float64)
    rows = crops[:, 0:1] + steps * crops[:, 2:3] / grid  # (K, N + 1) cell edges
    cols = crops[:, 1:2] + steps * crops[:, 3:4] / grid
    left, right = cols[:, :-1], cols[:, 1:]  # (K, N)
    left, right = (torch.where(flips.view(-1, 1), left.flip(1), left),
                   torch.where(flips.view(-1, 1), right.flip(1), right))
    n = grid
    top = rows[:, :-1].unsqueeze(2).expand(-1, n, n)
    bottom = rows[:, 1:].unsqueeze(2).expand(-1, n, n)
    return torch.stack([top, left.unsqueeze(1).expand(-1, n, n), bottom,
                        right.unsqueeze(1).expand(-1, n, n)], dim=-1).flatten(1, 2)


def overlap_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel area shared by boxes a and b (..., 4) (top, left, bottom, right): (...)."""
    height = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    width = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    return height * width


def matched_overlaps(crops: Sequence[torch.Tensor], flips: Sequence[torch.Tensor],
                     locations: Sequence[torch.Tensor], num_matches: Sequence[int]) -> torch.Tensor:
    """Overlap area of every location-matched cell pair, (M,) float64.

    crops[v]: (B, 4+) crops of view v of B images; flips[v]: (B,) bool; locations[v]: (B, N_v, N_v, 2)
    the grids the loss sees. Pairs and directions as ``local_loss``'s location matching: for each view
    pair (i, j), num_matches[0] positions of i matched into j and num_matches[1] of j into i (capped at
    the positions a view has)."""
    grids = [g.flatten(1, 2) for g in locations]  # (B, L_v, 2)
    boxes = [cell_boxes(c, f, g.shape[1]) for c, f, g in zip(crops, flips, locations)]  # (B, L_v, 4)
    areas = []
    for i, j in _view_pairs(len(grids)):
        for a, b, k in ((i, j, num_matches[0]), (j, i, num_matches[1])):
            kept, nn_idx = nearest(grids[a], grids[b], min(k, grids[a].shape[1]))  # (B, k) each
            box_a = boxes[a].gather(1, kept.unsqueeze(-1).expand(-1, -1, 4))
            box_b = boxes[b].gather(1, nn_idx.unsqueeze(-1).expand(-1, -1, 4))
            areas.append(overlap_area(box_a, box_b).flatten())
    return torch.cat(areas)


def zero_overlap_share(no_flip_grid: bool, grid: int, images: int, image: int, size_crops: Sequence[int],
                       num_crops: Sequence[int], min_scale: Sequence[float], max_scale: Sequence[float],
                       num_matches: Sequence[int], seed: int) -> float:
    """Share (%) of matched cell pairs without a shared pixel, views drawn by the pretraining's transform
    on ``images`` images of side ``image``, every view with an N x N grid (N = ``grid``)."""
    tf = transforms.MultiCropTrainDataTransform(size_crops, num_crops, min_scale, max_scale, no_flip_grid,
                                                grid_sizes=[grid] * len(size_crops),
                                                generator=torch.Generator().manual_seed(seed))
    per_image = [tf.sample_params(image, image) for _ in range(images)]
    views = range(tf.num_views)
    crops = [torch.tensor([[float(x) for x in p[v].crop[:4]] for p in per_image]) for v in views]
    flips = [torch.tensor([bool(p[v].flip) for p in per_image]) for v in views]
    by_image = [tf.locations([q.crop for q in p], [q.flip for q in p]) for p in per_image]
    locations = [torch.stack([grids[v] for grids in by_image]) for v in views]
    areas = matched_overlaps(crops, flips, locations, num_matches)
    return 100 * float((areas <= 0).double().mean())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", type=int, default=64, help="image side in pixels (demo.py --task segmentation: 64)")
    p.add_argument("--images", type=int, default=2000, help="images whose views are matched")
    p.add_argument("--size-crops", type=int, nargs="+", default=[64], help="crop side per group")
    p.add_argument("--num-crops", type=int, nargs="+", default=[2], help="crops per group")
    p.add_argument("--min_scale_crops", type=float, nargs="+", default=[0.3], help="smallest area scale per group")
    p.add_argument("--max_scale_crops", type=float, nargs="+", default=[1.0], help="largest area scale per group")
    p.add_argument("--num_matches", type=int, nargs=2, default=[4, 4],
                   help="positions kept per direction, as main_vicregl.py's flag (capped at a view's positions; "
                        "the dense benchmark uses 4 4, main_vicregl.py's default is 20 4)")
    p.add_argument("--grids", type=int, nargs="+", default=[2, 3, 8], help="N of the N x N grid of every view")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops (the same for both settings)")
    return p


def main(args: argparse.Namespace) -> Dict[int, Dict[int, float]]:
    groups = ", ".join(f"{n} x {s} px (scale {lo:g}-{hi:g})" for s, n, lo, hi in
                       zip(args.size_crops, args.num_crops, args.min_scale_crops, args.max_scale_crops))
    print(f"{args.images} images of {args.image} px; views: {groups}; --num_matches {args.num_matches}\n")
    print("| --no-flip-grid | " + " | ".join(f"{n}x{n}" for n in args.grids) + " |")
    print("|---" * (1 + len(args.grids)) + "|")
    shares = {}
    for no_flip in (1, 0):
        shares[no_flip] = {n: zero_overlap_share(bool(no_flip), n, args.images, args.image, args.size_crops,
                                                 args.num_crops, args.min_scale_crops, args.max_scale_crops,
                                                 args.num_matches, args.seed) for n in args.grids}
        print(f"| {no_flip} | " + " | ".join(f"{shares[no_flip][n]:.1f}%" for n in args.grids) + " |", flush=True)
    return shares


if __name__ == "__main__":
    main(get_args_parser().parse_args())
