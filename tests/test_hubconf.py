"""hubconf.py: the seven published entry points, the real download path (file:// URLs into a private
torch.hub cache), full checkpoints and strict refusals. Offline: nothing leaves the machine."""
import inspect
import json

import pytest
import torch

import hubconf
import models
from models import checkpoints
from models.checkpoints import CheckpointError
from models.vicregl import VICRegL, VICRegLConfig

from conftest import DATA, ROOT

ENTRY_POINTS = {"resnet50_alpha0p9": ("resnet50", 0.9), "resnet50_alpha0p75": ("resnet50", 0.75),
                "convnext_small_alpha0p9": ("convnext_small", 0.9),
                "convnext_small_alpha0p75": ("convnext_small", 0.75),
                "convnext_base_alpha0p9": ("convnext_base", 0.9),
                "convnext_base_alpha0p75": ("convnext_base", 0.75),
                "convnext_xlarge_alpha0p75": ("convnext_xlarge", 0.75)}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((DATA / "state_dict_manifest.json").read_text())


def _perturbed(arch, seed=0, **kwargs):
    """A backbone whose every tensor differs from a fresh build (BN statistics included)."""
    torch.manual_seed(seed)
    net, _ = models.build_backbone(arch, **kwargs)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var")
                        else t * (1 + 0.1 * torch.randn_like(t)) + 0.01 * torch.randn_like(t))
    return net


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """A perturbed ResNet-50 saved under its published file name: (state dict, folder)."""
    folder = tmp_path_factory.mktemp("published")
    sd = _perturbed("resnet50").state_dict()
    torch.save(sd, folder / "resnet50_alpha0.9.pth")
    return sd, folder


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """A private torch.hub cache: downloads land in <tmp>/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def published_at(monkeypatch):
    """Point the published-URL template at a local folder (file://), keeping the file names."""
    def point(folder):
        monkeypatch.setattr(checkpoints, "PUBLISHED_URL", folder.as_uri() + "/{arch}_alpha{alpha}{suffix}.pth")
    return point


def _assert_state_equal(module, sd):
    own = module.state_dict()
    assert list(own) == list(sd)
    for k in own:
        assert torch.equal(own[k], sd[k]), k


def test_entry_points_are_listed_and_documented():
    # torch.hub.list's own rule: public callables of hubconf
    listed = {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")}
    assert listed == set(ENTRY_POINTS) == set(hubconf.__all__)
    for name, (arch, alpha) in ENTRY_POINTS.items():
        fn = getattr(hubconf, name)
        assert fn.__name__ == name and fn.__module__ == "hubconf"
        assert inspect.signature(fn).parameters["pretrained"].default is True
        assert f"{arch}_alpha{alpha:g}.pth" in fn.__doc__ and f"alpha {alpha}" in fn.__doc__
    assert hubconf.dependencies == ["torch"]


def test_published_urls():
    assert checkpoints.published_url("resnet50", 0.9) == "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.9.pth"
    assert (checkpoints.published_url("convnext_xlarge", 0.75, full_checkpoint=True)
            == "https://dl.fbaipublicfiles.com/vicregl/convnext_xlarge_alpha0.75_fullckpt.pth")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_builds_the_published_structure(name, manifest):
    """Built on the meta device (no memory, no init): names and shapes are the published files'."""
    arch, _ = ENTRY_POINTS[name]
    with torch.device("meta"):
        net = getattr(hubconf, name)(pretrained=False)
    shapes = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert shapes == manifest["backbones"][arch]["keys"]
    assert net.num_features == manifest["backbones"][arch]["dim"]


def test_torch_hub_load_local_builds_a_working_backbone(hub_home):
    net = torch.hub.load(str(ROOT), "resnet50_alpha0p9", source="local", pretrained=False).eval()
    with torch.no_grad():
        maps, pooled = net(torch.randn(2, 3, 64, 64))
    assert maps.shape == (2, 4, 2048) and pooled.shape == (2, 2048)
    assert not hub_home.exists()  # pretrained=False downloads nothing


def test_default_download_path_through_torch_hub(r50, hub_home, published_at):
    sd, folder = r50
    published_at(folder)
    net = torch.hub.load(str(ROOT), "resnet50_alpha0p9", source="local")
    _assert_state_equal(net, sd)
    assert (hub_home / "resnet50_alpha0.9.pth").is_file()  # torch.hub's cache, as for the real URL


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_weights_from_a_path_or_url(r50, hub_home, form):
    sd, folder = r50
    path = folder / "resnet50_alpha0.9.pth"
    net = hubconf.resnet50_alpha0p75(weights=str(path) if form == "path" else path.as_uri())
    _assert_state_equal(net, sd)
    assert (hub_home / path.name).is_file() == (form == "file_url")


def test_backbone_kwargs_pass_through_but_weights_stay_strict(r50, hub_home):
    sd, folder = r50
    path = str(folder / "resnet50_alpha0.9.pth")
    net = hubconf.resnet50_alpha0p9(weights=path, replace_stride_with_dilation=[False, True, True]).eval()
    _assert_state_equal(net, sd)
    with torch.no_grad():
        maps, _ = net(torch.randn(1, 3, 64, 64))
    assert maps.shape == (1, 64, 2048)  # output stride 8
    with pytest.raises(CheckpointError, match="shape mismatch.*conv1.weight"):
        hubconf.resnet50_alpha0p9(weights=path, base_channels=16)


def test_wrong_arch_is_refused_with_a_clear_message(tmp_path):
    torch.save(_perturbed("resnet_test").state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError) as err:
        hubconf.resnet50_alpha0p9(weights=str(tmp_path / "small.pth"))
    msg = str(err.value)
    assert "does not fit resnet50" in msg and "missing" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatch" in msg and "looks like a resnet_test checkpoint" in msg


def test_partial_file_lists_what_is_missing(r50, tmp_path):
    sd = dict(r50[0])
    del sd["layer4.2.bn3.running_var"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 of 318 keys: layer4.2.bn3.running_var"):
        hubconf.resnet50_alpha0p9(weights=str(tmp_path / "partial.pth"))


def test_contradictory_options_are_refused():
    with pytest.raises(ValueError, match="drop pretrained=False"):
        hubconf.resnet50_alpha0p9(pretrained=False, weights="x.pth")
    with pytest.raises(ValueError, match="backbone only"):
        hubconf.resnet50_alpha0p9(full_checkpoint=True, timm_model=True)


def _full_checkpoint(backbone_sd, alpha=0.9, mlp="64-64", maps_mlp="32-32", num_classes=10):
    """A pretraining checkpoint as main_vicregl.py and the reference write it."""
    torch.manual_seed(1)
    model = VICRegL(VICRegLConfig(arch="resnet50", alpha=alpha, mlp=mlp, maps_mlp=maps_mlp,
                                  num_classes=num_classes))
    model.backbone.load_state_dict(backbone_sd)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {"epoch": 100, "model": sd, "optimizer": {"state": {}, "param_groups": []}}, model


def test_full_checkpoint_through_the_download_path(r50, tmp_path, hub_home, published_at):
    ckpt, source = _full_checkpoint(r50[0])
    torch.save(ckpt, tmp_path / "resnet50_alpha0.9_fullckpt.pth")
    published_at(tmp_path)
    model = hubconf.resnet50_alpha0p9(full_checkpoint=True)
    assert isinstance(model, VICRegL)
    assert (model.cfg.alpha, model.cfg.mlp, model.cfg.maps_mlp, model.cfg.num_classes) == (0.9, "64-64", "32-32", 10)
    _assert_state_equal(model, source.state_dict())
    assert (hub_home / "resnet50_alpha0.9_fullckpt.pth").is_file()
    # the backbone entry point takes the same file and keeps only the backbone
    _assert_state_equal(hubconf.resnet50_alpha0p9(weights=str(tmp_path / "resnet50_alpha0.9_fullckpt.pth")), r50[0])


def test_partial_or_backbone_only_full_checkpoint_is_refused(r50, tmp_path):
    ckpt, _ = _full_checkpoint(r50[0])
    del ckpt["model"]["module.projector.1.running_mean"]
    torch.save(ckpt, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the resnet50 pretraining model:\n"
                                              r"  missing 1 of \d+ keys: projector.1.running_mean"):
        hubconf.resnet50_alpha0p9(full_checkpoint=True, weights=str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointError, match="no expander.*load it as a backbone"):
        hubconf.resnet50_alpha0p9(full_checkpoint=True, weights=str(r50[1] / "resnet50_alpha0.9.pth"))


def test_full_checkpoint_alpha_must_agree_with_the_expanders(r50, tmp_path):
    ckpt, _ = _full_checkpoint(r50[0], alpha=1.0)  # global expander only
    torch.save(ckpt, tmp_path / "global_only.pth")
    with pytest.raises(CheckpointError, match=r"alpha=0.75 needs .*maps_projector: False"):
        hubconf.resnet50_alpha0p75(full_checkpoint=True, weights=str(tmp_path / "global_only.pth"))
    model = checkpoints.load_pretraining_model(str(tmp_path / "global_only.pth"), "resnet50")
    assert model.cfg.alpha == 1.0 and not hasattr(model, "maps_projector")


@pytest.mark.parametrize("arch", ["resnet50", "convnext_small"])
def test_published_full_checkpoint_layout_is_understood(arch, manifest):
    """The published _fullckpt.pth key layout (manifest) gives the default expanders and 1000 classes,
    and the model built from it has exactly those names and shapes."""
    keys = manifest["pretraining_model"][arch]
    sd = checkpoints.pretraining_state_dict({"model": {k: torch.empty(s, device="meta") for k, s in keys}})
    cfg = checkpoints.pretraining_config_from_state_dict(sd, arch, 0.75)
    assert (cfg.mlp, cfg.maps_mlp, cfg.num_classes) == ("8192-8192-8192", "512-512-512", 1000)
    with torch.device("meta"):
        model = VICRegL(cfg)
    assert [[f"module.{k}", list(v.shape)] for k, v in model.state_dict().items()] == keys


def test_untrained_full_model_has_the_default_expanders():
    with torch.device("meta"):
        model = hubconf.convnext_small_alpha0p75(pretrained=False, full_checkpoint=True, drop_path_rate=0.1)
    assert model.cfg.alpha == 0.75 and model.projector[0].weight.shape == (8192, 768)
    assert model.maps_projector[-1].weight.shape == (512, 512) and model.classifier.out_features == 1000
    assert model.backbone.stages[3][2].drop_path.p == pytest.approx(0.1)


def test_timm_model_option(r50, hub_home):
    pytest.importorskip("timm")
    sd, folder = r50
    ours = hubconf.resnet50_alpha0p9(weights=str(folder / "resnet50_alpha0.9.pth")).eval()
    tm = hubconf.resnet50_alpha0p9(weights=str(folder / "resnet50_alpha0.9.pth"), timm_model=True).eval()
    assert type(tm).__module__.startswith("timm.")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, pooled = ours(x)
        # the perturbed ResNet-50's activations reach the hundreds: a relative tolerance
        torch.testing.assert_close(tm.forward_features(x).flatten(2).transpose(1, 2), maps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tm(x), pooled, rtol=1e-5, atol=1e-5)
