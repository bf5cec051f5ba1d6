"""Segmentation building blocks: metrics, sliding-window inference, features, head, transforms, schedule."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import models
from segmentation import head as H
from segmentation import metrics as M
from segmentation import transforms as T
from segmentation.train import learning_rate

# ----------------------------------------------------------------------------- metrics


def test_confusion_matrix_counts_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])  # the two ignored pixels' predictions never count
    conf = M.confusion_matrix(pred, target, num_classes=3)
    expected = torch.tensor([[1, 1, 0],   # true 0: once 0, once 1
                             [0, 2, 0],   # true 1: twice 1
                             [1, 0, 1]])  # true 2: once 2, once 0
    assert torch.equal(conf, expected)
    assert int(conf.sum()) == 6


def test_iou_and_miou_of_a_known_matrix():
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    iou = M.iou_from_confusion(conf)
    # IoU = TP / (row + col - TP): class 0: 1/(2+2-1), class 1: 2/(2+3-2), class 2: 1/(2+1-1)
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    scores = M.segmentation_scores(conf, ["a", "b", "c"])
    assert scores["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-3)
    assert scores["aAcc"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert scores["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3, abs=1e-3)
    assert scores["IoU"] == {"a": 33.33, "b": 66.67, "c": 50.0}


def test_class_absent_from_ground_truth_and_prediction_is_left_out_of_the_mean():
    # 4 classes; class 3 appears nowhere (union 0: IoU undefined), class 2 is predicted but never true.
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 2, 1, 1, 1, 0])
    scores = M.segmentation_scores(M.confusion_matrix(pred, target, 4))
    iou0, iou1, iou2 = 2 / 3, 1.0, 0.0  # a false positive of class 2 counts as IoU 0
    assert scores["IoU"]["3"] is None
    assert scores["IoU"]["2"] == 0.0
    assert scores["mIoU"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3, abs=1e-3)  # not / 4


def test_miou_is_taken_over_the_summed_matrix_not_per_image():
    # Image A has only classes 0 and 1, image B only 0 and 2: class 2 is absent from A, which must not
    # count as an IoU of 0 for A; the dataset-level matrix decides.
    ta, pa = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    tb, pb = torch.tensor([0, 2, 2, 2]), torch.tensor([0, 2, 2, 2])
    conf = M.confusion_matrix(pa, ta, 3) + M.confusion_matrix(pb, tb, 3)
    # class 0: TP 3, union 3 + 1 (A's false negative of 1 predicted as 0) = 4; class 1: 1/2; class 2: 3/3
    assert M.segmentation_scores(conf)["mIoU"] == pytest.approx(100 * (3 / 4 + 1 / 2 + 1) / 3, abs=1e-3)


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"\[7\]"):
        M.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    M.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 255]), 3)  # the ignore index is fine


def test_all_reduce_sum_is_the_identity_without_a_process_group():
    x = torch.arange(4)
    assert torch.equal(M.all_reduce_sum(x.clone()), x)


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("height,width,window,stride", [
    (70, 53, (32, 32), (21, 21)),   # overlapping windows, borders not on the stride grid
    (64, 64, (32, 32), (32, 32)),   # tiling without overlap
    (20, 90, (32, 24), (21, 16)),   # image lower than the window: one row of windows of height 20
    (17, 13, (32, 32), (21, 21)),   # image smaller than the window: one window, the image itself
])
def test_window_boxes_cover_the_image_and_stay_inside(height, width, window, stride):
    boxes = H.window_boxes(height, width, window, stride)
    cover = torch.zeros(height, width, dtype=torch.int64)
    for t, l, b, r in boxes:
        assert 0 <= t < b <= height and 0 <= l < r <= width
        assert (b - t, r - l) == (min(window[0], height), min(window[1], width))
        cover[t:b, l:r] += 1
    assert int(cover.min()) >= 1
    assert max(b for _, _, b, _ in boxes) == height and max(r for _, _, _, r in boxes) == width
    if (height, width) == (70, 53):
        assert int(cover.max()) > 1
        assert sorted({t for t, _, _, _ in boxes}) == [0, 21, 38]  # the last row shifted back from 42
        assert sorted({l for _, l, _, _ in boxes}) == [0, 21]
        assert len(boxes) == 3 * 2


def test_window_boxes_reject_a_stride_larger_than_the_window():
    with pytest.raises(ValueError, match="stride"):
        H.window_boxes(64, 64, (16, 16), (20, 16))


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    fn = nn.Conv2d(3, 5, 1).double()  # translation-equivariant and pointwise
    x = torch.randn(2, 3, 70, 53, dtype=torch.float64)
    with torch.no_grad():
        slid = H.slide_inference(fn, x, window=(32, 32), stride=(21, 21), max_batch=4)
        assert torch.allclose(slid, fn(x), atol=1e-12)
        # a model that sees its neighbours differs at window borders: the equality is not trivial
        blur = nn.Sequential(fn, nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False))
        assert not torch.allclose(H.slide_inference(blur, x, (32, 32), (21, 21)), blur(x), atol=1e-6)


class PointwiseBackbone(nn.Module):
    """A stand-in backbone whose 'stages' are pointwise maps at full resolution."""

    def __init__(self):
        super().__init__()
        self.dims = [4, 4, 4, 4]
        self.conv = nn.Conv2d(3, 4, 1)

    def forward_stages(self, x):
        y = torch.tanh(self.conv(x))
        return [y, y * 2, y * 3, y * 4]


def test_predict_slide_equals_whole_through_the_segmenter():
    torch.manual_seed(0)
    model = H.Segmenter(H.FrozenBackbone(PointwiseBackbone(), [0, 3]), H.LinearHead(8, 3)).eval()
    x = torch.randn(1, 3, 45, 61)
    whole = H.predict(model, x, (90, 122), "whole")
    slide = H.predict(model, x, (90, 122), "slide", window=(24, 24), stride=(16, 16))
    assert whole.shape == (1, 3, 90, 122)
    assert torch.allclose(whole, slide, atol=1e-5)


# ----------------------------------------------------------------------------- features and head


def bilinear_matrix(n_out, n_in):
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres (PyTorch's
    align_corners=False): output o samples the input at (o + ½)·n_in/n_out − ½, clamped to the edges."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        s = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(math.floor(s))
        hi = min(lo + 1, n_in - 1)
        m[o, lo] += 1 - (s - lo)
        m[o, hi] += s - lo
    return m


def test_bilinear_matrix_by_hand():
    # 2 -> 4: samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    assert np.allclose(bilinear_matrix(4, 2), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    assert np.allclose(bilinear_matrix(3, 3), np.eye(3))


def test_convnext_features_concatenate_four_stages_at_stride_4():
    """The readout's values: the four stage outputs (computed here through the backbone's own
    downsample_layers and stages), each resized bilinearly with align_corners=False to the
    stride-4 map and concatenated in stage order."""
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("convnext_test")
    feats = H.FrozenBackbone(backbone, [0, 1, 2, 3])
    assert feats.out_channels == 8 + 16 + 32 + 64
    assert H.stage_channels(backbone) == [8, 16, 32, 64]
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    out = feats.double()(x)  # the backbone computes in float64
    assert out.shape == (2, 120, 16, 24)
    expected, y = [], x
    with torch.no_grad():
        for down, stage in zip(backbone.downsample_layers, backbone.stages):
            y = stage(down(y))  # (2, C_k, 16 / 2^k, 24 / 2^k)
            rows, cols = bilinear_matrix(16, y.shape[2]), bilinear_matrix(24, y.shape[3])
            expected.append(np.einsum("ph,bchw,qw->bcpq", rows, y.numpy(), cols))
    expected = np.concatenate(expected, axis=1)  # (2, 120, 16, 24)
    assert all(np.abs(expected[:, a:b]).mean() > 1e-3 for a, b in [(0, 8), (8, 24), (24, 56), (56, 120)])
    assert out.dtype == torch.float32  # the head gets float32 features: equal up to float32 rounding
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_dilated_resnet_last_stage_has_output_stride_8():
    backbone, width = models.build_backbone("resnet_test", replace_stride_with_dilation=[False, True, True])
    feats = H.FrozenBackbone(backbone, [3])
    assert feats.out_channels == width == 64
    assert feats(torch.randn(1, 3, 64, 48)).shape == (1, 64, 8, 6)
    assert H.stage_channels(backbone) == [8, 16, 32, 64]


def test_mixed_precision_backbone_gives_float32_features_close_to_float32():
    backbone, _ = models.build_backbone("convnext_test")
    x = torch.randn(2, 3, 32, 32)
    full = H.FrozenBackbone(backbone, [0, 1, 2, 3])(x)
    half = H.FrozenBackbone(backbone, [0, 1, 2, 3], lambda: torch.autocast("cpu", dtype=torch.bfloat16))(x)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)  # the autocast really ran
    assert (half - full).abs().max() < 0.1 * full.abs().max()


def test_backbone_stays_frozen_and_only_the_head_learns():
    backbone, _ = models.build_backbone("resnet_test", replace_stride_with_dilation=[False, True, True])
    model = H.Segmenter(H.FrozenBackbone(backbone, [3]), H.LinearHead(64, 3, dropout=0.1))
    model.train()
    assert not backbone.training and model.head.training  # BN statistics of the backbone never move
    running = backbone.bn1.running_mean.clone()
    logits = model.logits(torch.randn(2, 3, 32, 32), (32, 32))
    assert logits.shape == (2, 3, 32, 32)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert torch.equal(running, backbone.bn1.running_mean)


# ----------------------------------------------------------------------------- transforms


def test_rescale_size_fits_the_scale_keeping_the_ratio():
    assert T.rescale_size(500, 375, (2048, 512)) == (683, 512)  # VOC: the short side decides
    assert T.rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)
    assert T.rescale_size(4000, 500, (2048, 512)) == (2048, 256)  # a panorama: the long side decides


def _labelled_image(h=48, w=40, seed=0):
    """An image whose red channel encodes the label (40 * label + 20) in blocks of 8x8 pixels."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 4, (h // 8, w // 8)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    rgb = np.stack([40 * labels + 20, np.full_like(labels, 100), np.full_like(labels, 50)], -1).astype(np.uint8)
    return Image.fromarray(rgb), labels


