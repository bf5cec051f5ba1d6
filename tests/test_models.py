"""Backbones, expanders and the pretraining model: checkpoint names, shapes, gradients."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision

import models
from models.vicregl import VICRegL, VICRegLConfig, accuracy, build_expander, parse_mlp, representation_metrics


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


def _published_style_state_dict(keys, seed=0):
    """Random tensors under the published file's names and shapes (``keys``: [name, shape] pairs from
    the reference manifest). Convolutions are He-scaled and BatchNorm statistics plausible, so the
    activations of a deep net stay finite and far from zero. Float64, for a tight comparison."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[name] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name.endswith("weight"):  # BatchNorm scale
            sd[name] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:  # BatchNorm shift and running mean
            sd[name] = 0.1 * torch.randn(shape, generator=gen)
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("arch,torchvision_net", [("resnet34", "resnet34"), ("resnet50", "resnet50")])
def test_published_resnet_weights_compute_what_torchvision_computes(data_dir, arch, torchvision_net):
    """A state dict with the published file's names and shapes (the reference manifest, random values)
    loads strictly, and our backbone then computes what torchvision's ResNet (an independent
    implementation with the same parameter names, ``fc`` aside) computes with the same weights: the
    last feature map row by row, and its average."""
    sd = _published_style_state_dict(_manifest(data_dir)["backbones"][arch]["keys"])
    with torch.device("meta"):  # no initialisation: every tensor comes from the state dict
        ours, dim = models.build_backbone(arch)
        theirs = getattr(torchvision.models, torchvision_net)()
    theirs.fc = torch.nn.Identity()  # the published backbones have no classifier
    ours.load_state_dict(sd, strict=True, assign=True)
    theirs.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    ours, theirs = ours.eval(), theirs.eval()
    last_map = []
    theirs.layer4.register_forward_hook(lambda module, inputs, output: last_map.append(output))
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        maps, pooled = ours(x)
        expected_pooled = theirs(x)  # (1, dim)
    expected_maps = last_map[0].flatten(2).transpose(1, 2)  # (1, 2·3, dim), position = row·3 + col
    assert maps.shape == (1, 6, dim) and expected_pooled.abs().mean() > 0.01
    torch.testing.assert_close(maps, expected_maps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-9, atol=1e-9)


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


def test_online_probe_accuracy_on_a_hand_counted_case():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.0, -1.0],   # label 1 ranks 1st
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # label 4 ranks 5th
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # label 0 ranks 6th
                           [0.5, 0.2, 0.1, 0.4, 0.3, 2.0]])   # label 3 ranks 3rd (after 5 and 0)
    labels = torch.tensor([1, 4, 0, 3])
    # Ranks 1, 5, 6, 3: top-1 holds 1 of 4, top-2 1, top-3 2, top-5 3.
    top1, top2, top3, top5 = accuracy(logits, labels, (1, 2, 3, 5))
    assert [float(top1), float(top2), float(top3), float(top5)] == [25.0, 25.0, 50.0, 75.0]
    assert top1.ndim == 0
    # With 3 classes (arg-maxima 1, 0, 2, 0) the top-5 is every class: always right.
    assert [float(a) for a in accuracy(logits[:, :3], torch.tensor([1, 2, 2, 1]), (1, 5))] == [50.0, 100.0]
    # The online probe reports (cross-entropy, top-1, top-5) of its classifier's logits: a classifier
    # that copies the first 6 features gives back these logits.
    model = VICRegL(VICRegLConfig(arch="resnet_test", mlp="8-8", maps_mlp="8-8", num_classes=6))
    with torch.no_grad():
        model.classifier.weight.zero_()[:, :6] = torch.eye(6)
        model.classifier.bias.zero_()
    features = torch.cat([logits, torch.randn(4, model.num_features - 6)], dim=1)
    with torch.no_grad():
        loss, top1, top5 = model.classify(features, labels)
    cross_entropy = np.mean([math.log(np.exp(row).sum()) - row[y] for row, y in zip(logits.tolist(), labels.tolist())])
    assert loss.item() == pytest.approx(cross_entropy, rel=1e-5)
    assert (float(top1), float(top5)) == (25.0, 75.0)


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
