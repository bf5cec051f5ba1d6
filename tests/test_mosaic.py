"""--builtin-layout: the default scenes unchanged, the mosaic scenes' design and statistics, the flag's
wiring, and the measurement helpers of bench/scene_stats.py and bench/flip_overlap.py."""
import hashlib

import numpy as np
import pytest
import torch

import builtin_data
import datasets
import evaluate
import main_vicregl
import visualize
import transforms
import utils
from bench import flip_overlap, scene_stats
from segmentation import train as seg_train

# ----------------------------------------------------------------------------- the default layout

# Hashes of scenes rendered by builtin_data.py before --builtin-layout existed (the same loops as
# below): the default layout must draw the same images, masks and labels, and leave the generator in
# the same state.
BEFORE_LAYOUTS = {(32, 10, 1, 0): "2d896f011b69a8f9", (64, 10, 4, 0): "0ae376da7c60bb25",
                  (96, 10, 4, 3): "4f9c1120f796e92d", (48, 4, 2, 7): "a00296451be12c57",
                  "train": "e6b471caa7cccbbe", "val": "03a34639fa995c42"}


def _digest(arrays) -> str:
    d = hashlib.sha256()
    for a in arrays:
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()[:16]


@pytest.mark.parametrize("key", [k for k in BEFORE_LAYOUTS if isinstance(k, tuple)])
def test_default_layout_draws_the_scenes_of_before(key):
    size, classes, max_objects, seed = key
    for kwargs in ({}, {"layout": "single"}):
        rng = np.random.default_rng([seed, 0, 5])
        parts = []
        for _ in range(3):
            image, mask, label = builtin_data.render_scene(rng, size, classes, max_objects, **kwargs)
            parts += [image, mask, np.array([label])]
        parts.append(rng.integers(0, 2 ** 62, 4))  # what the generator draws next: the same state
        assert _digest(parts) == BEFORE_LAYOUTS[key]


@pytest.mark.parametrize("split", ["train", "val"])
def test_default_dataset_samples_are_those_of_before(split):
    data = builtin_data.BuiltinDataset(split, 20, 64, 10, 0)
    parts = []
    for i in (0, 1, 19):
        image, mask, label = data.sample(i)
        parts += [np.array(image), mask, np.array([label])]
    assert data.layout == "single" and _digest(parts) == BEFORE_LAYOUTS[split]


# ----------------------------------------------------------------------------- mosaic scenes

def _mosaics(count: int, size: int = 64, seed: int = 0, split: str = "val"):
    data = builtin_data.BuiltinDataset(split, count, size, 10, seed, layout="mosaic")
    return [data.sample(i) for i in range(count)]


def test_mosaic_parameters_lie_in_the_designed_ranges():
    lo, hi = builtin_data.MOSAIC_OBJECTS
    assert 3 <= lo <= hi <= 4
    assert 0.25 <= builtin_data.MOSAIC_RADIUS[0] <= builtin_data.MOSAIC_RADIUS[1] <= 0.35
    assert 0.2 <= builtin_data.MOSAIC_CENTRE[0] < builtin_data.MOSAIC_CENTRE[1] <= 0.8


class _CentreRecorder:
    """A stand-in for the generator that _paint_object gets: draws exactly as the generator does and
    notes the centre it draws (the two numbers drawn uniformly in the centre range)."""

    def __init__(self, rng, low: float, high: float):
        self.rng, self.low, self.high, self.centre = rng, low, high, None

    def uniform(self, low=0.0, high=1.0, size=None):
        out = self.rng.uniform(low, high, size)
        if (low, high, size) == (self.low, self.high, 2):
            self.centre = out
        return out

    def __getattr__(self, name):
        return getattr(self.rng, name)


def _painted_objects(monkeypatch, scenes: int, size: int):
    """Every object painted in ``scenes`` mosaic scenes: (class, radius, centre range, drawn centre
    (row, col) in pixels, (H, W) bool of the pixels it painted)."""
    painted = []
    real = builtin_data._paint_object

    def spy(image, mask, rng, c, radius, centre, colours):
        before = mask.copy()
        recorder = _CentreRecorder(rng, centre[0] * size, centre[1] * size)
        real(image, mask, recorder, c, radius, centre, colours)
        painted[-1].append((c, radius, centre, recorder.centre, mask != before))

    monkeypatch.setattr(builtin_data, "_paint_object", spy)
    for seed in range(scenes):
        painted.append([])
        builtin_data.render_scene(np.random.default_rng(seed), size, 10, layout="mosaic")
    return painted


