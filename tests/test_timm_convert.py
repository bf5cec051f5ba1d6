"""models/timm_convert.py: our ResNet/ConvNeXt weights under timm's names and back, checked against
real timm models (names, shapes, forward_features on the same input, exact round trip)."""
import pytest
import torch

import models
from models.checkpoints import CheckpointError
from models.timm_convert import (TIMM_ARCHS, from_timm, from_timm_state_dict, timm_model_args, to_timm,
                                 to_timm_state_dict)

timm = pytest.importorskip("timm")


def _perturbed(arch, seed=0, **kwargs):
    """Eval-mode backbone whose every tensor is non-default (norm weights too) and whose BN statistics
    come from one batch, so that activations stay O(1) and a 1e-5 tolerance means something."""
    torch.manual_seed(seed)
    net, _ = models.build_backbone(arch, **kwargs)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point() and not name.endswith(("running_mean", "running_var")):
                t.mul_(1 + 0.1 * torch.randn_like(t)).add_(0.01 * torch.randn_like(t))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average: one batch sets the statistics
        net.train()(torch.randn(4, 3, 64, 64))
    return net.eval()


def _shapes(sd):
    return [(k, tuple(v.shape)) for k, v in sd.items()]


@pytest.mark.parametrize("arch", sorted(TIMM_ARCHS))
def test_names_and_shapes_match_timm_for_every_arch(arch):
    """On the meta device: our state dict renamed is timm's, key for key and in timm's order, and
    timm's renamed back is ours, in our order."""
    with torch.device("meta"):
        ours, _ = models.build_backbone(arch)
        name, args = timm_model_args(arch, ours.state_dict(), ours)
        theirs = timm.model_entrypoint(name)(pretrained=False, num_classes=0, **args)
    assert _shapes(to_timm_state_dict(ours.state_dict(), arch)) == _shapes(theirs.state_dict())
    assert _shapes(from_timm_state_dict(theirs.state_dict(), arch)) == _shapes(ours.state_dict())


def _round_trip(arch, size=64, atol=1e-5, **kwargs):
    ours = _perturbed(arch, **kwargs)
    theirs = to_timm(ours, arch).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = theirs.forward_features(x)  # (B, C, h, w)
        torch.testing.assert_close(features, ours.forward_stages(x)[-1], rtol=0, atol=atol)
        maps, pooled = ours(x)
        timm_pooled = theirs(x)  # num_classes=0: the pooled (pre-logits) features
    back = from_timm(theirs, arch, **kwargs)
    sd, sd_back = ours.state_dict(), back.state_dict()
    assert list(sd_back) == list(sd)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    assert list(from_timm_state_dict(theirs.state_dict(), arch)) == list(sd)
    return theirs, features, maps, pooled, timm_pooled


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_round_trip(arch):
    _, features, maps, pooled, timm_pooled = _round_trip(arch)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(timm_pooled, pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["convnext_test", "convnext_tiny"])
def test_convnext_round_trip_and_the_final_norm_difference(arch):
    theirs, features, maps, pooled, timm_pooled = _round_trip(arch)
    with torch.no_grad():
        # our maps = timm's head.norm (a per-position channel LayerNorm) applied to the whole map
        torch.testing.assert_close(theirs.head.norm(features).flatten(2).transpose(1, 2), maps,
                                   rtol=0, atol=1e-5)
        # timm pools and then normalises: LN(mean(x)), not our mean(LN(x))
        torch.testing.assert_close(timm_pooled, theirs.head.norm(features.mean((2, 3), keepdim=True)).flatten(1))
    assert (timm_pooled - pooled).abs().max() > 1e-2


def test_layer_scale_gamma_is_carried():
    theirs, *_ = _round_trip("convnext_test", layer_scale_init_value=0.5)
    assert theirs.stages[2].blocks[0].gamma is not None


def test_dilated_resnet_maps_to_timm_output_stride():
    _, features, *_ = _round_trip("resnet50", replace_stride_with_dilation=[False, True, True])
    assert features.shape[-1] == 8  # 64 / 8
    with pytest.raises(ValueError, match="no timm output_stride"):
        to_timm(models.build_backbone("resnet50", replace_stride_with_dilation=[True, False, False])[0], "resnet50")
    # our BasicBlock dilates only its second convolution, timm's both: refused, not silently different
    with pytest.raises(ValueError, match="BasicBlock"):
        to_timm(models.build_backbone("resnet18", replace_stride_with_dilation=[False, True, True])[0], "resnet18")
    with pytest.raises(ValueError, match="small_input"):
        to_timm(models.build_backbone("resnet18", small_input=True)[0], "resnet18")


def test_to_timm_from_a_checkpoint_file_guesses_the_arch_and_can_add_a_head(tmp_path):
    ours = _perturbed("convnext_test")
    torch.save({"model": {f"module.backbone.{k}": v for k, v in ours.state_dict().items()}}, tmp_path / "m.pth")
    theirs = to_timm(str(tmp_path / "m.pth"), num_classes=5)  # a new head on a full checkpoint
    assert theirs.head.fc.out_features == 5
    converted = to_timm_state_dict(ours.state_dict(), "convnext_test")
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in converted.items())


def test_wrong_arch_and_unknown_keys_are_refused():
    partial = {k: v for k, v in models.build_backbone("resnet18")[0].state_dict().items()
               if not k.startswith("layer2.1.")}
    with pytest.raises(CheckpointError, match=r"do not fit timm resnet18.*\n  missing 12 of .*: layer2.1.conv1.weight"):
        to_timm(partial, "resnet18")
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer1.2"):
        to_timm(models.build_backbone("resnet34")[0].state_dict(), "resnet18")
    with pytest.raises(CheckpointError, match="no counterpart for downsample_layers"):
        to_timm_state_dict(models.build_backbone("convnext_test")[0].state_dict(), "resnet18")
    with pytest.raises(CheckpointError, match=r"no counterpart for fc.weight, fc.bias \(a classifier"):
        from_timm(timm.create_model("resnet18", pretrained=False), "resnet18")
    with pytest.raises(ValueError, match="no timm counterpart registered for 'resnet50x2'"):
        to_timm(models.build_backbone("resnet_test")[0], "resnet50x2")


def test_a_file_without_weights_is_named_in_both_directions(tmp_path):
    path = tmp_path / "args_only.pth"
    torch.save({"args": {"arch": "resnet18"}, "epoch": 3}, path)
    for convert in (lambda: to_timm(str(path)), lambda: from_timm(str(path), "resnet18")):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} holds no state dict"):
            convert()
