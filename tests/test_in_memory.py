"""--in-memory: training images decoded once into one array, their views made a whole batch at a time.

The batched views are checked against the reference's own PIL/torchvision operations applied with the
same random parameters, and those parameters against what the image-by-image path draws for the same
(seed, epoch, index): the same views, so runs and resumes behave as without --in-memory.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import builtin_data
import datasets
import shared_images
import transforms as tr
from test_transforms import grey_level_diffs, render_like_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_folder(root, sizes, seed=0):
    """root/<class>/<k>.png: photograph-like images (builtin_data.synthetic_photo) of the given (width, height),
    alternating between two classes (k even: a, odd: b)."""
    for k, (width, height) in enumerate(sizes):
        folder = root / ("a" if k % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        builtin_data.synthetic_photo(width, height, seed=seed + k).save(folder / f"{k:03d}.png")
    return root


# ----------------------------------------------------------------------------- the resize as matrices

def cubic_kernel(t):
    """Keys' cubic kernel with a = -0.5, written from its textbook definition."""
    a, t = -0.5, abs(t)
    if t < 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def naive_weights(start, length, size, out):
    """One output row at a time: output o samples the segment at start + (o + 0.5)·length/out, the
    kernel widened by length/out when shrinking, restricted to the segment and normalised."""
    scale = length / out
    support = max(scale, 1.0)
    w = np.zeros((out, size))
    for o in range(out):
        centre = start + (o + 0.5) * scale
        for x in range(start, start + length):
            w[o, x] = cubic_kernel((x + 0.5 - centre) / support)
        w[o] /= w[o].sum()
    return w


@pytest.mark.parametrize("out", [8, 16, 48])  # shrinking, both, enlarging
def test_resize_weights_equal_a_naive_loop(out):
    g = torch.Generator().manual_seed(out)
    starts = torch.randint(0, 20, (12,), generator=g)
    lengths = torch.randint(1, 21, (12,), generator=g)
    got = tr.resize_weights(starts, lengths, 40, out)
    for k in range(12):
        want = naive_weights(int(starts[k]), int(lengths[k]), 40, out)
        # float32 positions of up to 40 pixels: kernel arguments rounded by about 4e-6
        np.testing.assert_allclose(got[k].numpy(), want, rtol=0, atol=1e-5)


