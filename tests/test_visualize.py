"""visualize.py and pictures/: each picture is a valid PNG of the size its layout gives and shows
something; the matches drawn are the pairs models.losses.nearest returns; PCA colours behave;
stats.txt parsing and the curves plotted from it (matplotlib's line data against the file, and a
clear error without it); every way of getting a backbone (checkpoint, model.pth, hub --weights,
random); user errors."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models
import visualize as vis
from models.losses import nearest
from pictures import curves, draw, features, matches
from transforms import location_grid

from conftest import ROOT

PANEL = 48


def figure_wh(rows, cols, pw, ph):
    """The documented layout: a title band, then rows of labelled panels separated by PAD."""
    return draw.PAD + cols * (pw + draw.PAD), draw.TITLE_H + draw.PAD + rows * (draw.LABEL_H + ph + draw.PAD)


def panel(fig, row, col, pw=PANEL, ph=PANEL):
    x, y = draw._panel_xy(row, col, pw, ph)
    return np.asarray(fig.crop((x, y, x + pw, y + ph)))


def n_colours(a):
    return len(np.unique(a.reshape(-1, a.shape[-1]), axis=0))


def count_colour(a, colour):
    return int((a.reshape(-1, 3) == np.array(colour)).all(axis=1).sum())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net, _ = models.build_backbone("resnet_test", small_input=True)
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return vis.load_images(builtin_indices=[0, 1], builtin_size=32)


def run_main(*argv):
    vis.main([str(a) for a in argv])


def user_error(capsys, *argv):
    """Run the CLI in process and return its error message; it must exit 2 without a traceback."""
    with pytest.raises(SystemExit) as exc:
        run_main(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- features


def test_render_features_layout_and_content(tiny, images):
    fig = features.render_features(tiny, images, size=32, panel=PANEL)
    assert fig.mode == "RGB" and fig.size == figure_wh(len(images), 2, PANEL, PANEL)
    for row in range(len(images)):
        shown, pca = panel(fig, row, 0), panel(fig, row, 1)
        assert shown.std() > 0 and pca.std() > 0
        assert n_colours(pca) >= 4  # 4x4 cells of a random network: several distinct colours
    fig3 = features.render_features(tiny, images[:1], size=32, panel=PANEL, overlay=True, upsample="bilinear")
    assert fig3.size == figure_wh(1, 3, PANEL, PANEL)
    # A compared backbone gets its own column and its own PCA: the same network gives the same colours.
    fig4 = features.render_features(tiny, images, size=32, panel=PANEL, compare=[("again", tiny)])
    assert fig4.size == figure_wh(len(images), 3, PANEL, PANEL)
    assert np.array_equal(panel(fig4, 1, 1), panel(fig4, 1, 2)) and np.array_equal(panel(fig4, 1, 1), panel(fig, 1, 1))


def test_dense_features_stages(tiny, images):
    x = torch.stack([features.preprocess(im, 64)[0] for _, im in images])
    last = features.dense_features(tiny, x, 4)
    assert last.shape == (2, 8, 8, 64)  # small-input ResNet: stride 8
    assert torch.equal(last.reshape(2, 64, 64), tiny(x)[0])  # stage 4 is exactly the maps, row-major
    assert features.dense_features(tiny, x, 3).shape == (2, 16, 16, 32)


def test_pca_rgb_properties():
    torch.manual_seed(0)
    # Features varying along one direction only: the first component follows it, the others are flat.
    t = torch.linspace(0, 1, 16).pow(3).reshape(4, 4, 1)
    direction = torch.randn(1, 1, 8)
    rgb = features.pca_rgb([t * direction], clip_percent=0)[0]
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    red = rgb[..., 0].reshape(-1).astype(int)
    assert red[0] == 0 and red[-1] == 255 and (np.diff(red) >= 0).all()
    assert (rgb[..., 1:] == 128).all()
    # The sign of a component is fixed by its third moment: negating the features changes nothing.
    f = torch.randn(5, 5, 16).pow(3)
    assert np.array_equal(features.pca_rgb([f])[0], features.pca_rgb([-f])[0])
    # Joint PCA: the same map in two images gets the same colours; constant features are grey-free 0.
    a, b = features.pca_rgb([f, f.clone()])
    assert np.array_equal(a, b)
    assert (features.pca_rgb([torch.ones(3, 3, 4)])[0] == 0).all()


def test_preprocess_shape_and_normalisation():
    img = Image.new("RGB", (90, 60), (124, 116, 104))  # about the ImageNet mean
    x, shown = features.preprocess(img, 32)
    assert x.shape == (3, 32, 32) and shown.size == (32, 32)
    assert x.abs().max() < 0.02


# ----------------------------------------------------------------------------- matches


def test_matched_pairs_are_nearest():
    torch.manual_seed(1)
    a, b = torch.randn(9, 2) * 10, torch.randn(16, 2) * 10
    pairs = matches.matched_pairs(a, b, 4)
    kept, nn_idx = nearest(a[None], b[None], 4)
    assert torch.equal(pairs, torch.stack([kept[0], nn_idx[0]], 1))
    # Property: each pair joins a kept position to its nearest neighbour, and the kept positions are the
    # 4 with the closest neighbours, in increasing position order.
    dist = torch.cdist(a, b)
    assert torch.equal(pairs[:, 1], dist.argmin(1)[pairs[:, 0]])
    assert pairs[:, 0].tolist() == sorted(dist.min(1).values.argsort()[:4].tolist())
    every = matches.matched_pairs(a, b, None)
    assert every[:, 0].tolist() == list(range(9)) and torch.equal(every[:, 1], dist.argmin(1))


def test_compute_matches_uses_the_loss_pairing(tiny):
    _, image = vis.load_images(builtin_indices=[3], builtin_size=64)[0]
    m = matches.compute_matches(tiny, image, (32, 24), ((0.3, 1.0), (0.2, 0.6)), (5, 3), seed=2)
    for crop, grid, size in zip(m.crops, m.grids, (32, 24)):
        i, j, h, w, H, W = crop
        assert (H, W) == (64, 64) and 0 <= i and i + h <= H and 0 <= j and j + w <= W
        side = tiny.map_size(size)
        assert torch.equal(grid, location_grid(crop, side))
    g1, g2 = (g.reshape(1, -1, 2) for g in m.grids)
    kept, nn_idx = nearest(g1, g2, 5)
    assert torch.equal(m.location["1->2"], torch.stack([kept[0], nn_idx[0]], 1))
    kept, nn_idx = nearest(g2, g1, 3)  # reverse direction, stored as (cell of crop 1, cell of crop 2)
    assert torch.equal(m.location["2->1"], torch.stack([nn_idx[0], kept[0]], 1))
    maps = [tiny(draw._to_tensor(v)[None])[0] for v in m.views]
    kept, nn_idx = nearest(maps[0], maps[1], 5)
    assert torch.equal(m.feature["1->2"], torch.stack([kept[0], nn_idx[0]], 1))
    assert m.image_distance(m.location["1->2"]) <= m.chance_distance()


def test_identical_crops_match_every_cell_to_itself(tiny):
    _, image = vis.load_images(builtin_indices=[0], builtin_size=32)[0]
    # Scale 1 of a square image: the central-crop fallback, i.e. the whole image, for both crops.
    m = matches.compute_matches(tiny, image, (32, 32), ((1.0, 1.0), (1.0, 1.0)), (16, 16), all_feature_matches=True)
    assert m.crops[0] == m.crops[1] == (0, 0, 32, 32, 32, 32)
    identity = torch.arange(16).repeat(2, 1).T
    for pairs in (m.location["1->2"], m.location["2->1"], m.feature["1->2"], m.feature["2->1"]):
        assert torch.equal(pairs, identity)
    assert m.image_distance(m.feature["1->2"]) == 0


def test_render_matches_layout_and_lines(tiny):
    _, image = vis.load_images(builtin_indices=[2], builtin_size=64)[0]
    m = matches.compute_matches(tiny, image, (32, 32), ((0.5, 1.0), (0.5, 1.0)), (6, 2), seed=0)
    fig = matches.render_matches(image, m, panel=96)
    assert fig.mode == "RGB" and fig.size == figure_wh(3, 2, 96, 96)
    x0, y_loc = draw._panel_xy(1, 0, 96, 96)
    _, y_feat = draw._panel_xy(2, 0, 96, 96)
    loc_rows = np.asarray(fig.crop((0, y_loc, fig.width, y_loc + 96)))
    feat_rows = np.asarray(fig.crop((0, y_feat, fig.width, y_feat + 96)))
    assert count_colour(loc_rows, matches.LOCATION_COLOURS[0]) > 20
    assert count_colour(feat_rows, matches.FEATURE_COLOURS[0]) > 20
    assert count_colour(loc_rows, matches.FEATURE_COLOURS[0]) == 0  # two panels, one colour each
    top = panel(fig, 0, 0, 96, 96)
    assert count_colour(top, matches.CROP_COLOURS[0]) > 0 and count_colour(top, matches.CROP_COLOURS[1]) > 0


# ----------------------------------------------------------------------------- curves

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib draws the curves (requirements-dev.txt)")
TAB10 = {"C0": (31, 119, 180), "C1": (255, 127, 14)}  # matplotlib's first two default colours

STATS = [
    "main_vicregl.py --dataset builtin --arch resnet_test --exp-dir exp",
    {"ep": 0, "st": 0, "lr": 0.0, "t": "000000001", "inv_l": 5.0, "var_l": 16.0, "cov_l": 0.5, "minv_l": 8.0,
     "mvar_l": 34.0, "mcov_l": 0.2, "cls_l": 2.3, "top1": 10.0, "top5": 50.0, "l": 30.0},
    {"ep": 0, "st": 9, "lr": 1e-4, "t": "000000005", "inv_l": 4.0, "var_l": 12.0, "cov_l": 0.7, "minv_l": 7.0,
     "mvar_l": 30.0, "mcov_l": 0.3, "cls_l": 2.1, "top1": 20.0, "top5": 60.0, "l": 25.0},
    "Val: " + json.dumps({"ep": 0, "clsl_val": 2.2, "top1_val": 15.0, "top5_val": 55.0}),
    {"ep": 1, "st": 14, "lr": 2e-4, "t": "000000009", "inv_l": 3.0, "var_l": 10.0, "cov_l": 0.9, "minv_l": 6.0,
     "mvar_l": 28.0, "mcov_l": 0.4, "cls_l": 2.0, "top1": 25.0, "top5": 65.0, "l": 22.0},
    "main_vicregl.py --dataset builtin --arch resnet_test --exp-dir exp",  # resumed: redoes step 14
    {"ep": 1, "st": 14, "lr": 2e-4, "t": "000000010", "inv_l": 2.5, "var_l": 10.0, "cov_l": 0.9, "minv_l": 6.0,
     "mvar_l": 28.0, "mcov_l": 0.4, "cls_l": 2.0, "top1": 25.0, "top5": 65.0, "l": 21.0},
    {"ep": 1, "st": 19, "lr": 1e-4, "t": "000000012", "inv_l": 2.0, "var_l": 9.0, "cov_l": 1.0, "minv_l": 5.0,
     "mvar_l": 27.0, "mcov_l": 0.5, "cls_l": 1.9, "top1": 30.0, "top5": 70.0, "l": 20.0},
    "Val: " + json.dumps({"ep": 1, "clsl_val": 1.9, "top1_val": 28.0, "top5_val": 66.0}),
    '{"ep": 2, "st": 20, "inv_l": 1.',  # cut off by a crash
]


def expected_series(key):
    """(steps, values) of ``key`` straight from STATS: a training metric's last value at each step (step 14
    is logged twice), a validation metric at the last step of its epoch."""
    rows = [x for x in STATS if isinstance(x, dict)]
    if key.endswith("_val"):
        vals = [json.loads(x[len("Val:"):]) for x in STATS if isinstance(x, str) and x.startswith("Val:")]
        points = {max(r["st"] for r in rows if r["ep"] == v["ep"]): v[key] for v in vals}
    else:
        points = {r["st"]: r[key] for r in rows}
    return sorted(points), [points[s] for s in sorted(points)]


@pytest.fixture
def stats_file(tmp_path):
    exp = tmp_path / "run_a"
    exp.mkdir()
    (exp / "stats.txt").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in STATS) + "\n")
    return exp / "stats.txt"


def test_read_stats(stats_file):
    run = curves.read_stats(str(stats_file.parent))  # the experiment folder works too
    assert run.label == "run_a" and len(run.commands) == 2 and run.skipped == 1
    assert run.series["inv_l"] == ([0, 9, 14, 19], [5.0, 4.0, 2.5, 2.0])  # step 14 keeps its last value
    assert run.series["top1_val"] == ([9, 19], [15.0, 28.0])  # at the last step of epochs 0 and 1
    assert "t" not in run.series and "ep" not in run.series


def panels_by_key(fig):
    """{key: Axes} from each plot's title "key: description"."""
    return {ax.get_title(loc="left").split(":")[0]: ax for ax in fig.axes}


