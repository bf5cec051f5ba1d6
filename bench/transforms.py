"""Throughput of the training transform on one core, against the reference pipeline.

    python bench/transforms.py [--images 200] [--rounds 5] [--photo some.jpg]

Every iteration opens the JPEG from its bytes (so decoding is included, as in a data loader)
and makes the default 2×224 + 6×96 views with their location grids. Both pipelines run in the
same process, alternating in rounds so that load from other processes hits both alike; the
best round of each is reported (the least disturbed one), with the median in brackets. The
picture is a 500×375 photograph-like JPEG made by ``datasets.synthetic_photo`` unless
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

import datasets  # noqa: E402
import transforms  # noqa: E402


def images_per_second(transform, data: bytes, num_images: int) -> float:
    start = time.perf_counter()
    for _ in range(num_images):
        views, locations = transform(Image.open(io.BytesIO(data)))
    return num_images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images per round and pipeline")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--photo", type=Path, help="a JPEG to use instead of the synthetic photo")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic photo")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core, as in a DataLoader worker
    if args.photo is not None:
        data = args.photo.read_bytes()
    else:
        buf = io.BytesIO()
        datasets.synthetic_photo(500, 375).save(buf, "JPEG", quality=args.quality)
        data = buf.getvalue()
    width, height = Image.open(io.BytesIO(data)).size
    print(f"image {width}x{height} JPEG, {len(data) / 1024:.0f} KiB; views 2x224 + 6x96; "
          f"torch {torch.__version__}, 1 thread")

    pipelines = {"reference (per-crop PIL/torchvision)": transforms.ReferenceMultiCropTransform(),
                 "ours (MultiCropTrainDataTransform)": transforms.MultiCropTrainDataTransform()}
    rates = {name: [] for name in pipelines}
    for name, transform in pipelines.items():  # warm-up
        images_per_second(transform, data, 10)
    for _ in range(args.rounds):
        for name, transform in pipelines.items():
            rates[name].append(images_per_second(transform, data, args.images))
    for name, values in rates.items():
        print(f"{name:40s} {max(values):7.1f} images/s (median {statistics.median(values):.1f})")
    reference, ours = (max(v) for v in rates.values())
    print(f"speed-up: {ours / reference:.2f}x")


if __name__ == "__main__":
    main()
