"""export.py: Detectron2 names, shapes and values against a hand-written list and a naive renaming;
the Detectron2 config lines against the known widths of each ResNet; timm files load strictly into
timm and give our features; refusals are one line with exit code 2; no partial file is ever left."""
import argparse
import pickle
import pickletools
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import models

from conftest import ROOT


def random_backbone(arch, seed=0, **kwargs):
    """A backbone with random weights and random BatchNorm statistics (so no value is a default)."""
    torch.manual_seed(seed)
    net, _ = models.build_backbone(arch, **kwargs)
    for name, t in net.state_dict().items():
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t))
    return net.eval()


def save_form(net, path, form):
    """Save ``net``'s weights as an exported backbone, a model.pth-style checkpoint or a wrapped state dict."""
    sd = net.state_dict()
    if form == "model.pth":  # as pretraining writes it: DDP prefixes, expanders and other entries
        obj = {"epoch": 3, "model": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                                     "module.projector.0.weight": torch.randn(4, 4)}}
    elif form == "state_dict":
        obj = {"state_dict": sd}
    else:
        obj = sd
    torch.save(obj, path)
    return str(path)


def naive_d2_name(key):
    """Detectron2's name by plain string replacement, as its own torchvision converter describes it."""
    if not key.startswith("layer"):
        key = "stem." + key.replace("bn1.", "conv1.norm.")
    for k in range(1, 5):
        key = key.replace(f"layer{k}.", f"res{k + 1}.")
    for i in range(1, 4):
        key = key.replace(f"bn{i}.", f"conv{i}.norm.")
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def read_pickle(path):
    with open(path, "rb") as f:  # the test's own file, written a moment ago
        return pickle.load(f, encoding="latin1")  # as Detectron2 reads .pkl files


def run_export(*argv):
    export.main([str(a) for a in argv])


