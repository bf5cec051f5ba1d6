"""Tests of transforms.py: location grids, multi-crop structure, the published augmentation
constants and probabilities (pinned with literal numbers), colour operations, the evaluation
transform, and the fast transform's equivalence with the published pipeline (pixel by pixel for
given random parameters, and in distribution with independent randomness against a pipeline
written in this file from torchvision and PIL with literal constants)."""
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

import builtin_data
import transforms as tr
from bench.reference_transforms import ReferenceMultiCropTransform

BICUBIC = TF.InterpolationMode.BICUBIC


@pytest.fixture(autouse=True)
def one_thread():
    """Transforms run in DataLoader workers, which use one thread; so do these tests (the
    reference pipeline's small tensor ops are very slow with threads on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jpeg_bytes(width, height, seed=0, quality=90):
    buf = io.BytesIO()
    builtin_data.synthetic_photo(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_jpeg():
    return jpeg_bytes(240, 180)


def open_jpeg(data):
    return Image.open(io.BytesIO(data))  # lazily opened, as the datasets hand it over


# ------------------------------------------------------------------------------------------
# Location grids
# ------------------------------------------------------------------------------------------

def test_location_grid_reproduces_reference_vectors(data_dir):
    cases = torch.load(data_dir / "location_grids.pt", weights_only=True)
    assert len(cases) > 0
    for case in cases:
        grid = tr.location_grid(case["crop"], case["N"], flip=case["flip"])
        assert grid.dtype == torch.float32 and grid.shape == case["grid"].shape
        # The reference summed cell sizes in float32: equal up to float32 rounding.
        torch.testing.assert_close(grid, case["grid"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12])
def test_location_grid_properties(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        i, j, h, w, H, W = tr.sample_crop(300, 400, (0.05, 1.0), generator=gen)
        grid = tr.location_grid((i, j, h, w, H, W), n)
        rows, cols = grid[..., 0], grid[..., 1]
        # Cell centres lie strictly inside the crop, on a regular lattice of step h/N, w/N.
        assert rows.min() > i and rows.max() < i + h and cols.min() > j and cols.max() < j + w
        assert torch.allclose(rows[:, 0], i + (torch.arange(n) + 0.5) * h / n)
        assert torch.allclose(cols[0], j + (torch.arange(n) + 0.5) * w / n)
        assert torch.equal(rows, rows[:, :1].expand(n, n)) and torch.equal(cols, cols[:1].expand(n, n))
        # Flip mirrors the columns and leaves the rows.
        torch.testing.assert_close(tr.location_grid((i, j, h, w, H, W), n, flip=True), grid.flip(1))


def test_default_grid_size_is_stride_32():
    assert [tr.default_grid_size(s) for s in (224, 96, 384, 64, 100, 32)] == [7, 3, 12, 2, 3, 1]
    with pytest.raises(ValueError, match="--size-crops"):
        tr.default_grid_size(16)


def test_check_grid_sizes_names_the_mismatch():
    tr.check_grid_sizes([224, 96], [7, 3], [7, 3])
    # ResNet's padded convolutions round up: a 100 px crop gives a 4×4 map, not 100 // 32 = 3.
    with pytest.raises(ValueError, match=r"--size-crops 100: resnet50 gives a 4x4 .* 3x3"):
        tr.check_grid_sizes([224, 100], [7, 3], [7, 4], arch="resnet50")


# ------------------------------------------------------------------------------------------
# Crop sampling
# ------------------------------------------------------------------------------------------

def test_crop_sampling_bounds_and_fallback():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        i, j, h, w, H, W = tr.sample_crop(120, 200, (0.1, 0.6), generator=gen)
        assert (H, W) == (120, 200)
        assert 0 <= i and i + h <= H and 0 <= j and j + w <= W
        assert 0.1 * 0.8 <= h * w / (H * W) <= 0.6 * 1.2  # rounding of h and w aside
    # A 10×1000 strip admits no crop of scale 0.9 and ratio in (3/4, 4/3): all 10 tries fail and
    # torchvision's central fallback (ratio clamped to 4/3) is taken, the same as torchvision's.
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    assert tr.sample_crop(10, 1000, (0.9, 1.0), generator=gen)[:4] == tuple(expected)


# ------------------------------------------------------------------------------------------
# The published augmentation, pinned with literal numbers (never read from transforms.py)
# ------------------------------------------------------------------------------------------

MEAN = (0.485, 0.456, 0.406)
PRETRAIN_STD = (0.228, 0.224, 0.225)  # (sic) the red std the published models were trained with
EVAL_STD = (0.229, 0.224, 0.225)


def test_augmentation_constants_are_the_published_ones():
    assert tr.JITTER == dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    assert tr.JITTER_P == 0.8 and tr.GRAYSCALE_P == 0.2
    assert tuple(tr.BLUR_SIGMA) == (0.1, 2.0) and tr.SOLARIZE_THRESHOLD == 128
    assert tuple(tr.IMAGENET_MEAN) == MEAN
    assert tuple(tr.PRETRAIN_STD) == PRETRAIN_STD and tuple(tr.EVAL_STD) == EVAL_STD
    # Crops with an even index inside their group are always blurred and never solarised.
    assert [tr.blur_probability(k) for k in range(6)] == [1.0, 0.1] * 3
    assert [tr.solarize_probability(k) for k in range(6)] == [0.0, 0.2] * 3
    for transform in (tr.MultiCropTrainDataTransform(), ReferenceMultiCropTransform()):
        assert transform.ratio == (3 / 4, 4 / 3)
        assert transform.scales == [(0.4, 1.0), (0.08, 0.4)] and transform.num_crops == [2, 6]


def test_reference_pipeline_is_built_with_the_published_operations():
    """ReferenceMultiCropTransform (the benchmark's oracle) composes torchvision's
    operations with the published strengths and probabilities."""
    reference = ReferenceMultiCropTransform()
    assert all(c.ratio == (3 / 4, 4 / 3) and c.interpolation == BICUBIC for c in reference.crop_transforms)
    assert reference.flip.p == 0.5
    for k, ops in enumerate(reference.colour_transforms):
        index = reference.view_groups[k][1]
        jitter, gray, blur, solarize, _, normalize = ops.transforms
        assert jitter.p == 0.8 and gray.p == 0.2
        cj = jitter.transforms[0]
        assert [*cj.brightness, *cj.contrast, *cj.saturation, *cj.hue] == pytest.approx(
            [0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
        assert (blur.p, solarize.p) == ((1.0, 0.0) if index % 2 == 0 else (0.1, 0.2))
        assert tuple(normalize.mean) == MEAN and tuple(normalize.std) == PRETRAIN_STD


def sampled_parameters(num_images=500):
    """The fast transform's random parameters for num_images 1000×1000 images with the default
    groups (2 crops of 224, 6 of 96): a list of (group, index in group, ViewParams)."""
    transform = tr.MultiCropTrainDataTransform(generator=torch.Generator().manual_seed(0))
    rows = []
    for _ in range(num_images):
        params = transform.sample_params(1000, 1000)
        rows += [(g, k, p) for (g, k), p in zip(transform.view_groups, params)]
    return rows


def test_sampled_parameters_follow_the_published_distribution():
    """Rates and ranges of the fast transform's random choices over 4000 views (fixed seed, so
    deterministic), against the published values. The tolerances are about 4 standard errors."""
    rows = sampled_parameters()
    views = [p for _, _, p in rows]
    even = [p for _, k, p in rows if k % 2 == 0]
    odd = [p for _, k, p in rows if k % 2 == 1]
    assert len(even) == len(odd) == 2000

    def rate(ps, pred):
        return np.mean([pred(p) for p in ps])

    assert rate(views, lambda p: p.jitter is not None) == pytest.approx(0.8, abs=0.03)
    assert rate(views, lambda p: p.gray) == pytest.approx(0.2, abs=0.03)
    assert rate(views, lambda p: p.flip) == pytest.approx(0.5, abs=0.035)
    assert rate(even, lambda p: p.blur_sigma is not None) == 1.0
    assert rate(odd, lambda p: p.blur_sigma is not None) == pytest.approx(0.1, abs=0.03)
    assert rate(even, lambda p: p.solarize) == 0.0
    assert rate(odd, lambda p: p.solarize) == pytest.approx(0.2, abs=0.04)
    # Jitter factors are uniform in [1 - s, 1 + s] (hue in [-0.1, 0.1]): they fill the whole range.
    factors = np.array([p.jitter for p in views if p.jitter is not None])  # (n, 4)
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= factors[:, column].min() < lo + 0.01 and hi - 0.01 < factors[:, column].max() <= hi
    assert len({p.order for p in views if p.jitter is not None}) == 24  # every order of the 4 operations
    sigmas = np.array([p.blur_sigma for p in views if p.blur_sigma is not None])
    assert 0.1 <= sigmas.min() < 0.11 and 1.99 < sigmas.max() <= 2.0
    # Crops: aspect ratio in (3/4, 4/3) and area fraction in the group's scale range (up to rounding).
    for group, (lo, hi) in enumerate([(0.4, 1.0), (0.08, 0.4)]):
        crops = np.array([p.crop[2:4] for g, _, p in rows if g == group], float)  # (n, 2): h, w
        aspect, area = crops[:, 1] / crops[:, 0], crops.prod(1) / 1e6
        assert 3 / 4 - 0.01 < aspect.min() < 0.77 and 1.3 < aspect.max() < 4 / 3 + 0.01
        # (Near-whole crops of a square image fit only with an aspect ratio close to 1: max < 1.)
        assert lo - 0.005 < area.min() < lo + 0.01 and hi - 0.05 < area.max() < hi + 0.005


@pytest.mark.parametrize("blur_p,even_rate,odd_rate", [((0.0, 0.0), 0.0, 0.0), ((0.5, 1.0), 0.5, 1.0)])
def test_blur_probabilities_can_be_chosen(blur_p, even_rate, odd_rate):
    """--blur-prob EVEN ODD: the blur's rate on crops with an even and an odd index in their group
    (2000 of each, fixed seed; 0.035 is about 3 standard errors at p 0.5); the other choices keep
    their published rates."""
    transform = tr.MultiCropTrainDataTransform(generator=torch.Generator().manual_seed(0), blur_p=blur_p)
    rows = [(k, p) for _ in range(500)
            for (_, k), p in zip(transform.view_groups, transform.sample_params(1000, 1000))]
    even = [p.blur_sigma is not None for k, p in rows if k % 2 == 0]
    odd = [p.blur_sigma is not None for k, p in rows if k % 2 == 1]
    assert np.mean(even) == pytest.approx(even_rate, abs=0.035)
    assert np.mean(odd) == pytest.approx(odd_rate, abs=0.035)
    assert np.mean([p.solarize for k, p in rows if k % 2 == 1]) == pytest.approx(0.2, abs=0.04)
    with pytest.raises(ValueError, match="blur probabilities"):
        tr.MultiCropTrainDataTransform(blur_p=(1.5, 0.1))


# ------------------------------------------------------------------------------------------
# Structure of the transforms and argument checks
# ------------------------------------------------------------------------------------------

def test_train_transform_structure(photo_jpeg):
    transform = tr.MultiCropTrainDataTransform()
    views, locations = transform(open_jpeg(photo_jpeg))
    assert len(views) == len(locations) == 8
    for v, (view, grid) in enumerate(zip(views, locations)):
        size, n = (224, 7) if v < 2 else (96, 3)
        assert view.shape == (3, size, size) and view.dtype == torch.float32
        assert view.is_contiguous() and torch.isfinite(view).all()
        assert grid.shape == (n, n, 2) and grid.dtype == torch.float32
        # Normalised pixels span [-mean/std, (1 - mean)/std].
        assert view.min() >= -0.485 / 0.228 - 1e-4 and view.max() <= (1 - 0.406) / 0.225 + 1e-4


@pytest.mark.parametrize("sizes,counts,grids,expected_grids", [
    ([100, 33], [1, 2], None, [3, 1]),
    ([64, 32, 48], [2, 1, 3], [4, 2, 3], [4, 2, 3]),
    ([17], [2], [1], [1]),
])
def test_any_crop_size(sizes, counts, grids, expected_grids):
    transform = tr.MultiCropTrainDataTransform(sizes, counts, [0.2] * len(sizes), [1.0] * len(sizes),
                                               grid_sizes=grids)
    img = builtin_data.synthetic_photo(90, 70)  # smaller than some crops: upsampling must work
    views, locations = transform(img)
    expected = [(s, n) for s, c, n in zip(sizes, counts, expected_grids) for _ in range(c)]
    assert [(v.shape[-1], g.shape[0]) for v, g in zip(views, locations)] == expected
    assert all(v.shape[0] == 3 for v in views)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_give_three_channels(mode):
    img = builtin_data.synthetic_photo(120, 90).convert(mode)
    views, _ = tr.MultiCropTrainDataTransform([64, 32], [1, 1])(img)
    assert [v.shape for v in views] == [(3, 64, 64), (3, 32, 32)]


@pytest.mark.parametrize("kwargs,flag", [
    (dict(size_crops=[224, 96], num_crops=[2]), "--num-crops"),
    (dict(min_scale_crops=[0.4]), "--min_scale_crops"),
    (dict(max_scale_crops=[1.0, 0.4, 0.2]), "--max_scale_crops"),
    (dict(min_scale_crops=[0.0, 0.08]), "--min_scale_crops"),
    (dict(max_scale_crops=[1.5, 0.4]), "--max_scale_crops"),
    (dict(min_scale_crops=[0.4, 0.5]), "--min_scale_crops"),
    (dict(size_crops=[224, 0]), "--size-crops"),
    (dict(num_crops=[2, 0]), "--num-crops"),
    (dict(size_crops=[224, 16]), "--size-crops"),
    (dict(grid_sizes=[7, 0]), "grid sizes"),
    (dict(grid_sizes=[7]), "grid_sizes"),
])
def test_invalid_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        tr.MultiCropTrainDataTransform(**kwargs)
    with pytest.raises(ValueError, match=flag):
        tr.MultiCropValDataTransform(**kwargs)


def test_generator_makes_views_reproducible(photo_jpeg):
    def run(seed):
        transform = tr.MultiCropTrainDataTransform([64, 32], [2, 2], generator=torch.Generator().manual_seed(seed))
        return transform(open_jpeg(photo_jpeg))

    (v1, l1), (v2, l2), (v3, _) = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(v1 + l1, v2 + l2))
    assert not torch.equal(v1[0], v3[0])


def test_no_flip_grid_default_keeps_grids_unflipped(photo_jpeg):
    def flipped_fraction(no_flip_grid):
        transform = tr.MultiCropTrainDataTransform([64, 32], [2, 2], no_flip_grid=no_flip_grid, grid_sizes=[4, 2],
                                                   generator=torch.Generator().manual_seed(0))
        flags = []
        for _ in range(50):
            _, locations = transform(open_jpeg(photo_jpeg))
            flags += [bool(g[0, 1, 1] < g[0, 0, 1]) for g in locations]  # columns decreasing
        return np.mean(flags)

    assert flipped_fraction(True) == 0.0
    assert 0.35 < flipped_fraction(False) < 0.65


def test_flip_mirrors_the_view_and_the_grid(photo_jpeg):
    transform = tr.MultiCropTrainDataTransform([64], [2], [0.3], [1.0], no_flip_grid=False)
    crop = tr.sample_crop(180, 240, (0.3, 1.0), generator=torch.Generator().manual_seed(3))
    plain = tr.ViewParams(crop, False, None, (0, 1, 2, 3), False, None, False)
    flipped = tr.ViewParams(crop, True, None, (0, 1, 2, 3), False, None, False)
    a, b = transform.render(open_jpeg(photo_jpeg), [plain, flipped])
    assert torch.equal(b, a.flip(-1))
    grids = transform.locations([crop, crop], [False, True])
    assert torch.equal(grids[1], grids[0].flip(1))


def test_val_transform(photo_jpeg):
    size = 100
    transform = tr.MultiCropValDataTransform([size, 48], [1, 2])
    val_view, (views, locations) = transform(open_jpeg(photo_jpeg))
    # Shorter side to int(100·256/224) = 114, centre crop 100, std 0.228 for red (sic).
    img = open_jpeg(photo_jpeg).convert("RGB")
    expected = TF.to_tensor(TF.center_crop(TF.resize(img, 114, BICUBIC, antialias=True), size))
    expected = TF.normalize(expected, [0.485, 0.456, 0.406], [0.228, 0.224, 0.225])
    torch.testing.assert_close(val_view, expected)
    assert [v.shape[-1] for v in views] == [100, 48, 48]
    assert [g.shape[0] for g in locations] == [3, 1, 1]


@pytest.mark.parametrize("width,height", [(420, 300), (300, 420)])
def test_eval_transform_resizes_the_shorter_side_then_centre_crops(width, height):
    """Linear-probe validation and k-NN: shorter side to 256 with PIL's bilinear filter (torchvision's
    default, which the original evaluation used), centre crop 224, mean (0.485, 0.456, 0.406), std
    (0.229, 0.224, 0.225). Oracle: PIL and numpy with the box computed here by hand."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    # Shorter side 300 -> 256, longer 420 -> int(420·256/300) = 358; crop offsets (358-224)/2 = 67
    # and (256-224)/2 = 16.
    new_size, box = ((358, 256), (67, 16, 291, 240)) if width > height else ((256, 358), (16, 67, 240, 291))
    expected = np.asarray(img.resize(new_size, Image.BILINEAR).crop(box), np.float32) / 255.0  # (224, 224, 3)
    expected = (expected - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = tr.eval_transform()(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(expected.transpose(2, 0, 1)).float(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Colour operations against torchvision / PIL
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crop_image():
    return builtin_data.synthetic_photo(160, 120, seed=1).resize((96, 96), Image.BICUBIC)


def levels(a, b):
    """Absolute differences in grey levels (0..255) between two [0, 1] images."""
    return (a - b).abs() * 255


@pytest.mark.parametrize("factor", [0.6, 0.9, 1.25, 1.4])
def test_jitter_ops_match_torchvision(crop_image, factor):
    x = TF.to_tensor(crop_image)
    # torchvision's tensor ops use the same float formulas (gray weight 0.2989 vs PIL's 0.299).
    for ours, theirs in [(tr.adjust_brightness_, TF.adjust_brightness),
                         (tr.adjust_contrast_, TF.adjust_contrast),
                         (tr.adjust_saturation_, TF.adjust_saturation)]:
        assert levels(ours(x.clone(), factor), theirs(x, factor)).max() < 0.1
        # Against PIL (the reference's backend), which rounds down to uint8 after each op.
        pil = TF.to_tensor(theirs(crop_image, factor))
        assert levels(ours(x.clone(), factor), pil).max() <= 1.5


@pytest.mark.parametrize("shift", [-0.1, -0.04, 0.0, 0.03, 0.1, 0.5])
def test_hue_matches_torchvision(crop_image, shift):
    x = TF.to_tensor(crop_image)
    assert levels(tr.adjust_hue_(x.clone(), shift), TF.adjust_hue(x, shift)).max() < 0.05
    # PIL quantises the hue to 256 steps and truncates the shift: close, not equal.
    pil = TF.to_tensor(TF.adjust_hue(crop_image, shift))
    assert levels(tr.adjust_hue_(x.clone(), shift), pil).mean() < 1.5


def test_hue_batched_per_sample_shift(crop_image):
    x = TF.to_tensor(crop_image)
    batch = torch.stack([x, x])
    out = tr.adjust_hue_(batch.clone(), torch.tensor([0.05, -0.08]).view(2, 1, 1, 1))
    torch.testing.assert_close(out[0], tr.adjust_hue_(x.clone(), 0.05))
    torch.testing.assert_close(out[1], tr.adjust_hue_(x.clone(), -0.08))


def test_grayscale_and_solarize_match_pil(crop_image):
    x = TF.to_tensor(crop_image)
    assert levels(tr.to_grayscale_(x.clone()), TF.to_tensor(crop_image.convert("L").convert("RGB"))).max() <= 1.0
    torch.testing.assert_close(tr.solarize_(x.clone()), TF.to_tensor(ImageOps.solarize(crop_image, 128)))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.2, 2.0])
def test_blur_matches_pil(crop_image, sigma):
    x = TF.to_tensor(crop_image)
    ours = tr.gaussian_blur(x[None], [sigma])[0]
    pil = TF.to_tensor(crop_image.filter(ImageFilter.GaussianBlur(radius=sigma)))
    # PIL approximates the Gaussian by three box blurs of the same variance.
    diff = levels(ours, pil)
    assert diff.mean() < 1.0 and diff.max() < 12
    # A batch with different sigmas equals the samples blurred one by one, up to float rounding:
    # a view's kernel does not depend on the other views of its batch (collate_views blurs whole
    # batches, and two processes' halves of a batch must give what one process gives).
    batch = tr.gaussian_blur(torch.stack([x, x.flip(-1)]), [sigma, 2.0])
    torch.testing.assert_close(batch[0], ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[1], tr.gaussian_blur(x.flip(-1)[None], [2.0])[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The fast transform against the reference pipeline
# ------------------------------------------------------------------------------------------

def render_like_reference(img, params, transform):
    """The reference's PIL/torchvision operations applied with given parameters."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    views = []
    for (g, _), p in zip(transform.view_groups, params):
        size = transform.size_crops[g]
        i, j, h, w = p.crop[:4]
        view = TF.resized_crop(img, i, j, h, w, [size, size], BICUBIC, antialias=True)
        if p.flip:
            view = TF.hflip(view)
        if p.jitter is not None:
            for op in p.order:
                view = ops[op](view, p.jitter[op])
        if p.gray:
            view = TF.rgb_to_grayscale(view, 3)
        if p.blur_sigma is not None:
            view = view.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
        if p.solarize:
            view = ImageOps.solarize(view, 128)
        views.append(TF.normalize(TF.to_tensor(view), MEAN, PRETRAIN_STD))
    return views


def grey_level_diffs(ours, theirs):
    std = torch.tensor(PRETRAIN_STD).view(3, 1, 1)
    return [((a - b) * std * 255).abs() for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("size", [(240, 180), (1200, 900)])
def test_render_matches_reference_pixels(size):
    """Same random parameters -> the same views up to rounding, also when the JPEG is decoded
    at reduced scale (the 1200×900 image: every crop is downscaled at least 2×)."""
    data = jpeg_bytes(*size, seed=2)
    transform = tr.MultiCropTrainDataTransform(generator=torch.Generator().manual_seed(5))
    full = open_jpeg(data).convert("RGB")
    for _ in range(4):
        params = transform.sample_params(size[1], size[0])
        _, scale = transform._decode(open_jpeg(data), params)
        assert (scale > 1) == (size[0] > 1000)  # the draft path is exercised by the large image
        diffs = grey_level_diffs(transform.render(open_jpeg(data), params),
                                 render_like_reference(full, params, transform))
        for d, p in zip(diffs, params):
            assert d.mean() < 3.0, p
            assert (d > 16).float().mean() < 0.01, p


def test_batched_colours_match_reference_pixels():
    """batch_colours=True leaves the colour distortion to collate_views, which runs it on every view
    of the batch at once: each sample's views must still be the reference's operations applied with
    that sample's parameters (two crop sizes, images of different sizes, a real label each)."""
    transform = tr.MultiCropTrainDataTransform(size_crops=(64, 32), num_crops=(2, 3), min_scale_crops=(0.3, 0.1),
                                               max_scale_crops=(1.0, 0.4), generator=torch.Generator().manual_seed(3),
                                               batch_colours=True)
    images = [jpeg_bytes(96 + 16 * k, 80 + 8 * k, seed=k) for k in range(5)]
    samples, params = [], []
    for k, data in enumerate(images):
        deferred, grids = transform(open_jpeg(data))
        assert isinstance(deferred, tr.DeferredColours) and all(c.dtype == torch.uint8 for c in deferred.crops)
        samples.append(((deferred, grids), k))
        params.append(deferred.params)
    (views, grids), labels = tr.collate_views(samples)
    assert [tuple(v.shape) for v in views] == [(5, 3, 64, 64)] * 2 + [(5, 3, 32, 32)] * 3
    assert labels.tolist() == [0, 1, 2, 3, 4] and [tuple(g.shape) for g in grids] == [(5, 2, 2, 2)] * 2 + [(5, 1, 1, 2)] * 3
    assert len({p.jitter is None for ps in params for p in ps}) == 2 and any(p.solarize for ps in params for p in ps)
    for k, data in enumerate(images):
        theirs = render_like_reference(open_jpeg(data).convert("RGB"), params[k], transform)
        for v, (d, p) in enumerate(zip(grey_level_diffs([view[k] for view in views], theirs), params[k])):
            assert d.mean() < 3.0, (k, v, p)
            assert (d > 16).float().mean() < 0.01, (k, v, p)


@pytest.mark.parametrize("chunk", [tr.COLOUR_CHUNK, 3 * 48 * 48 * 5])  # whole groups; 5 views at a time
def test_batched_colours_equal_the_per_image_views(photo_jpeg, chunk, monkeypatch):
    """The same parameters give the same views, per image or batched (the per-image transform is
    checked against the reference above), whatever the chunks the batch is distorted in, and an
    ordinary sample still collates as by default."""
    monkeypatch.setattr(tr, "COLOUR_CHUNK", chunk)
    kw = dict(size_crops=(48, 24), num_crops=(2, 2), min_scale_crops=(0.3, 0.1), max_scale_crops=(1.0, 0.4),
              grid_sizes=(2, 1))
    per_image = tr.MultiCropTrainDataTransform(**kw, generator=torch.Generator().manual_seed(7))
    batched = tr.MultiCropTrainDataTransform(**kw, generator=torch.Generator().manual_seed(7), batch_colours=True)
    a = tr.collate_views([(per_image(open_jpeg(photo_jpeg)), 1) for _ in range(6)])
    b = tr.collate_views([(batched(open_jpeg(photo_jpeg)), 1) for _ in range(6)])
    for x, y in zip(a[0][0] + a[0][1], b[0][0] + b[0][1]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def ks_2samp(a, b):
    """Two-sample Kolmogorov–Smirnov statistic D and its asymptotic p-value."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    values = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b)).max()
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    k = np.arange(1, 101)
    p = float(np.clip(2 * np.sum((-1) ** (k - 1) * np.exp(-2 * (k * lam) ** 2)), 0, 1)) if lam > 0 else 1.0
    return d, p


def test_ks_2samp():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=400), rng.normal(size=500)
    assert ks_2samp(x, y)[1] > 0.01
    assert ks_2samp(x, y + 0.4)[1] < 1e-4
    assert ks_2samp(x, x) == (0.0, 1.0)


class PublishedPipeline:
    """The published multi-crop augmentation written here from torchvision and PIL with literal
    numbers, crop by crop: the oracle of the distribution test (it shares no constant with
    transforms.py). Called on an image: (views, grids) like MultiCropTrainDataTransform with
    no_flip_grid=False (the grid of a flipped crop is mirrored with it)."""

    def __init__(self, size_crops, num_crops, grid_sizes, min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), no_flip_grid=False):
        assert not no_flip_grid
        self.view_groups = [(g, k) for g, n in enumerate(num_crops) for k in range(n)]
        self.crops = [(size_crops[g], (min_scale_crops[g], max_scale_crops[g]), grid_sizes[g])
                      for g, _ in self.view_groups]
        self.colours = [self.colour_distortion(k) for _, k in self.view_groups]

    @staticmethod
    def colour_distortion(index_in_group):
        even = index_in_group % 2 == 0

        def blur(img):
            sigma = 0.1 + (2.0 - 0.1) * torch.rand(1).item()
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))

        return T.Compose([
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur], p=1.0 if even else 0.1),
            T.RandomApply([lambda img: ImageOps.solarize(img, 128)], p=0.0 if even else 0.2),
            T.ToTensor(),
            T.Normalize(MEAN, PRETRAIN_STD),
        ])

    def __call__(self, img):
        img = img.convert("RGB")
        views, grids = [], []
        for (size, scale, n), colour in zip(self.crops, self.colours):
            i, j, h, w = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            view = TF.resized_crop(img, i, j, h, w, [size, size], BICUBIC, antialias=True)
            flip = bool(torch.rand(1) < 0.5)
            views.append(colour(TF.hflip(view) if flip else view))
            # Cell (k, l) of an n×n grid is centred at (i + (k + ½)·h/n, j + (l + ½)·w/n).
            centres = torch.arange(n, dtype=torch.float64) + 0.5
            rows, cols = i + centres * h / n, j + centres * w / n
            grids.append(torch.stack(torch.meshgrid(rows, cols.flip(0) if flip else cols, indexing="ij"), -1))
        return views, grids


def view_statistics(transform, data, num_images):
    """Per view: (group, parity, scale, log aspect, flipped, mean, std, colourfulness, sharpness).

    Colourfulness (mean over pixels of the std across channels) is 0 for grayscale views and
    follows the saturation jitter; sharpness (mean absolute horizontal difference) drops with blur.
    """
    std = torch.tensor(PRETRAIN_STD).view(3, 1, 1)
    rows = []
    for _ in range(num_images):
        views, locations = transform(open_jpeg(data))
        for (g, k), view, grid in zip(transform.view_groups, views, locations):
            n = grid.shape[0]
            rows_, cols = grid[:, 0, 0], grid[0, :, 1]
            h = float(rows_[-1] - rows_[0]) * n / (n - 1)
            w = float((cols[-1] - cols[0]).abs()) * n / (n - 1)
            pixels = view * std  # undo the division by std: comparable channels
            rows.append((g, k % 2, h * w / (180 * 240), math.log(w / h), float(cols[-1] < cols[0]),
                         pixels.mean().item(), pixels.std().item(), pixels.std(dim=0).mean().item(),
                         (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean().item()))
    return np.array(rows)


DISTRIBUTION_CONFIG = dict(size_crops=[128, 64], num_crops=[2, 4], no_flip_grid=False, grid_sizes=[4, 2])


def distribution_differences(reference, fast, alpha=1e-3):
    """The statistics of ``view_statistics`` rows that differ between the two samples."""
    found = []
    for g in (0, 1):
        ref_g, fast_g = reference[reference[:, 0] == g], fast[fast[:, 0] == g]
        for column, name in [(2, "scale"), (3, "log aspect ratio")]:
            d, p = ks_2samp(ref_g[:, column], fast_g[:, column])
            if p < alpha:
                found.append((g, name, d, p))
        # Flip rate: within 4 standard errors of each other.
        rate_ref, rate_fast = ref_g[:, 4].mean(), fast_g[:, 4].mean()
        if abs(rate_ref - rate_fast) > 4 * math.sqrt(0.5 / len(ref_g)):
            found.append((g, "flip rate", rate_ref, rate_fast))
        for parity in (0, 1):  # even and odd crops differ in blur and solarization
            ref_p, fast_p = ref_g[ref_g[:, 1] == parity], fast_g[fast_g[:, 1] == parity]
            for column, name in [(5, "mean"), (6, "std"), (7, "colourfulness"), (8, "sharpness")]:
                d, p = ks_2samp(ref_p[:, column], fast_p[:, column])
                if p < alpha:
                    found.append((g, parity, name, d, p))
    return found


def test_fast_transform_has_the_reference_distribution(photo_jpeg):
    """Independent randomness: crop scales, aspect ratios, flip rate and per-view colour
    statistics agree with the published pipeline written in this file with literal constants
    (two-sample KS tests, alpha 0.001 each).
    With 200 images (400 large and 800 small views) they notice, for instance, the grayscale
    probability raised from 0.2 to 0.35, the odd crops' blur probability from 0.1 to 0.4, the
    brightness jitter from 0.4 to 0.6 or the large crops' minimum scale from 0.4 to 0.5
    (each checked when this test was written)."""
    torch.manual_seed(0)  # the reference draws from torch's global RNG
    reference = view_statistics(PublishedPipeline(**DISTRIBUTION_CONFIG), photo_jpeg, 200)
    fast = view_statistics(tr.MultiCropTrainDataTransform(
        **DISTRIBUTION_CONFIG, generator=torch.Generator().manual_seed(1)), photo_jpeg, 200)
    assert 0.4 < fast[:, 4].mean() < 0.6  # flips happen half of the time
    assert distribution_differences(reference, fast) == []
