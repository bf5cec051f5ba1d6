"""Backbones, expanders and the pretraining model: checkpoint names, shapes, gradients."""
import json

import pytest
import torch

import models
from models.vicregl import VICRegL, VICRegLConfig, build_expander, parse_mlp, representation_metrics


def _manifest(data_dir):
    return json.load(open(data_dir / "state_dict_manifest.json"))


def _keys(module, prefix=""):
    return [[prefix + k, list(v.shape)] for k, v in module.state_dict().items()]


def test_every_reference_backbone_matches_the_manifest(data_dir):
    manifest = _manifest(data_dir)["backbones"]
    assert len(manifest) == 11
    for arch, entry in manifest.items():
        with torch.device("meta"):  # shapes only: building xlarge nets for real takes seconds
            net, dim = models.build_backbone(arch)
        assert dim == entry["dim"], arch
        assert _keys(net) == entry["keys"], arch


def test_pretraining_model_keys_match_the_manifest(data_dir):
    for arch, keys in _manifest(data_dir)["pretraining_model"].items():
        with torch.device("meta"):
            model = VICRegL(VICRegLConfig(arch=arch, num_classes=1000))
        assert _keys(model, "module.") == keys, arch


def test_published_style_state_dict_loads_strict(data_dir):
    net, _ = models.build_backbone("resnet_test")
    other, _ = models.build_backbone("resnet_test")
    other.load_state_dict(net.state_dict(), strict=True)
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_new_architectures_have_expected_widths():
    with torch.device("meta"):
        assert models.build_backbone("resnet18")[1] == 512
        assert models.build_backbone("resnet50x5")[1] == 10240


@pytest.mark.parametrize("arch", ["resnet_test", "convnext_test"])
@pytest.mark.parametrize("size", [32, 64, 96, 100])
def test_tiny_backbone_shapes_match_map_size(arch, size):
    net, dim = models.build_backbone(arch)
    maps, pooled = net(torch.randn(2, 3, size, size))
    side = models.map_size(arch, size)
    assert side == net.map_size(size)
    assert maps.shape == (2, side * side, dim) and pooled.shape == (2, dim)


def test_map_sizes_of_the_two_families():
    for arch in ("resnet50", "convnext_small"):
        assert models.map_size(arch, 224) == 7 and models.map_size(arch, 96) == 3
    assert models.map_size("resnet50", 100) == 4 and models.map_size("convnext_small", 100) == 3
    assert models.map_size("resnet50", 32, small_input=True) == 4
    assert models.map_size("resnet50", 224, replace_stride_with_dilation=[False, True, True]) == 28


def test_maps_are_row_major_and_pooled_is_their_mean():
    net, _ = models.build_backbone("resnet_test")
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    maps, pooled = net(x)
    last = net.forward_stages(x)[-1]  # (1, C, 2, 2)
    assert torch.allclose(maps[0, 1], last[0, :, 0, 1]) and torch.allclose(maps[0, 2], last[0, :, 1, 0])
    assert torch.allclose(pooled, maps.mean(1), atol=1e-6)


def test_convnext_maps_are_normalised_per_position():
    net, _ = models.build_backbone("convnext_test")
    maps, pooled = net(torch.randn(2, 3, 64, 64))
    assert torch.allclose(maps.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(pooled, maps.mean(1))


def test_small_input_resnet_gives_4x4_maps_from_32px():
    net, dim = models.build_backbone("resnet18", small_input=True)
    maps, _ = net(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 16, 512)
    assert net.conv1.weight.shape == (64, 3, 3, 3)


def test_zero_init_residual_and_dilation():
    net, _ = models.build_backbone("resnet50", zero_init_residual=True,
                                   replace_stride_with_dilation=[False, True, True])
    assert float(net.layer1[0].bn3.weight.detach().abs().sum()) == 0.0
    assert net.layer4[1].conv2.dilation == (4, 4) and net.layer3[1].conv2.dilation == (2, 2)


def test_unknown_arch_and_wrong_kwargs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown --arch 'resnet7'.*resnet50"):
        models.build_backbone("resnet7")
    with pytest.raises(ValueError, match="does not take.*drop_path_rate"):
        models.build_backbone("resnet_test", drop_path_rate=0.1)


def test_expander_layout_and_errors():
    e = build_expander(16, "32-32-8", "layer")
    assert [type(m).__name__ for m in e] == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU",
                                             "Linear"]
    assert e[6].bias is None and e(torch.randn(3, 16)).shape == (3, 8)
    assert isinstance(build_expander(16, "8", "batch")[0], torch.nn.Linear)
    with pytest.raises(ValueError, match="--maps-mlp"):
        parse_mlp("512-x", "--maps-mlp")


