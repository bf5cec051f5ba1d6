"""bench/gpu_results.py: the GPU comparisons (VICRegL against VICReg by classification on class folders,
and by segmentation on the built-in masks), checked end to end on a CPU at a size that learns nothing:
each run gets its alpha, each number comes from its own run's output, and the tables say which is which."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import builtin_data
from bench import gpu_results
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def class_folders(root, train=40, val=10):
    for split, count in (("train", train), ("val", val)):
        for k in range(count):
            folder = root / split / ("a" if k % 2 == 0 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            builtin_data.synthetic_photo(32, 32, seed=k + 1000 * (split == "val")).save(folder / f"{k:03d}.png")
    return root


def last_json(path, prefix="{"):
    lines = [l for l in Path(path).read_text().splitlines() if l.startswith(prefix)]
    return json.loads(lines[-1][len(prefix) - 1:])


@pytest.mark.slow
def test_both_comparisons_end_to_end(tmp_path):
    data, out = class_folders(tmp_path / "data"), tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_results.py", "--cifar-dir", str(data), "--out", str(out),
                           "--minutes", "20", "--max-steps", "1", "--epochs", "1", "--batch-size", "16",
                           "--seg-images", "256", "--seg-seeds", "3", "5", "--head-iters", "2", "--seg-val-images",
                           "2", "--workers", "0", "--device", "cpu", "--arch", "resnet_test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "CPU" and results["minutes"] > 0
    table = (out / "results.md").read_text()
    for name, alpha in (("vicreg", 1.0), ("vicregl", 0.75)):
        label = "VICRegL (alpha 0.75)" if name == "vicregl" else "VICReg (alpha 1.0)"
        ckpt = torch.load(out / f"classification_{name}" / "model.pth", weights_only=True)
        assert ckpt["args"]["alpha"] == alpha and ckpt["steps"] == 1
        assert ckpt["args"]["small_input"]  # 32-pixel crops give 4x4 maps
        cls = results["classification"][name]
        assert cls["steps"] == 1
        summary = last_json(out / f"classification_eval_{name}" / "stats.txt")
        assert summary["summary"] and cls["knn_top1"] == summary["knn_top1"]
        assert cls["linear_top1"] == summary["best_acc1"]
        assert f"from {out / f'classification_{name}' / 'backbone.pth'}" in \
            (out / f"classification_eval_{name}.log").read_text()
        assert (f"| resnet_test | {label}, 1 step of 16 (0.4 epochs) | {cls['knn_top1']:.1f} | "
                f"{cls['linear_top1']:.1f} |") in table
        for seed in (3, 5):
            ckpt = torch.load(out / f"segmentation_{name}_s{seed}" / "model.pth", weights_only=True)
            saved = ckpt["args"]
            assert saved["alpha"] == alpha and ckpt["steps"] == 1 and saved["builtin_seed"] == seed
            # 96-pixel crops of mosaic scenes, dilated: 12x12 maps, 20 of their positions matched
            assert saved["dilated"] == 1 and not saved["small_input"] and saved["size_crops"] == [96]
            assert saved["builtin_layout"] == "mosaic" and saved["num_matches"] == [20, 4]
            assert saved["batch_size"] == 256 and saved["no_flip_grid"] == 0
            seg = results["segmentation"][f"{name} seed {seed}"]
            head = last_json(out / f"segmentation_eval_{name}_s{seed}" / "stats.txt", "Val: {")
            assert seg["miou"] == round(head["mIoU"], 2) and seg["steps"] == 1 and seg["seed"] == seed
            assert f"loaded resnet_mini weights from {out / f'segmentation_{name}_s{seed}' / 'backbone.pth'}" in \
                (out / f"segmentation_eval_{name}_s{seed}.log").read_text()
            assert (f"| resnet_mini | {label}, 1 step of 256 (1 epochs) | {seed} | {seg['miou']:.1f} | "
                    f"{seg['aacc']:.1f} |") in table
    for seed in (3, 5):
        vicreg = torch.load(out / f"segmentation_vicreg_s{seed}" / "model.pth", weights_only=True)["args"]
        assert vicreg["max_steps"] == 1 and vicreg["time_budget"] == 0  # as many steps as VICRegL did
        head = last_json(out / f"segmentation_eval_random_s{seed}" / "stats.txt", "Val: {")
        assert results["segmentation"][f"random seed {seed}"]["miou"] == round(head["mIoU"], 2)
    random = last_json(out / "classification_eval_random" / "stats.txt")
    assert results["classification"]["random"]["knn_top1"] == random["knn_top1"]
    assert table.index("classification (CPU):") < table.index("segmentation (CPU):")
    assert "| backbone | pretraining | image seed | mIoU (%) |" in table


def test_classification_without_its_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^--parts classification needs --cifar-dir"):
        gpu_results.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_speed_needs_the_original(tmp_path):
    with pytest.raises(UserError, match=r"^--parts speed needs --reference \(a checkout of github.com/"):
        gpu_results.main(["--out", str(tmp_path / "out"), "--parts", "speed"])


@pytest.mark.skipif(not os.environ.get("VICREGL_ORIGINAL_DIR"), reason="needs a checkout of the original in "
                    "$VICREGL_ORIGINAL_DIR")
def test_speed_row_against_the_original(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_results.py", "--parts", "speed", "--reference",
                           os.environ["VICREGL_ORIGINAL_DIR"], "--out", str(out), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = json.loads((out / "results.json").read_text())["speed"]["train_step"]["lines"]
    assert lines[0].startswith("CPU, ") and lines[1].split() == ["arch", "original", "img/s", "ours", "img/s",
                                                                  "ours/original", "loss", "rel.", "diff"]
    row = lines[2].split()
    assert row[0] == "resnet50" and abs(float(row[3].rstrip("x")) - float(row[2]) / float(row[1])) < 0.05
    assert "```\n" + "\n".join(lines) + "\n```" in (out / "results.md").read_text()
