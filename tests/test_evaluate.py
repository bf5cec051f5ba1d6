"""evaluate.py: end-to-end runs of the real script (linear probe, fine-tuning, resume, refused
checkpoints), checkpoint forms, 1%/10% list selection and the offline error, the command line.

Why a colour-coded image folder for "beats chance": the built-in dataset is built so that colour is a
nuisance and the class is shape and texture; features of a *random* tiny backbone are at chance on
it (measured: about 10% for 10 classes, with a linear probe and with k-NN). Random convolutional
features do carry colour, so on a folder whose classes differ in colour a working probe must beat
chance by far, while a broken one (labels shuffled, head not trained, wrong features) cannot.
The built-in dataset serves the resume test, where only equality matters.
"""
import io
import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import transforms
import models
import utils
from conftest import ROOT
from models.knn import knn_accuracy
from models.vicregl import VICRegL, VICRegLConfig

COLOURS = [(200, 40, 40), (40, 180, 60), (50, 70, 210), (210, 200, 50)]


def make_colour_folder(root, n_train=24, n_val=12, size=32, seed=0):
    """ImageNet layout root/{train,val}/class<c>/c<c>_<split>_<i>.png: 4 classes of noisy images whose
    background colour is the class's (jittered), each with a rectangle of random colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.array(colour) + rng.integers(-40, 41, 3) + rng.normal(0, 25, (size, size, 3))
                y, x = rng.integers(0, size - 8, 2)
                h, w = rng.integers(4, 12, 2)
                img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"c{c}_{split}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 'pretrained' resnet_test backbone (random weights, non-trivial BatchNorm statistics) in every
    accepted form, and a convnext_test backbone (the wrong architecture)."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(123)
    backbone, _ = models.build_backbone("resnet_test")
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)  # zero-init residual BN weights would make blocks no-ops
    sd = backbone.state_dict()
    model = VICRegL(VICRegLConfig(arch="resnet_test", mlp="32-32", maps_mlp="16-16", num_classes=4))
    model.backbone.load_state_dict(sd)
    paths = dict(
        backbone=d / "backbone.pth",  # exported by main_vicregl.py, plain keys
        published=d / "resnet_test_alpha0.9.pth",  # as the published backbone files
        full=d / "model.pth",  # pretraining checkpoint, DDP's module. prefix
        wrapped=d / "wrapped.pth",
        evaluation=d / "checkpoint.pth",  # an evaluate.py checkpoint (e.g. after fine-tuning)
        wrong=d / "convnext.pth",
    )
    torch.save(sd, paths["backbone"])
    torch.save(sd, paths["published"])
    torch.save(dict(epoch=5, model={f"module.{k}": v for k, v in model.state_dict().items()}, optimizer={}),
               paths["full"])
    torch.save(dict(state_dict=sd), paths["wrapped"])
    torch.save(dict(epoch=1, model={**{f"backbone.{k}": v for k, v in sd.items()},
                                    "head.weight": torch.zeros(4, 64), "head.bias": torch.zeros(4)}),
               paths["evaluation"])
    torch.save(models.build_backbone("convnext_test")[0].state_dict(), paths["wrong"])
    return paths, sd


def run_eval(*args, check=True):
    cmd = [sys.executable, "evaluate.py", "--device", "cpu", *[str(a) for a in args]]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_stats(exp_dir):
    """The JSON lines of stats.txt (each start of the script first writes its command line)."""
    lines = (exp_dir / "stats.txt").read_text().splitlines()
    assert not lines[0].startswith("{"), "stats.txt should open with the command line"
    return [json.loads(line) for line in lines if line.startswith("{")]


def epoch_lines(stats):
    return [s for s in stats if "acc1" in s]


def backbone_of(checkpoint_path):
    ckpt = torch.load(checkpoint_path, weights_only=True)
    return {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}


FOLDER_RUN = ["--dataset", "imagefolder", "--arch", "resnet_test", "--crop-size", "32", "--resize-size", "32",
              "--batch-size", "24", "--epochs", "3", "--workers", "0", "--print-freq", "2"]


@pytest.fixture(scope="module")
def probe(colour_folder, sources, tmp_path_factory):
    """A linear probe of the 'pretrained' backbone given as a full pretraining checkpoint, with k-NN."""
    exp = tmp_path_factory.mktemp("probe") / "lin"
    out = run_eval(*FOLDER_RUN, "--data-dir", colour_folder, "--exp-dir", exp, "--pretrained",
                   sources[0]["full"], "--knn").stdout
    return exp, out


def test_linear_probe_beats_chance_and_leaves_the_backbone_untouched(probe, sources):
    (exp, out), (paths, sd) = probe, sources
    assert f"loaded backbone weights from {paths['full']}" in out and "done: best top-1" in out
    stats = read_stats(exp)
    epochs = epoch_lines(stats)
    assert [s["epoch"] for s in epochs] == [0, 1, 2]
    assert {"loss", "acc1", "acc5", "best_acc1", "best_acc5", "val_loss", "lr_head", "time"} <= set(epochs[0])
    assert epochs[-1]["best_acc1"] == max(s["acc1"] for s in epochs)
    assert epochs[-1]["best_acc1"] > 60, epochs  # 4 classes: chance is 25%
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    knn = [s for s in stats if "knn_k" in s]
    assert len(knn) == 1 and knn[0]["knn_top1"] > 60 and knn[0]["knn_temperature"] == 0.07
    assert stats[-1]["summary"] and stats[-1]["best_acc1"] == epochs[-1]["best_acc1"]
    # frozen: every weight and BatchNorm statistic exactly as loaded
    trained = backbone_of(exp / "checkpoint.pth")
    assert trained.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(trained[k], v), k


def test_finetuning_beats_chance_and_trains_the_backbone(colour_folder, sources, tmp_path):
    paths, sd = sources
    exp = tmp_path / "ft"
    run_eval(*FOLDER_RUN, "--data-dir", colour_folder, "--exp-dir", exp, "--pretrained", paths["backbone"],
             "--weights", "finetune", "--lr-backbone", "0.05", "--lr-head", "0.1")
    epochs = epoch_lines(read_stats(exp))
    assert epochs[-1]["best_acc1"] > 60, epochs
    assert all(s["lr_backbone"] > 0 for s in epochs)
    trained = backbone_of(exp / "checkpoint.pth")
    assert not torch.equal(trained["conv1.weight"], sd["conv1.weight"])
    assert not torch.equal(trained["layer4.0.conv2.weight"], sd["layer4.0.conv2.weight"])
    assert not torch.equal(trained["bn1.running_mean"], sd["bn1.running_mean"])  # train mode: statistics move


def test_resume_gives_the_uninterrupted_result(probe, colour_folder, sources, tmp_path, capsys):
    """Stopped after 2 of 3 epochs (here) and resumed (in a new process), with a loader worker, the
    probe ends where the uninterrupted probe (no worker) ended: same head, optimiser state, schedule
    and log lines."""
    whole, parts = probe[0], tmp_path / "parts"
    common = [*FOLDER_RUN, "--data-dir", colour_folder, "--exp-dir", parts, "--pretrained", sources[0]["full"],
              "--knn", "--workers", "1"]
    evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in common] + ["--stop-after-epochs", "2"]))
    first = capsys.readouterr().out
    assert "stopped after epoch 2 of 3" in first and "done:" not in first
    assert torch.load(parts / "checkpoint.pth", weights_only=True)["epoch"] == 2
    second = run_eval(*common).stdout
    assert "resuming from" in second and "epoch 2" in second

    a = torch.load(whole / "checkpoint.pth", weights_only=True)
    b = torch.load(parts / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["best_acc"] == b["best_acc"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    strip = lambda stats: [{k: v for k, v in s.items() if k != "time"} for s in stats]
    sa, sb = read_stats(whole), read_stats(parts)
    assert strip(epoch_lines(sa)) == strip(epoch_lines(sb))
    assert strip([s for s in sa if "knn_k" in s]) == strip([s for s in sb if "knn_k" in s])  # k-NN once
    assert strip(sa[-1:]) == strip(sb[-1:])  # the summary


BUILTIN_RUN = ["--dataset", "builtin", "--builtin-size", "32", "--builtin-images", "64", "--builtin-val-images",
               "24", "--crop-size", "32", "--resize-size", "32", "--arch", "resnet_test", "--batch-size", "16",
               "--workers", "0"]


def test_knn_only_on_builtin_equals_a_direct_computation(tmp_path, capsys):
    """The script's k-NN (bank: training images with the validation transform; padded batches) gives
    the accuracy of models.knn on features computed here by hand."""
    args = evaluate.get_args_parser().parse_args([*BUILTIN_RUN, "--knn-only", "--knn-k", "5", "--exp-dir",
                                                  str(tmp_path)])
    evaluate.main(args)
    logged = [s for s in read_stats(tmp_path) if "knn_k" in s]
    assert len(logged) == 1 and not (tmp_path / "checkpoint.pth").exists()
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("resnet_test")
    backbone.eval()
    tf = transforms.eval_transform(32, 32)
    feats = {}
    for split, n in (("train", 64), ("val", 24)):
        ds = evaluate.datasets.build_dataset("builtin", None, split, tf, num_images=n, image_size=32)
        x = torch.stack([ds[i][0] for i in range(n)])
        with torch.no_grad():
            feats[split] = (torch.nn.functional.normalize(backbone(x)[1], dim=1),
                            torch.tensor([ds[i][1] for i in range(n)]))
    expected = knn_accuracy(*feats["train"], *feats["val"], k=5, temperature=0.07, num_classes=10)
    assert logged[0]["knn_top1"] == pytest.approx(expected["top1"], abs=1e-3)
    assert logged[0]["knn_top5"] == pytest.approx(expected["top5"], abs=1e-3)
    assert f"k-NN top-1 {expected['top1']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["backbone", "published", "full", "wrapped", "evaluation"])
def test_every_checkpoint_form_loads(sources, form):
    paths, sd = sources
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("resnet_test")
    evaluate.load_pretrained(backbone, str(paths[form]), "resnet_test")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k


def _main(argv):
    args = evaluate.get_args_parser().parse_args([str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(args)
    return exit_info.value.code


def test_wrong_checkpoint_is_refused_plainly(sources, tmp_path, capsys):
    code = _main([*BUILTIN_RUN, "--exp-dir", tmp_path / "x", "--pretrained", sources[0]["wrong"]])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: checkpoint") and "Traceback" not in out + err
    assert "does not fit resnet_test" in err and "missing" in err and "unexpected" in err
    assert "pass --arch convnext_test" in err
    assert not (tmp_path / "x" / "stats.txt").exists()  # refused before anything is written


def test_missing_pretrained_file_is_a_user_error(tmp_path, capsys):
    code = _main([*BUILTIN_RUN, "--exp-dir", tmp_path, "--workers", "0", "--pretrained", tmp_path / "nope.pth"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint file not found") and "nope.pth" in err


@pytest.mark.parametrize("scale", ["0", "1.5"])
def test_min_crop_scale_outside_0_1_is_a_user_error(tmp_path, capsys, scale):
    code = _main([*BUILTIN_RUN, "--exp-dir", tmp_path, "--min-crop-scale", scale])
    assert code == 2 and "--min-crop-scale must be in (0, 1]" in capsys.readouterr().err


def test_min_crop_scale_bounds_the_training_crops():
    """Crops drawn with --min-crop-scale 0.5 cover about half of the image's area or more; the default
    keeps the reference's (0.08, 1)."""
    import transforms
    from PIL import Image
    image = Image.new("RGB", (64, 64))
    crop = transforms.linear_train_transform(32, 0.5).transforms[0]
    torch.manual_seed(0)
    areas = [crop.get_params(image, crop.scale, crop.ratio) for _ in range(500)]
    fractions = [h * w / 64 ** 2 for _, _, h, w in areas]
    assert min(fractions) >= 0.47 and max(fractions) <= 1.0  # sides are rounded to whole pixels
    default = transforms.linear_train_transform(32).transforms[0]
    assert default.scale == (0.08, 1.0)
    assert min(h * w / 64 ** 2 for _, _, h, w in (default.get_params(image, default.scale, default.ratio)
                                                   for _ in range(500))) < 0.2


