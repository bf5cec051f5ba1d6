"""Throughput of the training transform on one core, against the reference pipeline.

    python bench/transforms.py [--images 200] [--rounds 5] [--photo some.jpg]
    python bench/transforms.py --crops 32x2 --size 32x32     # the CPU demo's views of CIFAR-size images

Every iteration opens the JPEG from its bytes (so decoding is included, as in a data loader)
and makes the views (default 2×224 + 6×96) with their location grids. Three pipelines run in
the same process, alternating in rounds so that load from other processes hits all alike; the
best round of each is reported (the least disturbed one), with the median in brackets:
- the reference, crop by crop with PIL/torchvision;
- ours, image by image (MultiCropTrainDataTransform);
- ours with the colour distortion of a whole batch at once (batch_colours=True, then
  collate_views on --batch images), as pretraining loads its data;
- ours from memory (main_vicregl.py --in-memory): the image decoded once, then every view of a
  whole batch made at once (cropped by two matrix products, colours as above).
The picture is a photograph-like JPEG of --size made by ``builtin_data.synthetic_photo`` unless
``--photo`` names a real one.
"""
import argparse
import io
import statistics
import sys
import time
from pathlib import Path

# The repository root first: this file's own name would otherwise shadow ../transforms.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import builtin_data  # noqa: E402
import datasets  # noqa: E402
import shared_images  # noqa: E402
import transforms  # noqa: E402
from bench.reference_transforms import ReferenceMultiCropTransform  # noqa: E402


DEFAULT_CROPS = "224x2,96x6"


def images_per_second(transform, data: bytes, num_images: int, batch: int = 0) -> float:
    """Images per second of ``transform``; with ``batch``, samples are collated (collate_views)
    ``batch`` at a time, as a DataLoader worker does."""
    start = time.perf_counter()
    samples = []
    for _ in range(num_images):
        samples.append((transform(Image.open(io.BytesIO(data))), 0))
        if batch and len(samples) == batch:
            transforms.collate_views(samples)
            samples = []
    if samples and batch:
        transforms.collate_views(samples)
    return num_images / (time.perf_counter() - start)


class _Copies:
    """``count`` copies of one decoded image, with labels, as a dataset that InMemoryImages can hold."""

    def __init__(self, image: Image.Image, count: int):
        self.image, self.count, self.transform = image, count, None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.image, 0


def in_memory_images_per_second(memory, num_images: int, batch: int, epoch: int) -> float:
    """Images per second of whole batches made from memory (EpochSeededDataset.__getitems__, then
    collate_views), as pretraining with --in-memory loads them."""
    dataset = datasets.EpochSeededDataset(memory, seed=0)
    start = time.perf_counter()
    for first in range(0, num_images, batch):
        keys = [(epoch, k % len(memory)) for k in range(first, min(first + batch, num_images))]
        transforms.collate_views(dataset.__getitems__(keys))
    return num_images / (time.perf_counter() - start)


def parse_crops(text: str):
    """'224x2,96x6' -> ([224, 96], [2, 6])."""
    pairs = [item.split("x") for item in text.split(",")]
    return [int(s) for s, _ in pairs], [int(n) for _, n in pairs]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images per round and pipeline")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--photo", type=Path, help="a JPEG to use instead of the synthetic photo")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic photo")
    parser.add_argument("--size", default="500x375", help="width x height of the synthetic photo")
    parser.add_argument("--crops", default=DEFAULT_CROPS, help="crop sides and counts (other than the default: "
                        "area scales 0.3-1 and grids of side // 32)")
    parser.add_argument("--batch", type=int, default=64, help="images per collated batch")
    args = parser.parse_args()
    sizes, counts = parse_crops(args.crops)
    kw = {} if args.crops == DEFAULT_CROPS else dict(  # the default: the published scales
        size_crops=sizes, num_crops=counts, min_scale_crops=[0.3] * len(sizes), max_scale_crops=[1.0] * len(sizes),
        grid_sizes=[max(1, s // 32) for s in sizes])

    torch.set_num_threads(1)  # one core, as in a DataLoader worker
    if args.photo is not None:
        data = args.photo.read_bytes()
    else:
        buf = io.BytesIO()
        builtin_data.synthetic_photo(*(int(v) for v in args.size.split("x"))).save(buf, "JPEG", quality=args.quality)
        data = buf.getvalue()
    width, height = Image.open(io.BytesIO(data)).size
    print(f"image {width}x{height} JPEG, {len(data) / 1024:.0f} KiB; views {args.crops}; "
          f"torch {torch.__version__}, 1 thread")

    batched = f"ours, colours per batch of {args.batch}"
    pipelines = {"reference (per-crop PIL/torchvision)": (ReferenceMultiCropTransform(**kw), 0),
                 "ours, image by image": (transforms.MultiCropTrainDataTransform(**kw), 0),
                 batched: (transforms.MultiCropTrainDataTransform(**kw, batch_colours=True), args.batch)}
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    memory = shared_images.InMemoryImages(_Copies(decoded, args.batch),
                                     transforms.MultiCropTrainDataTransform(**kw, batch_colours=True))
    in_memory = f"ours, whole batches of {args.batch} from memory"
    rates = {name: [] for name in [*pipelines, in_memory]}
    for name, (transform, batch) in pipelines.items():  # warm-up
        images_per_second(transform, data, 10, batch)
    in_memory_images_per_second(memory, 10, args.batch, 0)
    for r in range(args.rounds):
        for name, (transform, batch) in pipelines.items():
            rates[name].append(images_per_second(transform, data, args.images, batch))
        rates[in_memory].append(in_memory_images_per_second(memory, args.images, args.batch, r + 1))
    for name, values in rates.items():
        print(f"{name:40s} {max(values):7.1f} images/s (median {statistics.median(values):.1f})")
    reference, per_image, per_batch, from_memory = (max(v) for v in rates.values())
    print(f"speed-up over the reference: image by image {per_image / reference:.2f}x, "
          f"colours per batch {per_batch / reference:.2f}x, whole batches from memory {from_memory / reference:.2f}x "
          f"({from_memory / per_batch:.2f}x colours per batch)")


if __name__ == "__main__":
    main()