def xy(line):
    return np.asarray(line.get_xdata(), dtype=float).tolist(), np.asarray(line.get_ydata(), dtype=float).tolist()


@needs_matplotlib
def test_curves_figure_plots_what_stats_txt_says(stats_file):
    run = curves.read_stats(str(stats_file))
    fig = curves.curves_figure([run])
    panels = panels_by_key(fig)
    assert list(panels) == list(curves.DEFAULT_KEYS)  # all ten are in the file, in this order
    for key, ax in panels.items():
        (line,) = ax.get_lines()
        assert xy(line) == expected_series(key), key
        assert line.get_label() == "run_a" and line.get_color() == "C0"
        assert any(line.get_markevery()) == key.endswith("_val")  # validation points are marked
        assert curves.KEY_NAMES[key] in ax.get_title(loc="left")
        assert ax.get_xlabel() == "step" and ax.get_xlim() == (0, 19)  # the same step range in every plot
        assert ax.get_xscale() == ax.get_yscale() == "linear"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run_a (last step 19)"]
    # Two runs: one line each per plot, a colour each, both in the legend.
    fig = curves.curves_figure([run, curves.read_stats(str(stats_file), "b")], keys=["l", "lr"])
    panels = panels_by_key(fig)
    assert list(panels) == ["l", "lr"]
    for key, ax in panels.items():
        lines = ax.get_lines()
        assert [(ln.get_label(), ln.get_color()) for ln in lines] == [("run_a", "C0"), ("b", "C1")]
        assert all(xy(ln) == expected_series(key) for ln in lines)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run_a (last step 19)", "b (last step 19)"]