def test_spying_on_the_painting_changes_no_scene(monkeypatch):
    plain = [builtin_data.render_scene(np.random.default_rng(s), 64, 10, layout="mosaic")[1] for s in range(3)]
    _painted_objects(monkeypatch, 3, 64)
    spied = [builtin_data.render_scene(np.random.default_rng(s), 64, 10, layout="mosaic")[1] for s in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(plain, spied))


def test_mosaic_paints_objects_of_distinct_classes_without_a_dominant_one(monkeypatch):
    size = 64
    scenes = _painted_objects(monkeypatch, 40, size)
    for objects in scenes:
        classes = [c for c, *_ in objects]
        assert builtin_data.MOSAIC_OBJECTS[0] <= len(classes) <= builtin_data.MOSAIC_OBJECTS[1]
        assert len(set(classes)) == len(classes)
        for _, radius, _, _, _ in objects:
            assert 0.25 * size <= radius <= 0.35 * size
    first = [objects[0][1] for objects in scenes]  # the first object is drawn like the others
    assert max(first) - min(first) > 0.02 * size


def test_mosaic_objects_have_the_designed_centre_and_extent(monkeypatch):
    size = 64
    # Outline extents: at least 1.7 radii (a square's side), at most 2 x 1.4 radii (a triangle's scale).
    smallest = 1.7 * builtin_data.MOSAIC_RADIUS[0] * size
    largest = 2 * builtin_data.MOSAIC_RADIUS[1] * max(builtin_data._SHAPE_SCALE.values()) * size
    rows_cols = np.indices((size, size)) + 0.5
    inside = 0
    for objects in _painted_objects(monkeypatch, 40, size):
        for _, radius, _, centre, region in objects:
            assert 0.2 * size <= centre.min() and centre.max() <= 0.8 * size
            # the painted pixels surround the drawn centre, within the outline's reach
            distance = np.hypot(rows_cols[0] - centre[0], rows_cols[1] - centre[1])
            assert distance[region].max() <= radius * max(builtin_data._SHAPE_SCALE.values()) + 1
            rows, cols = np.nonzero(region)
            for axis in (rows, cols):
                assert axis.max() - axis.min() + 1 <= largest + 2
            if min(rows.min(), cols.min()) > 0 and max(rows.max(), cols.max()) < size - 1:
                inside += 1  # not cut by the border: the whole outline shows
                assert min(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= smallest - 2
                # every outline is symmetric about its centre: the centroid is the centre
                assert np.allclose([rows.mean() + 0.5, cols.mean() + 0.5], centre, atol=1.5)
    assert inside >= 20


def test_mosaic_masks_show_three_or_four_distinct_classes():
    counts = []
    for _, mask, _ in _mosaics(60):
        counts.append(len([v for v in np.unique(mask) if v > 0]))
        assert (mask > 0).mean() < 0.9  # background shows between the objects
    assert min(counts) >= 3 and max(counts) <= 4
    assert np.mean(counts) >= 3.8  # occlusion rarely hides a whole object


def test_mosaic_label_is_the_class_with_the_most_visible_pixels():
    labels = []
    for _, mask, label in _mosaics(40):
        counts = np.bincount(mask.ravel(), minlength=11)[1:]
        assert counts[label] == counts.max()
        labels.append(label)
    assert len(set(labels)) >= 5


def test_mosaic_is_reproducible_from_the_seed_and_differs_between_seeds():
    a, b, c = _mosaics(3, seed=4), _mosaics(3, seed=4), _mosaics(3, seed=5)
    for (ia, ma, la), (ib, mb, lb), (ic, mc, _) in zip(a, b, c):
        assert np.array_equal(np.array(ia), np.array(ib)) and np.array_equal(ma, mb) and la == lb
        assert not np.array_equal(ma, mc) and not np.array_equal(np.array(ia), np.array(ic))
    single = builtin_data.BuiltinDataset("val", 3, 64, 10, 4).sample(0)[1]
    assert not np.array_equal(single, a[0][1])


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="--builtin-layout"):
        builtin_data.BuiltinDataset("train", 4, layout="grid")
    with pytest.raises(ValueError, match="layout"):
        builtin_data.render_scene(np.random.default_rng(0), 32, 10, layout="grid")