def test_small_input_mismatch_gets_a_hint(sources):
    paths, _ = sources
    backbone, _ = models.build_backbone("resnet_test", small_input=True)
    with pytest.raises(utils.UserError, match="--small-input"):
        evaluate.load_pretrained(backbone, str(paths["backbone"]), "resnet_test")


# ----------------------------------------------------------------------------- 1% / 10% subsets

def _subset_args(folder, tmp_path, *extra):
    args = evaluate.get_args_parser().parse_args(
        [str(a) for a in ["--dataset", "imagefolder", "--data-dir", folder, "--exp-dir", tmp_path, "--arch",
                          "resnet_test", "--batch-size", "2", "--workers", "0", *extra]])
    evaluate.check_args(args)
    return args


def test_train_files_select_exactly_the_listed_images(colour_folder, tmp_path, capsys):
    listed = ["c0_train_003.png", "c1_train_000.png", "c3_train_023.png", "class2/c2_train_017.png"]
    (tmp_path / "list.txt").write_text("# my subset\n" + "\n".join(listed[:3]) + "\n\n" + listed[3]
                                       + "\nnot_an_image.JPEG\n")
    args = _subset_args(colour_folder, tmp_path, "--train-percent", "10", "--train-files", tmp_path / "list.txt",
                        "--knn")
    train_loader, _, knn_loader, num_classes = evaluate.build_data(args, utils.DistInfo())
    subset = train_loader.dataset.base
    chosen = sorted(subset.dataset.samples[i][0].split("/")[-1] for i in subset.indices)
    assert chosen == sorted(name.split("/")[-1] for name in listed)
    assert [subset[i][1] for i in range(len(subset))] == [0, 1, 2, 3]  # labels of the full dataset
    assert num_classes == 4 and len(knn_loader.dataset) == 4  # the k-NN bank is the subset too
    out = capsys.readouterr().out
    assert "training on 4 of 96 images" in out and "1 listed entries match no image" in out


