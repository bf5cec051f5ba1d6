"""Loading backbone weights from every accepted form, and refusing what does not fit."""
import pytest
import torch

import models
from models.checkpoints import (CheckpointError, extract_backbone_state_dict, guess_arch,
                                load_backbone_weights)
from models.vicregl import VICRegL, VICRegLConfig


def _source():
    torch.manual_seed(0)
    return models.build_backbone("resnet_test")[0]


def _assert_same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("form", ["plain", "full", "full_no_module", "wrapped"])
def test_every_form_loads(tmp_path, form):
    src = _source()
    sd = src.state_dict()
    obj = {"plain": sd,
           "full": {"epoch": 3, "model": {f"module.backbone.{k}": v for k, v in sd.items()} |
                    {"module.projector.0.weight": torch.zeros(2, 2)}},
           "full_no_module": {"model": {f"backbone.{k}": v for k, v in sd.items()}},
           "wrapped": {"state_dict": sd}}[form]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst, _ = models.build_backbone("resnet_test")
    assert load_backbone_weights(dst, str(path), "resnet_test") == ([], [])
    _assert_same(src, dst)


def test_file_url_goes_through_the_hub_download_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    src = _source()
    torch.save(src.state_dict(), tmp_path / "weights.pth")
    dst, _ = models.build_backbone("resnet_test")
    load_backbone_weights(dst, (tmp_path / "weights.pth").as_uri())
    _assert_same(src, dst)
    assert (tmp_path / "hub" / "hub" / "checkpoints" / "weights.pth").exists()


def test_wrong_arch_is_refused_with_the_likely_arch(tmp_path):
    torch.save(models.build_backbone("convnext_test")[0].state_dict(), tmp_path / "c.pth")
    dst, _ = models.build_backbone("resnet_test")
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(dst, str(tmp_path / "c.pth"), "resnet_test")
    msg = str(err.value)
    assert "missing" in msg and "conv1.weight" in msg and "--arch convnext_test" in msg


def test_partial_file_lists_missing_keys(tmp_path):
    sd = _source().state_dict()
    del sd["layer4.0.conv2.weight"], sd["bn1.bias"]
    dst, _ = models.build_backbone("resnet_test")
    with pytest.raises(CheckpointError, match=r"missing 2 of .*bn1.bias.*layer4.0.conv2.weight"):
        load_backbone_weights(dst, sd)


def test_shape_mismatch_and_unexpected_keys(tmp_path):
    sd = _source().state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    dst, _ = models.build_backbone("resnet_test")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv1.weight \(8, 3, 3, 3\)"):
        load_backbone_weights(dst, sd)
    sd = _source().state_dict() | {"fc.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected keys: fc.weight"):
        load_backbone_weights(dst, sd)
    assert load_backbone_weights(dst, sd, allow_unexpected=True) == ([], ["fc.weight"])


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_source().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    dst, _ = models.build_backbone("resnet_test")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*model.pth.*truncated"):
        load_backbone_weights(dst, str(path))
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_weights(dst, str(tmp_path / "nope.pth"))


def test_pretraining_model_state_extracts_backbone():
    model = VICRegL(VICRegLConfig(arch="convnext_test", mlp="8-8", maps_mlp="8-8", num_classes=2))
    full = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}
    sd = extract_backbone_state_dict(full)
    assert list(sd) == list(model.backbone.state_dict())
    assert guess_arch(sd) == "convnext_test"


@pytest.mark.parametrize("arch,small", [("resnet18", True), ("resnet18", False), ("resnet_mini", True),
                                        ("convnext_test", False)])
def test_guess_backbone_tells_the_small_input_stem(arch, small):
    """The small-input stem has a 3x3 first convolution (a 7x7 one otherwise): the shapes tell."""
    from models.checkpoints import guess_backbone
    net, _ = models.build_backbone(arch, **({"small_input": True} if small else {}))
    assert tuple(net.state_dict()["conv1.weight" if arch.startswith("resnet") else
                                  "downsample_layers.0.0.weight"].shape[-2:]) == ((3, 3) if small else
                                                                                  (7, 7) if arch.startswith("resnet")
                                                                                  else (4, 4))
    assert guess_backbone(net.state_dict()) == (arch, small)
    assert guess_arch(net.state_dict()) == arch


def test_a_stem_mismatch_says_which_flag_to_change(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(models.build_backbone("resnet_test", small_input=True)[0].state_dict(), path)
    plain, _ = models.build_backbone("resnet_test")
    with pytest.raises(CheckpointError, match="made with the small-input ResNet stem: pass --small-input"):
        load_backbone_weights(plain, str(path), "resnet_test")
    other, _ = models.build_backbone("resnet18")
    with pytest.raises(CheckpointError, match=r"looks like a resnet_test \(small-input stem\) checkpoint: "
                                              r"pass --arch resnet_test --small-input"):
        load_backbone_weights(other, str(path), "resnet18")


def test_load_backbone_reads_arch_and_stem_from_the_file(tmp_path):
    """model.pth's saved arguments first, the weights' shapes otherwise; strict either way."""
    from models.checkpoints import load_backbone
    torch.manual_seed(3)
    src, _ = models.build_backbone("resnet_test", small_input=True)
    saved = {"model": {f"module.backbone.{k}": v for k, v in src.state_dict().items()},
             "args": {"arch": "resnet_test", "small_input": True}}
    torch.save(saved, tmp_path / "model.pth")
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    for name in ("model.pth", "backbone.pth"):
        net, arch, small = load_backbone(str(tmp_path / name))
        assert (arch, small) == ("resnet_test", True)
        _assert_same(net, src)
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        load_backbone(str(tmp_path / "backbone.pth"), arch="resnet18")