def _label_from_red(x):
    red = x[0] * T.STD[0] + T.MEAN[0]  # undo the normalisation
    return torch.round((red * 255 - 20) / 40).long()


def test_train_transform_keeps_image_and_mask_aligned_through_crop_and_flip():
    torch.manual_seed(0)
    image, labels = _labelled_image()
    tf = T.TrainTransform(scale=(160, 40), crop_size=(24, 24), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                          photometric=False)
    flips = 0
    for _ in range(12):
        x, y = tf(image, labels)
        assert x.shape == (3, 24, 24) and y.shape == (24, 24) and y.dtype == torch.int64
        assert torch.equal(_label_from_red(x), y)
        flips += int(not torch.equal(y, torch.from_numpy(labels).long()[:24, :24]))
    assert flips > 0


def test_train_transform_rescales_with_nearest_labels_and_pads_with_ignore():
    torch.manual_seed(1)
    image, labels = _labelled_image()
    tf = T.TrainTransform(scale=(80, 20), crop_size=(32, 32), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                          photometric=False)
    x, y = tf(image, labels)  # 40 wide, 48 high -> 20 x 24 (the short side fits 20), padded to 32 x 32
    assert x.shape == (3, 32, 32)
    assert torch.all(y[24:] == 255) and torch.all(y[:, 20:] == 255)
    assert torch.all(x[:, 24:] == 0) and torch.all(x[:, :, 20:] == 0)  # 0 is the mean colour
    inside = y[:24, :20]
    assert not torch.any(inside == 255)
    assert set(inside.unique().tolist()) <= set(np.unique(labels).tolist())  # nearest: no invented labels
    agree = (_label_from_red(x)[:24, :20] == inside).float().mean()
    assert agree > 0.8  # bilinear image vs nearest mask disagree only along block edges