def test_ambiguous_names_and_lists_that_match_nothing(colour_folder):
    ds = evaluate.datasets.build_dataset("imagefolder", colour_folder, "train")
    with pytest.raises(utils.UserError, match="none of the 2 entries"):
        evaluate.select_files(ds, ["n01440764_10026.JPEG", "n01440764_10027.JPEG"], "1percent.txt")
    # names that repeat across classes (as in CIFAR-style folders) are matched by their end of path
    ds.samples[0] = (ds.samples[0][0].rsplit("/", 1)[0] + "/0000.png", ds.samples[0][1])
    ds.samples[24] = (ds.samples[24][0].rsplit("/", 1)[0] + "/0000.png", ds.samples[24][1])
    both = evaluate.select_files(ds, ["0000.png"], "list")
    assert both.indices == [0, 24] and both.ambiguous == 1
    one = evaluate.select_files(ds, ["class1/0000.png"], "list")
    assert one.indices == [24] and one.ambiguous == 0


def test_offline_without_train_files_says_what_to_do(colour_folder, tmp_path, monkeypatch, capsys):
    # a closed local port: urllib fails at once, as it does offline, without waiting on the network
    monkeypatch.setattr(evaluate, "SUBSET_URL", f"http://127.0.0.1:{utils.free_port()}/{{percent}}percent.txt")
    code = _main(["--dataset", "imagefolder", "--data-dir", colour_folder, "--exp-dir", tmp_path, "--arch",
                  "resnet_test", "--train-percent", "1", "--workers", "0", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --train-percent 1 needs the list")
    assert "--train-files /path/to/1percent.txt" in err and "127.0.0.1" in err


def test_download_is_cached_in_the_experiment_folder(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(b"n01440764_10026.JPEG\nn01440764_10027.JPEG\n")

    monkeypatch.setattr(evaluate.urllib.request, "urlopen", fake_urlopen)
    entries, source = evaluate.download_file_list(10, tmp_path)
    assert calls == [(evaluate.SUBSET_URL.format(percent=10), evaluate.DOWNLOAD_TIMEOUT_S)]
    assert "simclr/master/imagenet_subsets/10percent.txt" in calls[0][0] and source == calls[0][0]
    assert entries == ["n01440764_10026.JPEG", "n01440764_10027.JPEG"]
    assert evaluate.read_file_list(tmp_path / "10percent.txt") == entries  # saved for the next run

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(evaluate.urllib.request, "urlopen", offline)
    assert evaluate.download_file_list(10, tmp_path) == (entries, str(tmp_path / "10percent.txt"))
    with pytest.raises(utils.UserError, match="no network"):
        evaluate.download_file_list(1, tmp_path)


# ----------------------------------------------------------------------------- command line

def test_reference_flags_defaults_and_help():
    parser = evaluate.get_args_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    # the seed README's command, unchanged
    args = parser.parse_args("--data-dir /path/to/imagenet/ --pretrained /path/to/checkpoint/model.pth "
                             "--exp-dir /path/to/experiment/ --arch convnext_small --lr-head 0.3".split())
    assert (args.arch, args.lr_head, str(args.data_dir), args.pretrained) == \
        ("convnext_small", 0.3, "/path/to/imagenet", "/path/to/checkpoint/model.pth")
    d = parser.parse_args([])
    assert (d.train_percent, str(d.exp_dir), d.print_freq, d.arch, d.epochs, d.batch_size, d.lr_backbone,
            d.lr_head, d.weight_decay, d.weights, d.workers) == \
        (100, "checkpoint/lincls", 100, "resnet50", 100, 256, 0.0, 0.3, 1e-6, "freeze", 8)
    assert (d.crop_size, d.resize_size, d.knn_k, d.knn_temperature, d.device) == (224, 256, 20, 0.07, "auto")
    for bad in (["--train-percent", "5"], ["--weights", "linear"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_frozen_classifier_stays_in_eval_mode():
    backbone, width = models.build_backbone("resnet_test")
    model = evaluate.LinearClassifier(backbone, width, 3, frozen=True).train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.head.bias.abs().sum() == 0 and 0.005 < model.head.weight.std() < 0.015
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert model.head.weight.grad is not None
    tuned = evaluate.LinearClassifier(models.build_backbone("resnet_test")[0], width, 3, frozen=False).train()
    assert tuned.backbone.training


# ----------------------------------------------------------------------------- long runs

@pytest.mark.slow
def test_cifar10_mini_probe_and_knn(cifar_mini, tmp_path):
    exp = tmp_path / "cifar"
    run_eval("--data-dir", cifar_mini, "--exp-dir", exp, "--arch", "resnet_test", "--small-input", "--crop-size",
             "32", "--resize-size", "32", "--epochs", "2", "--batch-size", "128", "--workers", "2", "--knn",
             "--lr-head", "0.3")
    stats = read_stats(exp)
    assert [s for s in stats if "knn_top1" in s][0]["knn_top1"] > 15  # 10 classes; random features see colour
    assert epoch_lines(stats)[-1]["best_acc1"] > 15


@pytest.mark.slow
def test_two_processes_equal_one(colour_folder, sources, tmp_path):
    """torchrun with 2 gloo processes: each loads half of every batch, DDP averages the gradients; the
    batches, crops and validation counts are those of one process, so the result is too."""
    paths, _ = sources
    common = [*FOLDER_RUN, "--data-dir", colour_folder, "--pretrained", paths["backbone"], "--knn", "--epochs", "2"]
    run_eval(*common, "--exp-dir", tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
           "--device", "cpu", *[str(a) for a in common], "--exp-dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = read_stats(tmp_path / "one"), read_stats(tmp_path / "two")
    for a, b in zip(epoch_lines(one), epoch_lines(two)):
        assert (a["acc1"], a["acc5"]) == (b["acc1"], b["acc5"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert [s["knn_top1"] for s in one if "knn_top1" in s] == [s["knn_top1"] for s in two if "knn_top1" in s]
    ha = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]["head.weight"]
    hb = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)["model"]["head.weight"]
    torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-5)
