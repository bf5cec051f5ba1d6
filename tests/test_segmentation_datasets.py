"""Segmentation dataset readers on tiny fake trees in each standard layout (no download)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import builtin_data
from segmentation import datasets as D
from segmentation import transforms as T

H, W = 12, 16


def _image(path: Path, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _label(path: Path, values, mode="L"):
    """A label PNG whose rows cycle through ``values`` (mode P: palette indices, as VOC ships them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([values[r % len(values)] for r in range(H)], dtype=np.uint8)[:, None].repeat(W, 1)
    img = Image.fromarray(arr, mode)
    if mode == "P":
        img.putpalette(np.random.default_rng(1).integers(0, 256, 768).tolist())  # colours say nothing
    img.save(path)
    return arr


def _voc(root: Path, train=("a", "b"), val=("c",)):
    voc = root / "VOCdevkit" / "VOC2012"
    for k, i in enumerate(train + val):
        _image(voc / "JPEGImages" / f"{i}.jpg", k)
        _label(voc / "SegmentationClass" / f"{i}.png", [0, 15, 255, k + 1], mode="P")
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return voc


def test_voc_reads_palette_indices_and_keeps_boundaries_ignored(tmp_path):
    voc = _voc(tmp_path)
    train = D.VOCSegmentation(tmp_path, "train")  # found from a folder above VOCdevkit
    assert len(train) == 2 and train.num_classes == 21 and train.class_names[15] == "person"
    image, mask = train[1]
    assert image.size == (W, H) and mask.dtype == np.uint8
    assert mask[:4, 0].tolist() == [0, 15, 255, 2]  # indices, not palette colours; 255 kept for the loss
    val = D.VOCSegmentation(voc, "val")  # or pointed at VOC2012 itself
    assert [Path(p).stem for p, _ in val.samples] == ["c"]
    assert not D.VOCSegmentation.has_aug(tmp_path)
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        D.VOCSegmentation(tmp_path, "train_aug")


def test_voc_train_aug_with_mmsegmentation_aug_list(tmp_path):
    voc = _voc(tmp_path)
    for k, i in enumerate(["d", "e", "a", "c"]):  # SBD covers a train image and (wrongly here) a val one
        _image(voc / "JPEGImages" / f"{i}.jpg", 10 + k)
        _label(voc / "SegmentationClassAug" / f"{i}.png", [0, 7 + k])
    (voc / "ImageSets" / "Segmentation" / "aug.txt").write_text("d\ne\nc\n")
    assert D.VOCSegmentation.has_aug(tmp_path)
    ds = D.VOCSegmentation(tmp_path, "train_aug")
    got = {Path(img).stem: Path(lab).parent.name for img, lab in ds.samples}
    # train.txt keeps its fine labels, SBD adds d and e, the val image c never enters training
    assert got == {"a": "SegmentationClass", "b": "SegmentationClass",
                   "d": "SegmentationClassAug", "e": "SegmentationClassAug"}
    assert ds[2][1][1, 0] == 7  # d's grey-level label


def test_voc_train_aug_with_a_deeplab_style_list(tmp_path):
    voc = _voc(tmp_path)
    for i in ("a", "d"):
        _image(voc / "JPEGImages" / f"{i}.jpg")
        _label(voc / "SegmentationClassAug" / f"{i}.png", [0, 3])
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/d.jpg /SegmentationClassAug/d.png\n")
    ds = D.VOCSegmentation(voc, "train_aug")
    got = {Path(img).stem: Path(lab).parent.name for img, lab in ds.samples}
    assert got == {"a": "SegmentationClass", "b": "SegmentationClass", "d": "SegmentationClassAug"}


def test_voc_missing_files_and_bad_labels_are_clear_errors(tmp_path):
    voc = _voc(tmp_path)
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        D.VOCSegmentation(tmp_path, "train")
    _label(voc / "SegmentationClass" / "b.png", [0, 50])  # 50 is no VOC class
    with pytest.raises(ValueError, match=r"b.png.*\[50\]"):
        D.VOCSegmentation(tmp_path, "train")[1]
    Image.new("RGB", (W, H)).save(voc / "SegmentationClass" / "b.png")  # a colour-coded label
    with pytest.raises(ValueError, match="mode RGB"):
        D.VOCSegmentation(tmp_path, "train")[1]
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        D.VOCSegmentation(tmp_path / "nowhere", "train")


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for k in range(2):
            _image(root / "images" / split / f"ADE_{split}_{k}.jpg", k)
            _label(root / "annotations" / split / f"ADE_{split}_{k}.png", [0, 1, 150, 13])
    ds = D.ADE20KSegmentation(tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 150 and len(ds.class_names) == 150
    assert ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    _, mask = ds[0]
    assert mask[:4, 0].tolist() == [255, 0, 149, 12]
    assert len(D.ADE20KSegmentation(root, "train")) == 2


def test_cityscapes_train_ids_and_label_ids_mapping(tmp_path):
    root = tmp_path / "cityscapes"
    for city, stem in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        _image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
    gt = root / "gtFine" / "train"
    _label(gt / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", [0, 18, 255])
    # bremen has only the raw ids: road 7, car 26, unlabeled 0, bicycle 33, license plate -1 -> 255
    _label(gt / "bremen" / "bremen_000001_000019_gtFine_labelIds.png", [7, 26, 0, 33, 255])
    ds = D.CityscapesSegmentation(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[13] == "car"
    assert ds[0][1][:3, 0].tolist() == [0, 18, 255]
    assert ds[1][1][:5, 0].tolist() == [0, 13, 255, 18, 255]
    assert D.CITYSCAPES_ID_TO_TRAIN_ID[24] == 11 and len(D.CITYSCAPES_ID_TO_TRAIN_ID) == 19
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        D.CityscapesSegmentation(tmp_path, "val")


def test_builtin_masks_match_the_builtin_scenes():
    ds = D.BuiltinMasks("val", num_images=6, image_size=32, num_object_classes=3, seed=5)
    # Class c is the texture c: mask value c + 1 is named after it.
    assert ds.num_classes == 4 and ds.class_names == ("background", "stripes", "checker", "dots")
    values = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        ref_image, ref_mask, _ = builtin_data.BuiltinDataset("val", 6, 32, 3, seed=5).sample(i)
        assert np.array_equal(mask, ref_mask) and np.array_equal(np.array(image), np.array(ref_image))
        values |= set(np.unique(mask).tolist())
    assert 0 in values and values <= {0, 1, 2, 3}


def test_datasets_hand_both_views_to_a_joint_transform(tmp_path):
    _voc(tmp_path)
    ds = D.build_segmentation_dataset("voc", tmp_path, "train", T.EvalTransform(None))
    x, y = ds[0]
    assert x.shape == (3, H, W) and y.shape == (H, W) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="needs --data-dir"):
        D.build_segmentation_dataset("ade20k", None, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.build_segmentation_dataset("cityscapes", tmp_path / "missing", "train")


def test_training_skips_unreadable_files_evaluation_does_not(tmp_path, capsys):
    voc = _voc(tmp_path)
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    ds = D.VOCSegmentation(tmp_path, "train")
    with pytest.raises(OSError, match="a.jpg"):
        ds[0]
    ds.skip_unreadable = True
    image, mask = ds[0]
    assert mask[3, 0] == 2  # sample b took its place
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipping unreadable sample") and "a.jpg" in err[0]


@pytest.mark.parametrize("split,workers", [("val", "1"), ("train", "0"), pytest.param("val", "0", marks=pytest.mark.slow),
                                           pytest.param("train", "1", marks=pytest.mark.slow)])
def test_a_bad_file_stops_segmentation_with_one_line_naming_it(tmp_path, workers, split):
    """segmentation/train.py on real files: a validation image that is not an image (training skips
    those), or a label with values outside the classes in either split, ends the run with one line
    naming the file, also when a loader worker process read it."""
    import os
    import subprocess
    import sys
    voc = _voc(tmp_path, train=("a", "b", "d", "e"))
    if split == "val":
        (voc / "JPEGImages" / "c.jpg").write_bytes(b"not a jpeg")
        expected = f"error: evaluation data (voc val): cannot read ('{voc / 'JPEGImages' / 'c.jpg'}'"
    else:
        _label(voc / "SegmentationClass" / "b.png", [0, 30])
        expected = f"error: training data (voc train): {voc / 'SegmentationClass' / 'b.png'}: label values [30]"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "segmentation/train.py", "--dataset", "voc", "--data-dir", str(tmp_path),
                           "--arch", "resnet_test", "--device", "cpu", "--workers", workers, "--iters", "4",
                           "--batch-size", "2", "--crop-size", "16", "--scale", "32", "16", "--print-freq", "1",
                           "--exp-dir", str(tmp_path / "exp")], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-1000:]