def test_photometric_distortion_changes_colours_but_not_labels():
    torch.manual_seed(3)
    image, labels = _labelled_image()
    tf = T.TrainTransform(scale=(160, 40), crop_size=(48, 40), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                          flip_prob=0.0, photometric=True)
    plain = T.normalize(image)
    changed = 0
    for _ in range(6):
        x, y = tf(image, labels)
        assert torch.equal(y, torch.from_numpy(labels).long())
        changed += int(not torch.allclose(x, plain, atol=1e-3))
    assert changed >= 3


def test_cat_max_ratio_prefers_crops_with_several_classes():
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[70:, 70:] = 1  # a small object in a corner

    def mixed_share(ratio):
        torch.manual_seed(0)
        hits = 0
        for _ in range(200):
            t, l, h, w = T.random_crop_box(mask, (40, 40), ratio)
            counts = np.bincount(mask[t:t + h, l:l + w].ravel(), minlength=2)
            hits += int(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
        return hits / 200

    assert mixed_share(0.75) > mixed_share(1.0) + 0.3


def test_eval_transform_resizes_the_image_only():
    image, labels = _labelled_image(48, 40)
    x, y = T.EvalTransform((160, 80))(image, labels)
    assert x.shape == (3, 96, 80) and y.shape == (48, 40)
    assert torch.equal(y, torch.from_numpy(labels).long())
    x, _ = T.EvalTransform(None)(image, labels)
    assert x.shape == (3, 48, 40)


def test_rgb_label_images_are_refused():
    image, _ = _labelled_image()
    with pytest.raises(ValueError, match="mode RGB"):
        T.EvalTransform(None)(image, image)


# ----------------------------------------------------------------------------- schedule


def test_resnet_schedule_is_poly_0p9_down_to_1e_4():
    assert learning_rate(0, 40000, 0.01, 1e-4, 0.9) == pytest.approx(0.01)
    assert learning_rate(20000, 40000, 0.01, 1e-4, 0.9) == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5 ** 0.9)
    assert learning_rate(40000, 40000, 0.01, 1e-4, 0.9) == pytest.approx(1e-4)


def test_convnext_schedule_warms_up_linearly_then_decays_linearly_to_0():
    lr = [learning_rate(i, 40000, 1e-4, 0.0, 1.0, 1500) for i in (0, 750, 1499, 1500, 20750, 40000)]
    assert lr[0] == pytest.approx(1e-4 * 1e-6)
    assert lr[1] == pytest.approx(1e-4 * (1 - 750 / 40000) * (0.5 + 0.5e-6))
    assert lr[1] < lr[2] < lr[3]
    assert lr[3] == pytest.approx(1e-4 * (1 - 1500 / 40000))
    assert lr[4] == pytest.approx(1e-4 * 19250 / 40000)
    assert lr[5] == 0.0 and not math.isnan(lr[5])