@needs_matplotlib
def test_curves_gaps_at_non_finite_values():
    nan, inf = float("nan"), float("inf")
    run = curves.RunStats("p", "x", series={"l": ([0, 1, 2, 3, 4, 5, 6], [1.0, 2.0, nan, 3.0, inf, 4.0, 5.0]),
                                         "lr": ([0, 6], [nan, nan])})
    panels = panels_by_key(curves.curves_figure([run], keys=["l", "lr"]))
    (line,) = panels["l"].get_lines()
    steps, values = xy(line)
    assert steps == [0, 1, 2, 3, 4, 5, 6] and values[:2] == [1.0, 2.0] and values[5:] == [4.0, 5.0]
    assert np.isnan(values[2]) and values[3] == 3.0 and np.isnan(values[4])  # infinity is a gap too
    assert list(line.get_markevery()) == [False, False, False, True, False, False, False]  # the lone point
    assert [t.get_text() for t in panels["lr"].texts] == ["no finite values"]


@needs_matplotlib
def test_render_curves_layout_and_content(stats_file):
    run = curves.read_stats(str(stats_file))
    fig = curves.render_curves([run], cols=4, panel_size=(160, 120))
    rows = -(-len(curves.DEFAULT_KEYS) // 4)
    assert fig.mode == "RGB" and fig.size == figure_wh(rows, 4, 160, 120)
    for n in range(len(curves.DEFAULT_KEYS)):
        assert count_colour(panel(fig, n // 4, n % 4, 160, 120), TAB10["C0"]) > 30  # a drawn curve in every plot
    assert panel(fig, rows - 1, 3, 160, 120).std() == 0  # the grid's unused cells stay blank
    # The legend takes a line per plot column's worth of runs: 3 runs over 1 column, 2 lines more.
    three = curves.render_curves([run] * 3, keys=["l"], panel_size=(160, 120))
    assert three.size == curves.curves_size(1, 1, 160, 120, 3) == (figure_wh(1, 1, 160, 120)[0],
                                                                 figure_wh(1, 1, 160, 120)[1] + 2 * draw.LABEL_H)


@needs_matplotlib
def test_curves_cli(stats_file, tmp_path, capsys):
    other = tmp_path / "b.txt"
    other.write_text(stats_file.read_text())
    run_main("curves", stats_file, other, "--labels", "first", "second", "--keys", "l", "top1_val", "lr")
    out = stats_file.parent / "curves.png"  # default: next to the first stats file
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == figure_wh(1, 3, 240, 170)
        assert im.info["dpi"] == pytest.approx((curves.CURVES_DPI, curves.CURVES_DPI), abs=0.01)
        assert count_colour(np.asarray(im), TAB10["C1"]) > 100  # the second run, drawn over the first
    assert "wrote" in capsys.readouterr().out
    run_main("curves", stats_file, "--panel-size", 200, 150, "--cols", 2, "--palette", "--out", tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P" and im.size == figure_wh(5, 2, 200, 150)
    assert "top9" in user_error(capsys, "curves", stats_file, "--keys", "top9", "--out", tmp_path / "x.png")
    assert "not found" in user_error(capsys, "curves", tmp_path / "missing.txt")
    assert not (tmp_path / "x.png").exists()


def test_curves_without_matplotlib_is_one_line_and_the_rest_works(stats_file, tmp_path):
    """matplotlib hidden (None in sys.modules makes every import of it fail): features still draws, and
    curves exits 2 with one line that says what to install."""
    argv = ["features", "--random", "--arch", "resnet_test", "--small-input", "--builtin-index", "0",
            "--builtin-size", "32", "--size", "32", "--panel", str(PANEL), "--out", str(tmp_path / "f.png")]
    code = ("import sys; sys.modules['matplotlib'] = None; import visualize; "
            f"visualize.main({argv!r}); visualize.main(['curves', {str(stats_file)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert proc.stderr == "error: visualize.py curves needs matplotlib: pip install matplotlib\n"
    assert (tmp_path / "f.png").is_file() and not (stats_file.parent / "curves.png").exists()


# ----------------------------------------------------------------------------- backbones and CLI


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A small-input resnet_test exported as backbone.pth (plain keys), in its own experiment folder."""
    exp = tmp_path_factory.mktemp("exp")
    torch.manual_seed(3)
    net, _ = models.build_backbone("resnet_test", small_input=True)
    torch.save(net.state_dict(), exp / "backbone.pth")
    return exp / "backbone.pth", net


def test_features_cli_from_backbone_file_guesses_arch(backbone_file, capsys):
    path, net = backbone_file
    loaded = vis.load_backbone(str(path))
    assert (loaded.arch, loaded.small_input) == ("resnet_test", True)  # guessed from the shapes
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.backbone(x)[0], net.eval()(x)[0])
    # With --arch alone the small-input stem is still read from the weights (conv1's shape).
    run_main("features", "--checkpoint", path, "--arch", "resnet_test", "--builtin-index", 0, 1, 2,
             "--builtin-size", 32, "--size", 32, "--panel", PANEL, "--compare-random")
    with Image.open(path.parent / "features.png") as im:  # default: next to the checkpoint
        assert im.format == "PNG" and im.mode == "RGB" and im.size == figure_wh(3, 3, PANEL, PANEL)
        trained, random = panel(im, 0, 1), panel(im, 0, 2)
        assert n_colours(trained) >= 4 and n_colours(random) >= 4 and not np.array_equal(trained, random)


def test_features_cli_compares_backbone_files_side_by_side(backbone_file, tmp_path, capsys):
    """--random as the first column, then --compare files: each column is its own network's PCA, so the
    same weights give the same panel and other weights another one."""
    path, _ = backbone_file
    torch.manual_seed(11)
    other, _ = models.build_backbone("resnet_test", small_input=True)
    (tmp_path / "vicreg").mkdir()
    torch.save(other.state_dict(), tmp_path / "vicreg" / "backbone.pth")
    out = tmp_path / "three.png"
    run_main("features", "--random", "--arch", "resnet_test", "--small-input", "--label", "random", "--compare",
             f"mine={path}", tmp_path / "vicreg" / "backbone.pth", "--builtin-index", 0, 1, "--builtin-size", 32,
             "--size", 32, "--panel", PANEL, "--out", out)
    run_main("features", "--checkpoint", path, "--builtin-index", 0, 1, "--builtin-size", 32, "--size", 32,
             "--panel", PANEL, "--out", tmp_path / "alone.png")
    with Image.open(out) as im, Image.open(tmp_path / "alone.png") as alone:
        assert im.size == figure_wh(2, 4, PANEL, PANEL)
        for row in range(2):
            random, mine, vicreg = (panel(im, row, col) for col in (1, 2, 3))
            assert np.array_equal(mine, panel(alone, row, 1))  # the file's own column, as when shown alone
            assert not np.array_equal(mine, vicreg) and not np.array_equal(random, mine)
    err = user_error(capsys, "features", "--checkpoint", path, "--compare", f"x={tmp_path}/missing.pth",
                     "--out", tmp_path / "y.png")
    assert "missing.pth" in err and not (tmp_path / "y.png").exists()


def test_model_pth_reads_saved_args(tmp_path, capsys):
    torch.manual_seed(4)
    net, _ = models.build_backbone("convnext_test")
    model = {f"module.backbone.{k}": v for k, v in net.state_dict().items()}
    model["module.projector.0.weight"] = torch.zeros(8, 64)
    torch.save({"epoch": 1, "model": model, "args": {"arch": "convnext_test", "small_input": False}},
               tmp_path / "model.pth")
    loaded = vis.load_backbone(str(tmp_path / "model.pth"))
    assert loaded.arch == "convnext_test" and not loaded.small_input
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.backbone.state_dict().items())
    run_main("matches", "--checkpoint", tmp_path / "model.pth", "--builtin-size", 64, "--size-crops", 64, 64,
             "--panel", 64, "--out", tmp_path / "m.png", "--palette")
    with Image.open(tmp_path / "m.png") as im:  # --palette: 256 colours, same layout
        assert im.mode == "P" and im.size == figure_wh(3, 2, 64, 64) and np.asarray(im.convert("RGB")).std() > 0
    # A saved small-input ResNet is rebuilt with the small-input stem from args alone.
    torch.manual_seed(5)
    small, _ = models.build_backbone("resnet_test", small_input=True)
    torch.save({"model": {f"module.backbone.{k}": v for k, v in small.state_dict().items()},
                "args": {"arch": "resnet_test", "small_input": True}}, tmp_path / "small.pth")
    assert vis.load_backbone(str(tmp_path / "small.pth")).small_input


def test_hub_with_weights(tmp_path):
    """--hub NAME --weights FILE draws with that file's weights: two files give two pictures, and a
    file gives the picture that --checkpoint draws from the same file."""
    torch.manual_seed(6)
    net, _ = models.build_backbone("resnet50")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(sd, tmp_path / "a.pth")
    torch.save(sd | {"conv1.weight": -sd["conv1.weight"]}, tmp_path / "b.pth")  # other weights, same shapes

    def pca_panel(name, *source):
        out = tmp_path / f"{name}.png"
        run_main("features", *source, "--builtin-index", 0, "--builtin-size", 32, "--size", 64, "--panel", PANEL,
                 "--out", out)
        with Image.open(out) as im:
            assert im.size == figure_wh(1, 2, PANEL, PANEL)
            return panel(im.convert("RGB"), 0, 1)

    a = pca_panel("hub_a", "--hub", "resnet50_alpha0p9", "--weights", tmp_path / "a.pth")
    b = pca_panel("hub_b", "--hub", "resnet50_alpha0p9", "--weights", tmp_path / "b.pth")
    assert n_colours(a) >= 4  # 2x2 cells of distinct features
    assert not np.array_equal(a, b)
    assert np.array_equal(a, pca_panel("checkpoint_a", "--checkpoint", tmp_path / "a.pth"))


def test_hub_offline_is_a_user_error(monkeypatch, capsys, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    err = user_error(capsys, "features", "--hub", "resnet50_alpha0p9", "--out", tmp_path / "f.png")
    assert "--weights" in err


def test_random_backbone(images):
    a = vis.load_backbone(random_init=True, arch="convnext_test", seed=1)
    b = vis.load_backbone(random_init=True, arch="convnext_test", seed=1)
    assert a.source == "random init" and not a.backbone.training
    assert all(torch.equal(x, y) for x, y in zip(a.backbone.parameters(), b.backbone.parameters()))


def test_user_errors(capsys, tmp_path, backbone_file):
    out = ["--out", tmp_path / "x.png"]
    assert "not found" in user_error(capsys, "features", "--checkpoint", tmp_path / "nope.pth", *out)
    assert "unknown --arch" in user_error(capsys, "features", "--random", "--arch", "resnet9000", *out)
    assert "unknown --hub" in user_error(capsys, "matches", "--hub", "resnet51_alpha0p9", "--random", *out)
    assert "image not found" in user_error(capsys, "features", "--random", "--arch", "resnet_test",
                                           "--image", tmp_path / "none.jpg", *out)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert "cannot read image" in user_error(capsys, "features", "--random", "--arch", "resnet_test",
                                             "--image", bad, *out)
    assert "--weights goes with --hub" in user_error(capsys, "features", "--checkpoint", backbone_file[0],
                                                     "--weights", backbone_file[0], *out)
    assert "one backbone source" in user_error(capsys, "features", *out)
    assert "ResNet backbones only" in user_error(capsys, "features", "--random", "--arch", "convnext_test",
                                                 "--small-input", *out)
    # Weights that do not fit the asked architecture: the strict loader's explanation, naming the file.
    err = user_error(capsys, "features", "--checkpoint", backbone_file[0], "--arch", "resnet18", *out)
    assert str(backbone_file[0]) in err and "resnet_test" in err
    assert "--num_matches" in user_error(capsys, "matches", "--random", "--arch", "resnet_test", "--small-input",
                                         "--size-crops", 32, 32, "--num_matches", 17, 4, "--builtin-size", 32, *out)
    assert not (tmp_path / "x.png").exists()


def test_help_reads_well(capsys):
    for command in ("features", "matches", "curves"):
        with pytest.raises(SystemExit) as exc:
            run_main(command, "--help")
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--out" in text and "show this help" in text
        if command != "curves":
            assert "--checkpoint" in text and "--hub" in text and "--random" in text


def test_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "visualize.py", "features", "--checkpoint", str(tmp_path / "none.pth")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not found" in proc.stderr