# ----------------------------------------------------------------------------- scene statistics

def test_mosaic_scenes_meet_the_local_structure_requirements():
    images, size, stride = 100, 96, 8
    stats = {layout: scene_stats.scene_stats(layout, 0, images, size, 10, 4, stride, (0.3, 1.0), 4, [2])
             for layout in builtin_data.LAYOUTS}
    assert stats["mosaic"]["oracle_head"] <= 40.0 and stats["mosaic"]["same_dominant"] <= 80.0
    # the measures tell the layouts apart: one label explains the single-object scenes
    assert stats["single"]["oracle_head"] >= 70.0 and stats["single"]["same_dominant"] >= 95.0
    assert stats["mosaic"]["other_object_2"] > 3 * stats["single"]["other_object_2"]


# A 4x4 mask: class values 1..3 (mask = class + 1), 0 the background.
M = np.array([[1, 1, 2, 2],
              [1, 1, 2, 2],
              [0, 0, 2, 2],
              [0, 3, 3, 0]], dtype=np.uint8)


def test_block_majority_by_hand():
    mask = np.array([[0, 2, 1, 1],
                     [2, 0, 1, 2],
                     [3, 3, 0, 0],
                     [3, 0, 0, 0]])
    # blocks: {0,2,2,0} a tie -> the smaller label 0; {1,1,1,2} -> 1; {3,3,3,0} -> 3; zeros -> 0
    assert scene_stats.block_majority(mask, 2, 4).tolist() == [[0, 1], [3, 0]]


def test_oracle_miou_by_hand():
    a, b = np.array([[1, 1], [2, 0]]), np.array([[2, 2], [0, 0]])
    # a: label 0 -> prediction [[1, 1], [1, 0]]; b: label 1 -> [[2, 2], [0, 0]].
    # background IoU 3/3; value 1: TP 2, FP 1 -> 2/3; value 2: TP 2, FN 1 -> 2/3; mean 7/9.
    assert scene_stats.oracle_miou([a, b], [0, 1], 3) == pytest.approx(700 / 9)
    # the same masks at stride 2: one stray pixel per block leaves the block majority unchanged
    big_a, big_b = np.kron(a, np.ones((2, 2), int)), np.kron(b, np.ones((2, 2), int))
    big_a[0, 0], big_b[3, 3] = 2, 1
    assert scene_stats.oracle_miou([big_a, big_b], [0, 1], 3, stride=2) == pytest.approx(700 / 9)
    assert scene_stats.oracle_miou([big_a, big_b], [0, 1], 3, stride=1) != pytest.approx(700 / 9)


def test_dominant_class_and_same_dominant_share_by_hand():
    assert scene_stats.dominant_class(M, (0, 0, 2, 2)) == 1
    assert scene_stats.dominant_class(M, (0, 0, 4, 4)) == 2  # 1: 4 pixels, 2: 6, 3: 2
    assert scene_stats.dominant_class(M, (2, 0, 2, 2)) == 3  # the background does not count
    assert scene_stats.dominant_class(M, (2, 0, 1, 2)) == 0  # nothing but background
    pairs = [[((0, 0, 2, 2), (0, 0, 4, 4)), ((0, 2, 2, 2), (0, 0, 4, 4)), ((2, 0, 2, 2), (3, 1, 1, 2))]]
    assert scene_stats.same_dominant_share([M], pairs) == pytest.approx(200 / 3)


def test_cell_majorities_and_other_label_shares_by_hand():
    assert scene_stats.cell_majorities(M, (0, 0, 4, 4), 2, 4).tolist() == [[1, 2], [0, 2]]
    # a 3-row crop: cell rows hold crop rows {0} and {1, 2}; {1, 1, 0, 0} is a tie -> 0
    assert scene_stats.cell_majorities(M, (0, 0, 3, 4), 2, 4).tolist() == [[1, 2], [0, 2]]
    assert scene_stats.cell_majorities(M, (1, 1, 2, 2), 2, 4).tolist() == [[1, 2], [0, 2]]
    # image class 1 (mask value 2): cells 1 and 0 are other labels, of which 1 is another object
    other, other_object = scene_stats.other_label_shares([M], [1], [[(0, 0, 4, 4)]], 2, 4)
    assert (other, other_object) == (50.0, 25.0)