def user_error(capsys, *argv):
    """Run the CLI in process: it must exit 2 with one 'error:' line and no traceback; return the line."""
    with pytest.raises(SystemExit) as exc:
        run_export(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- Detectron2 names

# Detectron2's ResNet-50 names with their shapes, written out by hand.
R50_D2 = {
    "stem.conv1.weight": (64, 3, 7, 7),
    "stem.conv1.norm.weight": (64,),
    "stem.conv1.norm.running_mean": (64,),
    "res2.0.conv1.weight": (64, 64, 1, 1),
    "res2.0.conv1.norm.bias": (64,),
    "res2.0.conv3.weight": (256, 64, 1, 1),
    "res2.0.shortcut.weight": (256, 64, 1, 1),
    "res2.0.shortcut.norm.running_var": (256,),
    "res2.2.conv3.norm.weight": (256,),
    "res3.0.conv2.weight": (128, 128, 3, 3),
    "res3.0.shortcut.weight": (512, 256, 1, 1),
    "res4.5.conv3.norm.running_mean": (1024,),
    "res5.0.shortcut.norm.weight": (2048,),
    "res5.2.conv2.norm.bias": (512,),
    "res5.2.conv3.norm.running_var": (2048,),
}


def test_detectron2_names_and_count_resnet50():
    d2 = export.to_detectron2(random_backbone("resnet50").state_dict())
    for name, shape in R50_D2.items():
        assert d2[name].shape == shape, name
    # stem conv + BN (4), 16 blocks of 3 convs + 3 BNs, 4 shortcuts (conv + BN): 5 + 16 * 15 + 4 * 5
    assert len(d2) == 265
    assert not any("num_batches_tracked" in k or "layer" in k or "bn" in k or "downsample" in k for k in d2)
    assert "res2.1.shortcut.weight" not in d2 and all(isinstance(v, np.ndarray) for v in d2.values())


@pytest.mark.parametrize("arch", ["resnet_test", "resnet18"])
@pytest.mark.parametrize("form", ["backbone.pth", "model.pth", "state_dict"])
def test_detectron2_round_trip_values(tmp_path, capsys, arch, form):
    net = random_backbone(arch)
    out = tmp_path / "d2.pkl"
    run_export("detectron2", "--checkpoint", save_form(net, tmp_path / "in.pth", form), "--out", out)
    blob = read_pickle(out)
    assert blob["matching_heuristics"] is True and "VICRegL" in blob["__author__"]
    expected = {naive_d2_name(k): v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
    assert sorted(blob["model"]) == sorted(expected)
    for name, value in expected.items():
        assert blob["model"][name].shape == value.shape and np.allclose(blob["model"][name], value, atol=0), name
    assert f"wrote {len(expected)} tensors" in capsys.readouterr().out


def test_detectron2_pickle_is_portable_across_numpy_versions(tmp_path, capsys):
    """The pickle names only numpy.ndarray and bytearray, not numpy._core (absent from NumPy 1.x)."""
    out = tmp_path / "d2.pkl"
    run_export("detectron2", "--checkpoint", save_form(random_backbone("resnet_test"), tmp_path / "b.pth", "plain"),
               "--out", out)
    strings, globals_ = [], set()
    for op, arg, _ in pickletools.genops(out.read_bytes()):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            globals_.add(".".join(strings[-2:]))
        elif op.name == "GLOBAL":
            globals_.add(arg.replace(" ", "."))
    assert globals_ == {"numpy.ndarray", "builtins.bytearray"}
    assert read_pickle(out)["model"]["stem.conv1.weight"].flags.writeable  # torch.from_numpy needs no copy


# (arch, DEPTH, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, WIDTH_PER_GROUP or None, stock builder cannot make it)
D2_CONFIGS = [
    ("resnet18", 18, 64, 64, None, False),
    ("resnet50", 50, 64, 256, 64, False),
    ("resnet101", 101, 64, 256, 64, False),
    ("resnet50x2", 50, 128, 512, 128, False),
    ("resnet50x4", 50, 256, 1024, 256, False),
    ("resnet200x2", 200, 128, 512, 128, True),
    ("resnet_test", 10, 8, 8, None, True),
]


@pytest.mark.parametrize("arch,depth,stem,res2,width,note", D2_CONFIGS)
def test_detectron2_config_lines(arch, depth, stem, res2, width, note):
    with torch.device("meta"):
        net, _ = models.build_backbone(arch)
    d2 = {export.detectron2_name(k): v for k, v in net.state_dict().items() if "num_batches" not in k}
    text = "\n".join(export.detectron2_config(d2, "/w/r.pkl"))
    assert f"DEPTH: {depth}\n" in text and "STRIDE_IN_1X1: False" in text and 'FORMAT: "RGB"' in text
    assert f"STEM_OUT_CHANNELS: {stem}\n" in text and f"RES2_OUT_CHANNELS: {res2}\n" in text
    assert (f"WIDTH_PER_GROUP: {width}\n" in text) if width else "WIDTH_PER_GROUP" not in text
    assert ("NUM_GROUPS: 1\n" in text) if width else "NUM_GROUPS" not in text  # none of ours is grouped
    assert ("# note:" in text) == note
    assert 'WEIGHTS: "/w/r.pkl"' in text
    # ImageNet mean and std (0.485 0.456 0.406 / 0.229 0.224 0.225) in 0-255 units
    assert "PIXEL_MEAN: [123.675, 116.28, 103.53]" in text and "PIXEL_STD: [58.395, 57.12, 57.375]" in text


# ----------------------------------------------------------------------------- timm

def test_timm_resnet18_script_loads_strictly_and_matches(tmp_path):
    timm = pytest.importorskip("timm")
    net = random_backbone("resnet18", seed=1)
    out = tmp_path / "sub" / "timm.pth"
    proc = subprocess.run([sys.executable, "export.py", "timm", "--checkpoint",
                           save_form(net, tmp_path / "model.pth", "model.pth"), "--arch", "resnet18", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(out, weights_only=True)
    assert f"wrote {len(sd)} tensors" in proc.stdout and str(out) in proc.stdout
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net(x)[1], atol=1e-5)


def test_timm_convnext_loads_strictly_and_matches(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    net = random_backbone("convnext_test", seed=2)
    out = tmp_path / "timm.pth"
    run_export("timm", "--checkpoint", save_form(net, tmp_path / "b.pth", "plain"), "--out", out)
    assert "ls_init_value=None" in capsys.readouterr().out  # create_model would add layer scale
    model = timm.model_entrypoint("convnext_tiny")(pretrained=False, num_classes=0, depths=(1, 1, 1, 1),
                                                   dims=(8, 16, 32, 64), ls_init_value=None)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # timm's features are our last map before the final norm
        assert torch.allclose(model.eval().forward_features(x), net.forward_stages(x)[-1], atol=1e-5)


# ----------------------------------------------------------------------------- refusals

@pytest.fixture
def inputs(tmp_path):
    paths = {
        "resnet": save_form(random_backbone("resnet_test"), tmp_path / "r.pth", "plain"),
        "convnext": save_form(random_backbone("convnext_test"), tmp_path / "c.pth", "model.pth"),
        "small": save_form(random_backbone("resnet_test", small_input=True), tmp_path / "s.pth", "plain"),
        "wide": save_form(random_backbone("resnet_test", widen=2), tmp_path / "w.pth", "plain"),
        "missing": str(tmp_path / "none.pth"),
        "damaged": str(tmp_path / "damaged.pth"),
    }
    data = (tmp_path / "r.pth").read_bytes()
    (tmp_path / "damaged.pth").write_bytes(data[: len(data) // 2])
    return paths


REFUSALS = [  # (id, subcommand, input, extra flags, words the message must hold)
    ("d2-convnext", "detectron2", "convnext", [], ["no ConvNeXt", "export.py timm"]),
    ("d2-arch-convnext", "detectron2", "resnet", ["--arch", "convnext_test"], ["no ConvNeXt"]),
    ("d2-small-input", "detectron2", "small", [], ["small-input"]),
    ("timm-small-input", "timm", "small", [], ["small-input"]),
    ("d2-unknown-arch", "detectron2", "resnet", ["--arch", "resnet_tiny"], ["unknown --arch 'resnet_tiny'"]),
    ("timm-unknown-arch", "timm", "resnet", ["--arch", "resnet_tiny"], ["unknown --arch 'resnet_tiny'"]),
    ("timm-unmappable-arch", "timm", "resnet", [], ["resnet_test has no timm counterpart", "resnet50"]),
    ("d2-wrong-arch", "detectron2", "resnet", ["--arch", "resnet18"], ["do not fit --arch resnet18",
                                                                      "pass --arch resnet_test"]),
    ("d2-unrecognised", "detectron2", "wide", [], ["cannot recognise the architecture", "--arch"]),
    ("d2-missing-file", "detectron2", "missing", [], ["not found", "none.pth"]),
    ("timm-missing-file", "timm", "missing", [], ["not found"]),
    ("d2-damaged-file", "detectron2", "damaged", [], ["damaged.pth", "truncated"]),
    ("timm-damaged-file", "timm", "damaged", [], ["damaged.pth", "truncated"]),
]


@pytest.mark.parametrize("command,which,flags,words", [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
def test_refusals_are_one_line(tmp_path, capsys, inputs, command, which, flags, words):
    out = tmp_path / "out" / "x.pkl"
    line = user_error(capsys, command, "--checkpoint", inputs[which], "--out", out, *flags)
    for word in words:
        assert word in line
    assert not out.exists()


def test_detectron2_refuses_an_out_file_that_is_not_pkl(tmp_path, capsys, inputs):
    line = user_error(capsys, "detectron2", "--checkpoint", inputs["resnet"], "--out", tmp_path / "x.pth")
    assert "--out" in line and ".pkl" in line


def test_script_refusal_exit_code_and_success(tmp_path):
    """The real script: a missing file exits 2 with one line; a good one writes nested folders."""
    proc = subprocess.run([sys.executable, "export.py", "detectron2", "--checkpoint", str(tmp_path / "no.pth"),
                           "--out", str(tmp_path / "x.pkl")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint file not found: {tmp_path / 'no.pth'}"]
    out = tmp_path / "a" / "b" / "r.pkl"
    src = save_form(random_backbone("resnet_test"), tmp_path / "model.pth", "model.pth")
    proc = subprocess.run([sys.executable, "export.py", "detectron2", "--checkpoint", src, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}" in proc.stdout and "RES2_OUT_CHANNELS: 8" in proc.stdout
    assert len(read_pickle(out)["model"]) == 5 + 4 * 10 + 3 * 5  # stem, 4 basic blocks, 3 shortcuts


# ----------------------------------------------------------------------------- trust, atomic writes

def test_trust_checkpoint_opt_in(tmp_path, capsys):
    net = random_backbone("resnet_test")
    src = tmp_path / "ns.pth"  # a Namespace is a Python object that weights_only unpickling refuses
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(arch="resnet_test")}, src)
    line = user_error(capsys, "detectron2", "--checkpoint", src, "--out", tmp_path / "x.pkl")
    assert "--trust-checkpoint" in line and not (tmp_path / "x.pkl").exists()
    run_export("detectron2", "--checkpoint", src, "--out", tmp_path / "x.pkl", "--trust-checkpoint")
    assert "unpickled in full" in capsys.readouterr().err
    assert np.array_equal(read_pickle(tmp_path / "x.pkl")["model"]["stem.conv1.weight"], net.conv1.weight.detach())


def test_write_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "d" / "w.pkl"

    def failing(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        export.write_atomic(str(path), failing)
    assert list((tmp_path / "d").iterdir()) == []  # neither the file nor a temporary one
    export.write_atomic(str(path), lambda f: f.write(b"good"))
    with pytest.raises(RuntimeError):
        export.write_atomic(str(path), failing)
    assert path.read_bytes() == b"good" and list((tmp_path / "d").iterdir()) == [path]