def test_crop_batch_equals_torchs_resize_of_each_crop():
    """Crops of 24x40 images (every size from 1 pixel to the whole side), resized to 16 and 32 pixels
    and flipped: torch's antialiased bicubic resize of each cropped image on its own, in float, then
    rounded to grey levels (torch's uint8 resize also rounds and clips between its two passes, which
    moves noise-like images by a few levels more)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 24, 40), dtype=torch.uint8, generator=g)
    images[:20] = (images[:20].float() * torch.linspace(0, 1, 40)).to(torch.uint8)  # smoother ones too
    i = torch.randint(0, 24, (40,), generator=g)
    j = torch.randint(0, 40, (40,), generator=g)
    h = (torch.rand(40, generator=g) * (24 - i)).long() + 1
    w = (torch.rand(40, generator=g) * (40 - j)).long() + 1
    crops, flips = torch.stack([i, j, h, w], 1), torch.rand(40, generator=g) < 0.5
    for size in (16, 32):
        got = tr.crop_batch(images, crops, flips, size)
        assert got.dtype == torch.float32 and got.shape == (40, 3, size, size)
        for k in range(40):
            a, b, c, d = crops[k].tolist()
            want = F.interpolate(images[k:k + 1, :, a:a + c, b:b + d].float(), size=(size, size), mode="bicubic",
                                 antialias=True)[0].round().clamp(0, 255)
            if flips[k]:
                want = want.flip(-1)
            diff = (got[k] - want).abs()
            assert diff.max() <= 1 and diff.mean() < 0.01, (k, crops[k].tolist(), size)


def test_location_grids_of_many_crops_reproduce_reference_vectors(data_dir):
    """All the reference's grids of one side in one call, flipped and unflipped crops mixed."""
    cases = torch.load(data_dir / "location_grids.pt", weights_only=True)
    for n in sorted({case["N"] for case in cases}):
        chosen = [case for case in cases if case["N"] == n]
        assert len({case["flip"] for case in chosen}) == 2
        got = tr.location_grids(torch.tensor([case["crop"] for case in chosen]), n,
                                torch.tensor([case["flip"] for case in chosen]))
        assert got.dtype == torch.float32 and got.shape == (len(chosen), n, n, 2)
        for grid, case in zip(got, chosen):
            # the reference summed cell sizes in float32: equal up to float32 rounding
            torch.testing.assert_close(grid, case["grid"], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- whole batches

def test_batched_views_are_the_reference_operations_with_the_per_image_draws(tmp_path):
    """Two crop sizes, flipped grids (--no-flip-grid 0), blur on: each view of a batch made at once is
    the reference's PIL/torchvision pipeline applied with parameters that are exactly those the
    image-by-image path draws for the same (epoch, index)."""
    root = write_folder(tmp_path / "train", [(36, 28)] * 12)
    kw = dict(size_crops=(32, 16), num_crops=(2, 3), min_scale_crops=(0.3, 0.1), max_scale_crops=(1.0, 0.4),
              grid_sizes=(2, 1), no_flip_grid=False, batch_colours=True, blur_p=(1.0, 0.1))
    transform = tr.MultiCropTrainDataTransform(**kw)
    plain = datasets.ImageFolderDataset(root, transform)
    memory = shared_images.InMemoryImages(datasets.ImageFolderDataset(root, tr.MultiCropTrainDataTransform(**kw)),
                                     tr.MultiCropTrainDataTransform(**kw))
    keys = [(3, 7), (3, 0), (3, 11), (3, 4), (3, 7)]  # an image twice: its two samples differ by index only
    made = datasets.EpochSeededDataset(memory, seed=5).__getitems__(keys)
    assert isinstance(made, tr.BatchOfViews)
    one_by_one = datasets.EpochSeededDataset(plain, seed=5).__getitems__(keys)
    (views, grids), labels = tr.collate_views(made)
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert labels.tolist() == [plain.samples[i][1] for _, i in keys] == [1, 0, 1, 0, 1]
    params = [[made.params[v][b] for v in range(5)] for b in range(5)]
    assert all(ps[v].blur_sigma is not None for ps in params for v in (0, 2, 4))  # blur_p 1.0: even in group
    assert any(p.flip for ps in params for p in ps) and any(p.jitter is None for ps in params for p in ps)
    for b, (epoch, index) in enumerate(keys):
        (deferred, their_grids), _ = one_by_one[b]
        assert deferred.params == params[b]  # the same random draws
        for v, grid in enumerate(their_grids):
            assert torch.equal(grids[v][b], grid)
        image = Image.open(plain.samples[index][0]).convert("RGB")
        theirs = render_like_reference(image, params[b], transform)
        for v, d in enumerate(grey_level_diffs([view[b] for view in views], theirs)):
            assert d.mean() < 3.0, (b, v, params[b][v])
            assert (d > 16).float().mean() < 0.01, (b, v, params[b][v])
        # and next to the image-by-image views: only the resize's rounding differs (at most a grey level,
        # on some pixels, which brightness and contrast factors of up to 1.4 each can double)
        for v, d in enumerate(grey_level_diffs([view[b] for view in views], transform.render(image, params[b]))):
            assert d.mean() < 1.0, (b, v, params[b][v])


def test_other_datasets_still_load_sample_by_sample(tmp_path):
    root = write_folder(tmp_path / "train", [(20, 20)] * 4)
    dataset = datasets.EpochSeededDataset(datasets.ImageFolderDataset(root, None), seed=0)
    items = dataset.__getitems__([(0, 2), (0, 1)])
    # a/000 a/002 b/001 b/003
    assert [label for _, label in items] == [1, 0] and all(isinstance(img, Image.Image) for img, _ in items)


def test_arrays_and_builtin_scenes_are_held_with_their_labels():
    transform = tr.MultiCropTrainDataTransform(size_crops=(32,), num_crops=(2,), min_scale_crops=(0.3,),
                                               max_scale_crops=(1.0,), grid_sizes=(1,), batch_colours=True)
    builtin = builtin_data.BuiltinDataset("train", 6, image_size=32)
    memory = shared_images.InMemoryImages(builtin, transform)
    assert memory.images.shape == (6, 3, 32, 32) and memory.num_classes == builtin.num_classes
    for k in range(6):
        image, _, label = builtin.sample(k)
        assert torch.equal(memory.images[k], torch.from_numpy(np.array(image)).permute(2, 0, 1))
        assert int(memory.labels[k]) == label
    assert builtin.transform is None  # given back as it was


def test_images_of_different_sizes_are_refused_by_name(tmp_path):
    root = write_folder(tmp_path / "train", [(32, 32), (32, 32), (40, 32)])
    with pytest.raises(ValueError, match=r"002\.png\) is 40x32, image 0 is 32x32"):
        shared_images.InMemoryImages(datasets.ImageFolderDataset(root), tr.MultiCropTrainDataTransform())


def test_images_that_would_fill_the_memory_are_refused(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "train", [(32, 32)] * 3)
    monkeypatch.setattr(shared_images, "physical_memory", lambda: 2 * 3 * 3 * 32 * 32 - 2)
    with pytest.raises(ValueError, match=r"3 images of 32x32 take 0.0 GiB decoded, more than half of this machine"):
        shared_images.InMemoryImages(datasets.ImageFolderDataset(root), tr.MultiCropTrainDataTransform())
    monkeypatch.setattr(shared_images, "physical_memory", lambda: 2 * 3 * 3 * 32 * 32)
    memory = shared_images.InMemoryImages(datasets.ImageFolderDataset(root), tr.MultiCropTrainDataTransform())
    assert memory.images.shape[0] == 3


def test_main_vicregl_names_the_flag_for_images_of_different_sizes(tmp_path):
    write_folder(tmp_path / "data" / "train", [(32, 32)] * 20 + [(40, 32)])
    proc = subprocess.run([sys.executable, "main_vicregl.py", "--dataset", "imagenet1k", "--data-dir",
                           str(tmp_path / "data"), "--in-memory", "--num-workers", "0", "--arch", "resnet_test",
                           "--size-crops", "32", "--num-crops", "2", "--min_scale_crops", "0.3", "--max_scale_crops",
                           "1", "--num_matches", "1", "1", "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size",
                           "8", "--device", "cpu", "--exp-dir", str(tmp_path / "exp")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --in-memory: images of different sizes cannot be held as one array: image 10 (")
    assert last.endswith("020.png) is 40x32, image 0 is 32x32")


@pytest.mark.slow
def test_stopped_mid_epoch_then_resumed_equals_uninterrupted(tmp_path):
    """A run stopped within an epoch (SIGTERM) and restarted ends with the weights of a run that was not
    stopped: the batched views depend on (seed, epoch, index) alone."""
    from test_main import TINY, run, same_weights
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "main_vicregl.py", *TINY, "--in-memory", "--exp-dir", str(stopped)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["st"] == 1:  # 6 steps an epoch, 12 in all
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    ckpt = torch.load(stopped / "model.pth", weights_only=True)
    assert 2 <= ckpt["epoch"] * 6 + ckpt["step_in_epoch"] < 12
    resumed = run(stopped, "--in-memory")
    assert "--in-memory: 96 training images of 32x32 decoded" in resumed.stdout
    run(whole, "--in-memory")
    same_weights(whole / "model.pth", stopped / "model.pth")


def test_demo_holds_small_images_of_one_size_in_memory(tmp_path, monkeypatch):
    import demo
    uniform = datasets.ImageFolderDataset(write_folder(tmp_path / "uniform", [(32, 32)] * 4))
    mixed = datasets.ImageFolderDataset(write_folder(tmp_path / "mixed", [(32, 32)] * 3 + [(32, 33)]))
    assert demo.loading_flags(uniform) == ["--in-memory", "--num-workers", "0"]
    builtin = builtin_data.BuiltinDataset("train", 8, image_size=32)
    assert demo.loading_flags(builtin) == ["--in-memory", "--num-workers", "0"]
    assert demo.loading_flags(mixed) == ["--num-workers", "1"]
    (tmp_path / "uniform" / "a" / "999.png").write_bytes(b"not an image")  # no header to read: not held
    assert demo.loading_flags(datasets.ImageFolderDataset(tmp_path / "uniform")) == ["--num-workers", "1"]
    monkeypatch.setattr(demo, "IN_MEMORY_BYTES", 4 * 3 * 32 * 32 - 1)
    assert demo.loading_flags(uniform) == ["--num-workers", "1"]


# ----------------------------------------------------------------------------- several processes

class CountingFolder(datasets.ImageFolderDataset):
    """An image folder that counts the images it was asked for (decodings) in this process."""
    reads = 0

    def __getitem__(self, index):
        CountingFolder.reads += 1
        return super().__getitem__(index)


def _sharing_worker(rank, world, init_file, root, shared, out_dir):
    import datetime
    import torch.distributed as dist
    import main_vicregl
    import utils
    torch.set_num_threads(1)
    shared_images.SHARED_FOLDERS = (shared,)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    info = utils.DistInfo(rank=rank, world_size=world, local_rank=rank, backend="gloo")
    result = {}
    try:
        memory = main_vicregl.in_memory(CountingFolder(root), tr.MultiCropTrainDataTransform(), info)
    except utils.UserError as e:
        result["error"] = str(e)
    else:
        result.update(images=memory.images.clone(), labels=memory.labels.clone(), reads=CountingFolder.reads,
                      file=memory.file, storage=memory.images.untyped_storage().filename)
        dist.barrier()
        result["left"] = sorted(os.listdir(shared))
        if rank == 0:  # written by one process, seen by all: one copy, not several
            memory.images[-1] = 7
        dist.barrier()
        result["after_write"] = memory.images[-1].clone()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _run_sharing(tmp_path, root, world=3):
    import torch.multiprocessing as mp
    shared = tmp_path / "shm"
    shared.mkdir()
    mp.start_processes(_sharing_worker, args=(world, str(tmp_path / "init"), str(root), str(shared), str(tmp_path)),
                       nprocs=world, start_method="spawn")
    return shared, [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
def test_processes_of_a_machine_decode_once_and_share_the_images(tmp_path):
    """Under torchrun/SLURM the first process of a machine decodes; the others map its file, decoding
    nothing; the file is gone once all have mapped it, and a write by one process is seen by all."""
    root = write_folder(tmp_path / "train", [(24, 20)] * 5)
    shared, ranks = _run_sharing(tmp_path, root)
    files = sorted(root.rglob("*.png"))  # a/000 a/002 a/004 b/001 b/003
    want = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    assert [r["reads"] for r in ranks] == [5, 0, 0]
    for r in ranks:
        assert torch.equal(r["images"], want) and r["labels"].tolist() == [0, 0, 0, 1, 1]
        assert r["storage"] == ranks[0]["file"] and os.path.dirname(r["file"]) == str(shared)
        assert r["left"] == [] and torch.equal(r["after_write"], torch.full((3, 20, 24), 7, dtype=torch.uint8))
    assert os.listdir(shared) == []


@pytest.mark.slow
def test_a_failure_to_decode_stops_every_process_and_leaves_no_file(tmp_path):
    root = write_folder(tmp_path / "train", [(24, 20)] * 3 + [(20, 20)])
    shared, ranks = _run_sharing(tmp_path, root)
    assert ranks[0]["error"].startswith("--in-memory: images of different sizes cannot be held as one array")
    assert ranks[1]["error"] == ranks[2]["error"] == \
        "--in-memory: the images could not be decoded (the first process of a machine says why)"
    assert os.listdir(shared) == []


def test_shared_images_go_to_the_first_folder_with_room(tmp_path, monkeypatch):
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    roomy.mkdir()
    monkeypatch.setattr(shared_images, "SHARED_FOLDERS", (str(full), str(roomy)))  # full: does not exist
    assert shared_images.shared_folder(10) == str(roomy)
    free = os.statvfs(roomy).f_bavail * os.statvfs(roomy).f_frsize
    with pytest.raises(OSError, match="no room for .* MiB of images in .*full or .*roomy"):
        shared_images.shared_folder(free + 2 ** 40)
    builtin = builtin_data.BuiltinDataset("train", 4, image_size=16)
    memory = shared_images.InMemoryImages(builtin, tr.MultiCropTrainDataTransform(), share_as="x")
    assert memory.file == str(roomy / "x") and os.path.getsize(memory.file) == 4 * 8 + 4 * 3 * 16 * 16
    mapped = shared_images.InMemoryImages.mapped(builtin, None, memory.file, 4, 16, 16)
    assert torch.equal(mapped.images, memory.images) and torch.equal(mapped.labels, memory.labels)
    with pytest.raises(OSError, match="x holds 3104 bytes, expected 6176"):
        shared_images.InMemoryImages.mapped(builtin, None, memory.file, 4, 16, 32)
    memory.unshare()
    assert os.listdir(roomy) == []


def test_main_vicregl_under_torchrun_shares_the_images(tmp_path):
    import socket
    from test_main import TINY
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(port), "main_vicregl.py", *TINY, "--in-memory", "--max-steps", "2", "--exp-dir",
                           str(tmp_path / "exp")], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("--in-memory:"))
    assert "96 training images of 32x32" in line and "one copy per machine in " in line, line
    folder = line.split("one copy per machine in ")[1].split(",")[0]
    assert not [f for f in os.listdir(folder) if f.startswith("vicregl-images-") and f.endswith(socket.gethostname())
                and os.lstat(os.path.join(folder, f)).st_mtime >= start - 1]


KILLED_DECODER = """
import sys, time
sys.path.insert(0, {root!r})
import builtin_data, shared_images, transforms

class Slow(builtin_data.BuiltinDataset):
    def __getitem__(self, index):
        time.sleep(0.05)
        return super().__getitem__(index)

shared_images.SHARED_FOLDERS = ({shared!r},)
shared_images.InMemoryImages(Slow("train", 2000, image_size=16), transforms.MultiCropTrainDataTransform(), share_as="x")
"""


def test_a_decoder_killed_outright_leaves_no_file_holding_images(tmp_path):
    """SIGKILL (or the out-of-memory killer) while the first process decodes: no cleanup code runs, yet
    nothing that holds the images is left in the shared folder (on Linux; a file in /dev/shm would hold
    its memory until the machine restarts)."""
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        pytest.skip("needs /proc/<pid>/fd (Linux)")
    shared = tmp_path / "shm"
    shared.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DECODER.format(root=str(ROOT), shared=str(shared))],
                            stderr=subprocess.PIPE, text=True)
    link, deadline = shared / "x", time.time() + 120
    while not os.path.exists(link) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert os.path.getsize(link) == 2000 * 8 + 2000 * 3 * 16 * 16, proc.poll()  # there, and decoding
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(shared) == ["x"] and os.path.islink(link)
    assert not os.path.exists(link)  # leads nowhere: the file went with the process


def test_without_proc_the_shared_file_is_named_and_removed_by_unshare(tmp_path, monkeypatch):
    """Where /proc/<pid>/fd is missing (not Linux), or its link does not lead to the file (a /proc of
    another process space), the file itself is named: it works the same and unshare() removes it."""
    shared = tmp_path / "shm"
    shared.mkdir()
    monkeypatch.setattr(shared_images, "SHARED_FOLDERS", (str(shared),))
    builtin = builtin_data.BuiltinDataset("train", 3, image_size=16)
    plain = shared_images.InMemoryImages(builtin, None)
    fake = tmp_path / "proc"
    (fake / str(os.getpid()) / "fd").mkdir(parents=True)  # there, but leads nowhere
    for proc in (str(tmp_path / "none"), str(fake)):
        monkeypatch.setattr(shared_images, "PROC", proc)
        memory = shared_images.InMemoryImages(builtin, None, share_as="y")
        assert os.listdir(shared) == ["y"] and not os.path.islink(shared / "y")
        mapped = shared_images.InMemoryImages.mapped(builtin, None, str(shared / "y"), 3, 16, 16)
        assert torch.equal(mapped.images, plain.images) and torch.equal(mapped.labels, plain.labels)
        memory.unshare()
        assert os.listdir(shared) == []


def test_the_other_processes_are_told_why_they_cannot_open_the_shared_file(tmp_path, monkeypatch):
    first, second = tmp_path / "shm", tmp_path / "tmp"
    first.mkdir(), second.mkdir()
    monkeypatch.setattr(shared_images, "SHARED_FOLDERS", (str(first), str(second)))
    with pytest.raises(OSError, match=r"^z is in none of .*shm, .*tmp: the process of local rank 0 on each machine"):
        shared_images.find_shared("z")
    (second / "z").write_bytes(b"")
    assert shared_images.find_shared("z") == str(second / "z")
    os.symlink("/proc/999999999/fd/3", first / "z")  # the first process's, in a /proc this one does not see
    with pytest.raises(OSError, match=r"shm/z leads to /proc/999999999/fd/3, which this process cannot open: the "
                                      r"processes of a machine must see one another in /proc \(one container"):
        shared_images.find_shared("z")