# ----------------------------------------------------------------------------- the flag's wiring

def test_layout_reaches_the_datasets_of_every_script(monkeypatch, tmp_path):
    assert datasets.build_dataset("builtin", None, "train", num_images=4, layout="mosaic").layout == "mosaic"
    args = seg_train.get_args_parser().parse_args(["--dataset", "builtin", "--builtin-layout", "mosaic",
                                                   "--builtin-size", "32", "--builtin-images", "4"])
    masks = seg_train.build_dataset(args, "train", None)
    expected = builtin_data.BuiltinDataset("train", 4, 32, 10, 0, layout="mosaic").sample(2)[1]
    assert masks.source.layout == "mosaic" and np.array_equal(np.array(masks[2][1]), expected)

    seen = []
    real = datasets.build_dataset

    def spy(*a, **kw):
        seen.append(kw.get("layout"))
        return real(*a, **kw)

    monkeypatch.setattr(datasets, "build_dataset", spy)
    args = evaluate.get_args_parser().parse_args(
        ["--dataset", "builtin", "--builtin-layout", "mosaic", "--builtin-size", "32", "--builtin-images", "8",
         "--builtin-val-images", "4", "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test",
         "--batch-size", "2", "--workers", "0", "--exp-dir", str(tmp_path)])
    evaluate.build_data(args, utils.DistInfo())
    assert seen and set(seen) == {"mosaic"}

    seen.clear()
    args = main_vicregl.get_args_parser().parse_args(
        ["--dataset", "builtin", "--builtin-layout", "mosaic", "--builtin-size", "32", "--builtin-images", "8",
         "--builtin-val-images", "4", "--size-crops", "32", "--num-crops", "2", "--min_scale_crops", "0.3",
         "--max_scale_crops", "1", "--arch", "resnet_test",
         "--batch-size", "2", "--num-workers", "0", "--knn", "--exp-dir", str(tmp_path / "pretrain")])
    main_vicregl.resolve_args(args)
    main_vicregl.build_data(args, utils.DistInfo(), "train")
    main_vicregl.build_knn_data(args, utils.DistInfo())
    assert len(seen) == 3 and set(seen) == {"mosaic"}

    images = visualize.load_images([], [0], 32, layout="mosaic")
    expected = builtin_data.BuiltinDataset("val", 1, 32, 10, 0, layout="mosaic").sample(0)[0]
    assert np.array_equal(np.array(images[0][1]), np.array(expected))


# ----------------------------------------------------------------------------- flip overlap

def test_matched_overlaps_follow_the_flip_by_hand():
    # 8x8 image; view 0: rows 0-4, cols 0-4; view 1: rows 0-4, cols 2-6, flipped. 2x2 grids.
    # View 1's position column 0 shows crop column 1 (image cols 4-6), column 1 shows cols 2-4.
    crops = [torch.tensor([[0, 0, 4, 4, 8, 8]]), torch.tensor([[0, 2, 4, 4, 8, 8]])]
    flips = [torch.tensor([False]), torch.tensor([True])]
    boxes = flip_overlap.cell_boxes(crops[1][:, :4], flips[1], 2)
    assert boxes[0].tolist() == [[0, 4, 2, 6], [0, 2, 2, 4], [2, 4, 4, 6], [2, 2, 4, 4]]

    def areas(no_flip_grid):
        config = transforms._MultiCropConfig((4,), (2,), (0.1,), (1.0,), no_flip_grid, grid_sizes=(2,))
        grids = config.locations([tuple(c[0].tolist()) for c in crops], [bool(f) for f in flips])
        return flip_overlap.matched_overlaps(crops, flips, [g.unsqueeze(0) for g in grids], (4, 4)).tolist()

    # Unflipped grids (the original's default): 0 -> 1 pairs each cell with view 1's column 0 (grid
    # centre col 3, nearest to centres 1 and 3), which shows cols 4-6: no shared pixel. 1 -> 0: column
    # 0 (grid col 3) -> view 0's column 1 (cols 2-4, apart from 4-6); column 1 (grid col 5) -> view 0's
    # column 1, both showing cols 2-4: 2 x 2 pixels.
    forward, backward = [0, 0, 0, 0], [0, 4, 0, 4]
    assert areas(True) == forward + backward + backward + forward  # pairs (0, 1), (1, 0), two directions
    # Mirrored grids: column 0 sits at col 5, column 1 at col 3, where each truly is.
    forward, backward = [0, 4, 0, 4], [0, 4, 0, 4]
    assert areas(False) == forward + backward + backward + forward


