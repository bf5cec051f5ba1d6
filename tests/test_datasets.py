"""Tests of datasets.py and builtin_data.py: the built-in dataset, folder/numpy/unlabelled datasets on
tiny trees, unreadable files, missing or empty folders, and the loader's batch split."""

import numpy as np
import pytest
import torch
from PIL import Image

import builtin_data
import datasets
import transforms as tr


def write_image(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    """data/train/{cat,dog}/*.jpg (3 + 2 images) and data/val/{cat,dog}/*.png (1 + 1)."""
    root = tmp_path / "data"
    for k in range(3):
        write_image(root / "train" / "cat" / f"{k}.jpg", k)
    for k in range(2):
        write_image(root / "train" / "dog" / f"{k}.JPEG", 10 + k)
    write_image(root / "val" / "cat" / "a.png", 20)
    write_image(root / "val" / "dog" / "b.png", 21)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------------
# Built-in dataset
# ------------------------------------------------------------------------------------------

def test_builtin_is_deterministic_and_seed_dependent():
    a = builtin_data.BuiltinDataset("train", num_images=20, seed=0)
    b = builtin_data.BuiltinDataset("train", num_images=20, seed=0)
    c = builtin_data.BuiltinDataset("train", num_images=20, seed=1)
    for i in (0, 7, 19):
        (ia, ma, la), (ib, mb, lb) = a.sample(i), b.sample(i)
        assert np.array_equal(np.array(ia), np.array(ib)) and np.array_equal(ma, mb) and la == lb
    assert not np.array_equal(np.array(a.sample(3)[0]), np.array(c.sample(3)[0]))
    assert not np.array_equal(np.array(a.sample(3)[0]), np.array(a.sample(4)[0]))


def test_builtin_train_and_val_are_disjoint():
    train = builtin_data.BuiltinDataset("train", num_images=200)
    val = builtin_data.BuiltinDataset("val", num_images=200)
    train_images = {np.array(train.sample(i)[0]).tobytes() for i in range(200)}
    assert not any(np.array(val.sample(i)[0]).tobytes() in train_images for i in range(200))


def test_builtin_sample_format_and_label_balance():
    data = builtin_data.BuiltinDataset("train", num_images=400, image_size=48, num_classes=10)
    assert len(data) == 400 and data.num_classes == 10
    labels = []
    for i in range(400):
        image, mask, label = data.sample(i)
        assert image.size == (48, 48) and image.mode == "RGB"
        assert mask.shape == (48, 48) and mask.dtype == np.uint8 and mask.max() <= 10
        # The label is the class with the most visible pixels in the mask.
        counts = np.bincount(mask.ravel(), minlength=11)[1:]
        assert counts[label] == counts.max() > 0
        labels.append(label)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 20, counts  # every class is common (uniform would be 40 each)
    assert data[5][1] == data.sample(5)[2] and isinstance(data[5][0], Image.Image)


def test_builtin_colour_carries_no_class():
    """Colour is a nuisance (the shortcut that kept pretraining from learning): the mean colour of the
    object pixels does not tell the classes apart better than chance (a nearest-class-mean classifier
    fitted on one half and scored on the other)."""
    data = builtin_data.BuiltinDataset("train", num_images=600, image_size=32, max_objects=1)
    colour, labels = [], []
    for i in range(600):
        image, mask, label = data.sample(i)
        colour.append(np.asarray(image, dtype=np.float64)[mask > 0].mean(0))
        labels.append(label)
    colour, labels = np.array(colour), np.array(labels)
    fit, test = slice(0, 300), slice(300, 600)
    means = np.stack([colour[fit][labels[fit] == c].mean(0) for c in range(10)])
    guess = np.abs(colour[test][:, None] - means[None]).sum(-1).argmin(1)
    assert (guess == labels[test]).mean() < 0.2  # chance is 0.1


def _ring_spectrum(grey: np.ndarray, bins: int = 8) -> np.ndarray:
    """Power of the centred image in rings of spatial frequency: blind to orientation and phase."""
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    f = np.fft.fftfreq(grey.shape[0])
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    ring = np.minimum((radius / 0.5 * bins).astype(int), bins - 1)
    out = np.bincount(ring.ravel(), power.ravel(), minlength=bins)
    return out / out.sum()


def test_builtin_class_is_the_texture():
    """Images of one class share a texture, whatever their colours and outline: the contrast inside the
    object (dark and light shades of one hue) always shows the pattern, and a textbook texture
    descriptor (the orientation-blind power spectrum of the object's grey levels) classifies held-out
    images far above chance with a nearest-class-mean rule."""
    data = builtin_data.BuiltinDataset("train", num_images=800, image_size=64, max_objects=1)
    spectra, labels = [], []
    for i in range(800):
        image, mask, label = data.sample(i)
        grey = np.asarray(image.convert("L"), dtype=np.float64)
        inside = grey[mask > 0]
        assert inside.std() > 15, (i, inside.std())  # the pattern is visible in grey levels
        grey = np.where(mask > 0, grey, inside.mean())
        spectra.append(np.log(_ring_spectrum(grey) + 1e-6))
        labels.append(label)
    spectra, labels = np.array(spectra), np.array(labels)
    fit, test = slice(0, 400), slice(400, 800)
    means = np.stack([spectra[fit][labels[fit] == c].mean(0) for c in range(10)])
    guess = ((spectra[test][:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (guess == labels[test]).mean() > 0.3, (guess == labels[test]).mean()


def test_builtin_main_object_is_large_and_central():
    """Most crops of a scene hold part of the main object: it covers a good part of the image and its
    centre of mass is near the image centre."""
    data = builtin_data.BuiltinDataset("val", num_images=100, image_size=32, max_objects=1)
    for i in range(100):
        _, mask, _ = data.sample(i)
        assert 0.15 < (mask > 0).mean() < 0.9, (i, (mask > 0).mean())
        ys, xs = np.nonzero(mask)
        assert abs(ys.mean() - 15.5) < 7 and abs(xs.mean() - 15.5) < 7


def test_builtin_masks_follow_the_image_content():
    """Mask boundaries sit on image edges: the colour change across the pixels where the mask
    changes is largest for the mask as rendered, not for the mask shifted sideways."""
    data = builtin_data.BuiltinDataset("val", num_images=20, image_size=64)
    scores = {shift: [] for shift in (-3, -1, 0, 1, 3)}
    for i in range(20):
        image, mask, _ = data.sample(i)
        pixels = np.array(image).astype(np.float32)
        edges = np.abs(pixels[:, 1:] - pixels[:, :-1]).sum(-1)  # (H, W - 1)
        for shift in scores:
            moved = np.roll(mask, shift, axis=1)
            boundary = moved[:, 1:] != moved[:, :-1]
            scores[shift].append(edges[boundary].mean() if boundary.any() else 0.0)
    mean = {shift: np.mean(v) for shift, v in scores.items()}
    assert mean[0] > 1.5 * max(v for shift, v in mean.items() if shift != 0), mean


@pytest.mark.parametrize("size", [32, 96, 256])
def test_builtin_sizes(size):
    image, mask, _ = builtin_data.BuiltinDataset(image_size=size, num_images=2).sample(1)
    assert image.size == (size, size) and mask.shape == (size, size)


def test_builtin_scene_is_the_same_at_any_side():
    """The segmentation demo pretrains on 64-pixel scenes and reads them at 96: a seed and an index
    draw one scene, whatever the side. Its 96-pixel mask, shrunk to 64 by nearest neighbour, agrees
    with the 64-pixel mask except along the outlines; a different scene agrees far less."""
    small = builtin_data.BuiltinDataset("val", num_images=10, image_size=64, max_objects=4)
    large = builtin_data.BuiltinDataset("val", num_images=10, image_size=96, max_objects=4)
    def shrink(m):
        return np.array(Image.fromarray(m).resize((64, 64), Image.NEAREST))

    same, other = [], []
    for i in range(10):
        _, mask, label = small.sample(i)
        _, big, big_label = large.sample(i)
        _, next_big, _ = large.sample((i + 1) % 10)
        assert label == big_label
        same.append((shrink(big) == mask).mean())
        other.append((shrink(next_big) == mask).mean())
    assert min(same) > 0.97 and max(other) < 0.9, (same, other)


def test_builtin_segmentation():
    seg = builtin_data.BuiltinSegmentation("train", num_images=5, image_size=32, num_classes=6)
    assert seg.num_classes == 7 and seg.ignore_index == 255
    image, mask = seg[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64 and int(mask.max()) <= 6
    assert torch.equal(mask, torch.from_numpy(seg.sample(2)[1]).long())


def test_builtin_argument_errors():
    with pytest.raises(ValueError, match="split"):
        builtin_data.BuiltinDataset("test")
    with pytest.raises(ValueError, match="num_classes"):
        builtin_data.BuiltinDataset(num_classes=50)
    with pytest.raises(IndexError):
        builtin_data.BuiltinDataset(num_images=3).sample(3)


def test_builtin_with_the_training_transform():
    transform = tr.MultiCropTrainDataTransform([64, 32], [2, 2], grid_sizes=[2, 1])
    data = datasets.build_dataset("builtin", None, "train", transform, num_images=4)
    (views, locations), label = data[0]
    assert [v.shape for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    assert [g.shape for g in locations] == [(2, 2, 2)] * 2 + [(1, 1, 2)] * 2
    assert 0 <= label < 10


# ------------------------------------------------------------------------------------------
# Folder, numpy and unlabelled datasets
# ------------------------------------------------------------------------------------------

def test_imagenet_layout(image_tree):
    train = datasets.build_dataset("imagenet1k", image_tree, "train")
    val = datasets.build_dataset("imagenet1k", image_tree, "val")
    assert (len(train), len(val), train.num_classes, val.num_classes) == (5, 2, 2, 2)
    assert train.classes == ["cat", "dog"]
    assert [label for _, label in train.samples] == [0, 0, 0, 1, 1]
    image, label = val[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    assert "val" in val.root  # validation reads the val split (the reference read train)


def test_transforms_receive_lazy_or_decoded_images(image_tree):
    seen = []

    class Eager:
        def __call__(self, img):
            seen.append(("eager", img.mode, getattr(img, "tile", None) or None))
            return 0

    class Lazy(Eager):
        accepts_lazy_images = True

    datasets.build_dataset("imagenet1k", image_tree, "train", Eager())[0]
    datasets.build_dataset("imagenet1k", image_tree, "train", Lazy())[0]
    assert seen[0][1] == "RGB" and seen[0][2] is None  # decoded
    assert seen[1][2] is not None  # still to decode: the transform may pick a JPEG scale


def test_numpy_layout(image_tree, tmp_path):
    paths = np.array(["train/cat/0.jpg", str(image_tree / "train" / "dog" / "1.JPEG"), "val/dog/b.png"])
    np.save(image_tree / "train_images.npy", paths)
    np.save(image_tree / "train_labels.npy", np.array([3, 1, 4]))
    data = datasets.build_dataset("imagenet1k", image_tree, "train", from_numpy=True)
    assert len(data) == 3 and data.num_classes == 5
    assert data[0][1] == 3 and data[2][1] == 4 and data[2][0].size == (20, 16)
    with pytest.raises(FileNotFoundError, match="val_images.npy"):
        datasets.build_dataset("imagenet1k", image_tree, "val", from_numpy=True)
    np.save(image_tree / "val_images.npy", paths)
    np.save(image_tree / "val_labels.npy", np.array([0, 1]))
    with pytest.raises(ValueError, match="3 paths but .* 2 labels"):
        datasets.build_dataset("imagenet1k", image_tree, "val", from_numpy=True)


def test_unlabelled_folder(image_tree, tmp_path):
    data = datasets.build_dataset("folder", image_tree, "train")  # uses data/train
    assert len(data) == 5 and data.num_classes == 0
    assert all(data[i][1] == -1 for i in range(len(data)))
    flat = tmp_path / "flat"
    for k in range(3):
        write_image(flat / f"img{k}.png", k)
    data = datasets.build_dataset("folder", flat, "train")  # no train/ sub-folder: the folder itself
    assert len(data) == 3 and data.num_classes == 0 and data[2][1] == -1


@pytest.mark.parametrize("name", ["imagenet1k", "folder"])
def test_missing_or_empty_folders_fail_clearly(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        datasets.build_dataset(name, missing, "train")
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "train" / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        datasets.build_dataset(name, empty, "train")


def test_missing_split_and_class_folders(image_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="test.*<class>"):
        datasets.ImageFolderDataset(image_tree / "test")
    flat = tmp_path / "flat"
    write_image(flat / "train" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        datasets.build_dataset("imagenet1k", flat, "train")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.build_dataset("cifar", flat, "train")


def test_unreadable_images_are_skipped_with_one_line_each(image_tree, capfd):
    bad_dir = image_tree / "train" / "cat"
    good = (bad_dir / "0.jpg").read_bytes()
    (bad_dir / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (bad_dir / "2.jpg").write_bytes(b"this is not a picture")  # garbage
    data = datasets.build_dataset("imagenet1k", image_tree, "train",
                                  tr.MultiCropTrainDataTransform([16], [1], [0.5], [1.0], grid_sizes=[1]))
    capfd.readouterr()
    samples = [data[i] for i in range(len(data))]  # a whole epoch, no crash
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2  # one line per file, no warning-source line under it
    assert lines[0].startswith("warning: skipping unreadable image") and lines[0].endswith(")") and "1.jpg" in lines[0]
    assert lines[1].startswith("warning: skipping unreadable image") and "2.jpg" in lines[1]
    assert data.num_unreadable == 2
    # The bad samples are replaced by the next readable one (the first dog).
    assert [label for _, label in samples] == [0, 1, 1, 1, 1]
    assert samples[1][0][0][0].shape == (3, 16, 16)
    assert data[1][1] == 1 and not capfd.readouterr().err  # known bad files are skipped silently afterwards


def test_skipped_images_are_counted_over_loader_workers(image_tree, capfd):
    """Two worker processes load the epoch: their skips reach the main process's count."""
    (image_tree / "train" / "cat" / "1.jpg").write_bytes(b"garbage")
    data = datasets.build_dataset("imagenet1k", image_tree, "train", tr.eval_transform(16, 16))
    loader = datasets.build_loader(data, 2, train=True, num_workers=2)
    list(datasets.epoch_iterator(loader, 0))
    assert datasets.skipped_images(loader) == 1
    assert capfd.readouterr().err.count("skipping unreadable image") == 1


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"garbage")
    data = datasets.ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="could be read"):
        data[0]


def test_cifar_mini(cifar_mini):
    data = datasets.build_dataset("imagenet1k", cifar_mini, "val")
    assert len(data) == 1000 and data.num_classes == 10
    image, label = data[999]
    assert image.size == (32, 32) and label == 9


# ------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------

def test_batch_size_must_divide():
    data = builtin_data.BuiltinDataset(num_images=64, image_size=16)
    with pytest.raises(ValueError, match="--batch-size 10"):
        datasets.build_loader(data, 10, world_size=4, rank=0)
    with pytest.raises(ValueError, match="--batch-size"):
        datasets.per_process_batch(0, 1)
    with pytest.raises(ValueError, match="not one full batch"):
        datasets.build_loader(data, 128, world_size=2, rank=0)  # 32 samples per process


def to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_loader_splits_the_global_batch_over_processes():
    data = builtin_data.BuiltinDataset(num_images=30, image_size=16, transform=to_tensor)
    seen = []
    for rank in range(2):
        loader = datasets.build_loader(data, 8, world_size=2, rank=rank, train=True, seed=3,
                                       pin_memory=False)
        batches = list(datasets.epoch_iterator(loader, 0))
        assert len(batches) == 3  # 15 samples per process, 4 per batch, last one dropped
        assert all(images.shape == (4, 3, 16, 16) and labels.shape == (4,) for images, labels in batches)
        seen.append(list(loader.sampler))
    assert not set(seen[0]) & set(seen[1])  # the two processes see different samples
    # Deterministic order for a seed and epoch; a new epoch reshuffles.
    sampler = datasets.build_loader(data, 8, world_size=2, rank=0, seed=3).sampler
    sampler.set_epoch(0)
    assert list(sampler) == seen[0]
    sampler.set_epoch(1)
    assert list(sampler) != seen[0]


def test_epoch_iterator_resumes_mid_epoch():
    data = builtin_data.BuiltinDataset(num_images=20, image_size=16, transform=to_tensor)
    loader = datasets.build_loader(data, 4, seed=1, pin_memory=False)
    full = [labels for _, labels in datasets.epoch_iterator(loader, 2)]
    resumed = [labels for _, labels in datasets.epoch_iterator(loader, 2, skip=3)]
    assert len(full) == 5 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    assert len(list(datasets.epoch_iterator(loader, 3))) == 5  # the skip applies to one epoch


def test_validation_loader_keeps_order_and_every_sample():
    data = builtin_data.BuiltinDataset("val", num_images=10, image_size=16, transform=to_tensor)
    loader = datasets.build_loader(data, 4, train=False, pin_memory=False)
    labels = torch.cat([y for _, y in loader])
    assert list(loader.sampler) == list(range(10)) and len(labels) == 10
    assert labels.tolist() == [data.sample(i)[2] for i in range(10)]


def test_loader_collates_multi_crop_samples_with_workers():
    transform = tr.MultiCropTrainDataTransform([32, 16], [2, 3], grid_sizes=[2, 1])
    data = builtin_data.BuiltinDataset(num_images=8, image_size=32, transform=transform)
    loader = datasets.build_loader(data, 4, num_workers=1, seed=0, pin_memory=False)
    assert loader.persistent_workers
    (views, locations), labels = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert [tuple(g.shape) for g in locations] == [(4, 2, 2, 2)] * 2 + [(4, 1, 1, 2)] * 3
    assert labels.shape == (4,)


def _views_loader(num_workers, seed=3):
    tf = tr.MultiCropTrainDataTransform(size_crops=[32, 16], num_crops=[2, 2], min_scale_crops=[0.4, 0.1],
                                     max_scale_crops=[1, 0.4], grid_sizes=[4, 2])
    ds = builtin_data.BuiltinDataset("train", num_images=24, image_size=32, transform=tf)
    return datasets.build_loader(ds, 8, train=True, num_workers=num_workers, seed=seed)


def test_training_views_depend_only_on_seed_epoch_and_index():
    """Resumed runs see exactly the crops of the uninterrupted run, whatever the workers."""
    full = [b for b in datasets.epoch_iterator(_views_loader(0), epoch=1)]
    torch.manual_seed(123)  # unrelated global state must not matter
    resumed = [b for b in datasets.epoch_iterator(_views_loader(2), epoch=1, skip=1)]
    assert len(full) == 3 and len(resumed) == 2
    for (a, la), (b, lb) in zip(full[1:], resumed):
        assert torch.equal(la, lb)
        for va, vb in zip(a[0] + a[1], b[0] + b[1]):
            assert torch.equal(va, vb)
    other_epoch = next(iter(datasets.epoch_iterator(_views_loader(0), epoch=2)))
    assert not torch.equal(other_epoch[0][0][0], full[0][0][0][0])


def test_builtin_segmentation_masks_stay_within_their_classes():
    seg = builtin_data.BuiltinSegmentation("val", num_images=40, image_size=32, num_classes=3)
    assert seg.num_classes == 4  # background + 3 object classes
    values = set()
    for i in range(len(seg)):
        values |= set(np.unique(seg[i][1].numpy()).tolist())
    assert values <= {0, 1, 2, 3} and len(values) == 4