def _tiny_batch(arch="resnet_test", b=4, num_classes=5, sizes=(64, 64, 32, 32)):
    views = [torch.randn(b, 3, s, s) for s in sizes]
    locs = []
    for s in sizes:
        n = models.map_size(arch, s)
        locs.append(torch.rand(b, n, n, 2) * 64)
    return views, locs, torch.randint(0, num_classes, (b,))


@pytest.mark.parametrize("arch", ["resnet_test", "convnext_test"])
def test_pretraining_model_forward_backward(arch):
    torch.manual_seed(0)
    cfg = VICRegLConfig(arch=arch, mlp="32-32-32", maps_mlp="16-16-16", num_classes=5, num_matches=(2, 1))
    model = VICRegL(cfg)
    views, locs, labels = _tiny_batch(arch)
    loss, logs = model(views, locs, labels, metrics=True)
    loss.backward()
    assert torch.isfinite(loss)
    expected = {"inv_l", "var_l", "cov_l", "minv_l", "mvar_l", "mcov_l", "cls_l", "top1", "top5", "l",
                "stdr", "stde", "corr", "core"}
    assert set(logs) == expected
    assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())
    recomputed = cfg.alpha * (logs["inv_l"] + logs["var_l"] + logs["cov_l"]) + \
        (1 - cfg.alpha) * (logs["minv_l"] + logs["mvar_l"] + logs["mcov_l"]) + logs["cls_l"]
    assert torch.allclose(recomputed, logs["l"])
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The probe sees detached features: the classifier loss alone gives the backbone no gradient.
    model.zero_grad()
    pooled = model.backbone(views[0])[1]
    model.classify(pooled.detach(), labels)[0].backward()
    assert all(p.grad is None for p in model.backbone.parameters())


def test_alpha_extremes_drop_expanders_and_no_labels_drop_classifier():
    only_global = VICRegL(VICRegLConfig(arch="resnet_test", alpha=1.0, mlp="16-16", num_classes=0))
    assert not hasattr(only_global, "maps_projector") and not hasattr(only_global, "classifier")
    only_local = VICRegL(VICRegLConfig(arch="resnet_test", alpha=0.0, maps_mlp="8-8", num_classes=3,
                                       num_matches=(2, 1)))
    assert not hasattr(only_local, "projector")
    views, locs, labels = _tiny_batch(num_classes=3)
    _, logs = only_local(views, locs, labels)
    assert "inv_l" not in logs and "minv_l" in logs
    with pytest.raises(ValueError, match="--alpha"):
        VICRegL(VICRegLConfig(arch="resnet_test", alpha=1.5))


def test_representation_metrics_on_known_inputs():
    torch.manual_seed(0)
    x = torch.randn(4096, 3, dtype=torch.float64)
    y = torch.cat([x[:, :1], x[:, :1]], 1)  # two identical columns: correlation 1
    assert float(representation_metrics(y, "r")["corr"]) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(representation_metrics(x, "r")["corr"])) < 0.05
    # rows normalised to unit length in 3-D: per-dimension std close to 1/sqrt(3)
    assert float(representation_metrics(x, "r")["stdr"]) == pytest.approx(3 ** -0.5, abs=0.02)
    z = (x - x.mean(0)) / (x.std(0) + 1e-5)
    c = z.T @ z / (len(z) - 1)
    off = (c.sum() - c.trace()) / 6
    assert float(representation_metrics(x, "e")["core"]) == pytest.approx(float(off), abs=1e-9)


def test_views_of_equal_size_share_a_forward_only_without_batchnorm():
    torch.manual_seed(0)
    views = [torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(3, 3, 32, 32)]
    conv = VICRegL(VICRegLConfig(arch="convnext_test", mlp="8-8", maps_mlp="8-8", num_classes=0,
                                 backbone_kwargs={"drop_path_rate": 0.0}))
    assert not conv.has_batchnorm
    maps, pooled = conv.encode(views)
    for v, x in enumerate(views):  # grouped forward = one view at a time
        m, p = conv.backbone(x)
        assert torch.allclose(maps[v], m, atol=1e-5) and torch.allclose(pooled[v], p, atol=1e-5)
    res = VICRegL(VICRegLConfig(arch="resnet_test", mlp="8-8", maps_mlp="8-8", num_classes=0))
    assert res.has_batchnorm
    calls = []
    res.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    res.encode(views)
    assert calls == [3, 3, 3]  # per-view batch statistics, as the reference