def test_mirrored_grids_remove_most_disjoint_matches():
    kw = dict(images=300, image=64, size_crops=[64], num_crops=[2], min_scale=[0.3], max_scale=[1.0],
              num_matches=[4, 4], seed=0)
    assert flip_overlap.zero_overlap_share(True, 2, **kw) > 15.0
    assert flip_overlap.zero_overlap_share(False, 2, **kw) < 4.0


def test_head_diagnostics_by_hand():
    """bench/seg_diagnostics.py's readings on two hand-made 'images' (background 0, classes 1 and 2),
    each worked out on paper from its confusion matrix."""
    from bench import seg_diagnostics
    y1, p1 = torch.tensor([0, 1, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 2])
    y2, p2 = torch.tensor([2, 2, 2, 1]), torch.tensor([2, 2, 0, 2])
    assert seg_diagnostics.majority_object(torch.tensor([[0, 2, 2], [3, 3, 3], [255, 1, 0]]), 11) == 3
    assert seg_diagnostics.majority_object(torch.tensor([[0, 0, 0, 0], [2, 2, 3, 1]]), 4) == 2  # not background
    assert seg_diagnostics.repaint(p1, 3).tolist() == [0, 2, 2, 2, 2, 2]
    assert seg_diagnostics.repaint(torch.tensor([0, 0, 0, 0, 1, 1, 2]), 3).tolist() == [0, 0, 0, 0, 1, 1, 1]
    s = seg_diagnostics.scores([(p1, y1), (p2, y2)], 3)
    # plain: IoU 1/2, 2/4, 4/7; repainted: 1/2, 0/4, 4/9; other pixels (y != the image's majority
    # object): 1/1, 0/1, 2/3; other objects: 2 of 3 pixels right
    assert s["plain"] == pytest.approx(100 * (0.5 + 0.5 + 4 / 7) / 3, abs=1e-3)
    assert s["repainted"] == pytest.approx(100 * (0.5 + 4 / 9) / 3, abs=1e-3)
    assert s["other"] == pytest.approx(100 * (1 + 2 / 3) / 3, abs=1e-3)
    assert s["other_objects_acc"] == pytest.approx(200 / 3)


def test_head_diagnostics_rebuild_the_head_as_it_was_trained(tmp_path):
    """The plain mIoU of bench/seg_diagnostics.py on a finished head equals the one its own run
    reported: the head, its backbone and its evaluation scenes were rebuilt as they were."""
    import json
    from bench import seg_diagnostics
    exp = tmp_path / "head"
    seg_train.main(seg_train.get_args_parser().parse_args([
        "--dataset", "builtin", "--builtin-layout", "mosaic", "--arch", "resnet_test", "--device", "cpu",
        "--workers", "0", "--builtin-size", "32", "--builtin-images", "32", "--builtin-val-images", "6",
        "--batch-size", "4", "--iters", "3", "--eval-interval", "0", "--stages", "4", "--exp-dir", str(exp)]))
    reported = [json.loads(line[len("Val: "):]) for line in (exp / "stats.txt").read_text().splitlines()
                if line.startswith("Val: ")][-1]["mIoU"]
    args = seg_diagnostics.head_args(exp, 0)
    assert args.builtin_layout == "mosaic" and args.builtin_val_images == 6
    s = seg_diagnostics.diagnose(args)
    assert s["plain"] == pytest.approx(reported, abs=1e-3)
    assert 0 <= s["repainted"] <= 100 and 0 <= s["other"] <= 100
