"""VICRegL backbone weights under timm's parameter names, and back.

Pure renaming functions ``sd -> sd`` (``to_timm_state_dict`` / ``from_timm_state_dict``, one per
family underneath) and two conveniences that build the model on the other side and load it strictly:
``to_timm(source, arch) -> timm model`` and ``from_timm(timm_model, arch) -> our backbone``. Every key
must be covered by a renaming rule and every name and shape must match the target model: nothing is
dropped or loaded with ``strict=False``. timm is imported only by the two conveniences.

ResNet: the names are torchvision's on both sides, so the renaming is the identity (still checked).
Our stem pads by 1 and convolves with padding 2, timm's convolves with padding 3: the same output.

ConvNeXt, ours -> timm:
    downsample_layers.0.{0,1}    -> stem.{0,1}
    downsample_layers.k.{0,1}    -> stages.k.downsample.{0,1}          (k = 1, 2, 3)
    stages.k.m.dwconv            -> stages.k.blocks.m.conv_dw
    stages.k.m.norm              -> stages.k.blocks.m.norm
    stages.k.m.pwconv1 / pwconv2 -> stages.k.blocks.m.mlp.fc1 / mlp.fc2
    stages.k.m.gamma             -> stages.k.blocks.m.gamma           (only with layer scale)
    norm                         -> head.norm
The final norm is applied differently. We normalise every position of the last map and average the
normalised positions; timm averages first and normalises the pooled vector (``head.norm``). So
``timm_model.forward_features(x)`` equals our ``forward_stages(x)[-1]`` (before the norm), our ``maps``
equal ``timm_model.head.norm(features)`` applied to the whole map (a channel LayerNorm per position),
and timm's pooled output LN(mean(x)) is *not* our ``pooled`` mean(LN(x)). VICRegL's published models
have no layer scale (``ls_init_value=None`` on the timm side); timm's own ImageNet ConvNeXts do.
"""
import re
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from . import backbone_family, build_backbone
from .checkpoints import (CheckpointError, _describe, _summary, extract_backbone_state_dict, guess_arch,
                          load_backbone_weights, misfit, read_checkpoint)

__all__ = ["TIMM_ARCHS", "to_timm_state_dict", "from_timm_state_dict", "timm_model_args", "to_timm",
           "from_timm"]

# Renaming rules (ours, timm), first match wins. {k} {m} {i} are indices; {p} is one name segment
# (weight, bias, running_mean, ...).
_CONVNEXT_NAMES = [
    ("downsample_layers.0.{i}.{p}", "stem.{i}.{p}"),
    ("downsample_layers.{k}.{i}.{p}", "stages.{k}.downsample.{i}.{p}"),
    ("stages.{k}.{m}.gamma", "stages.{k}.blocks.{m}.gamma"),
    ("stages.{k}.{m}.dwconv.{p}", "stages.{k}.blocks.{m}.conv_dw.{p}"),
    ("stages.{k}.{m}.norm.{p}", "stages.{k}.blocks.{m}.norm.{p}"),
    ("stages.{k}.{m}.pwconv1.{p}", "stages.{k}.blocks.{m}.mlp.fc1.{p}"),
    ("stages.{k}.{m}.pwconv2.{p}", "stages.{k}.blocks.{m}.mlp.fc2.{p}"),
    ("norm.{p}", "head.norm.{p}"),
]
_RESNET_NAMES = [(name, name) for name in [
    "conv1.weight",
    "bn1.{p}",
    "layer{k}.{m}.conv{i}.weight",
    "layer{k}.{m}.bn{i}.{p}",
    "layer{k}.{m}.downsample.{i}.{p}",
]]

# Our architecture -> (timm model name, extra timm model arguments that make it the same network).
# The SwAV-style wide ResNets (resnet50x2/x4/x5, resnet200x2) and resnet_test widen or narrow the 7x7
# stem, which timm's ResNet cannot express (its plain stem is always 64 channels): no counterpart.
TIMM_ARCHS: Dict[str, Tuple[str, dict]] = {
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", {}),
    "convnext_tiny": ("convnext_tiny", {}),
    "convnext_small": ("convnext_small", {}),
    "convnext_base": ("convnext_base", {}),
    "convnext_large": ("convnext_large", {}),
    "convnext_xlarge": ("convnext_xlarge", {}),
    "convnext_test": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
}


@lru_cache(maxsize=None)
def _regex(template: str) -> "re.Pattern":
    """'stages.{k}.{m}.norm.{p}' -> a regex with named groups (digits for indices, one segment for p)."""
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ..., literal
    return re.compile("".join(
        re.escape(part) if n % 2 == 0 else (r"(?P<p>[A-Za-z_]+)" if part == "p" else rf"(?P<{part}>\d+)")
        for n, part in enumerate(parts)))


def _rename(sd: Mapping[str, Tensor], rules: Sequence[Tuple[str, str]], reverse: bool, what: str,
            order: Callable[[str], Tuple]) -> Dict[str, Tensor]:
    """Rename every key by the first matching rule; unknown keys and collisions raise CheckpointError.
    The result is stably sorted by ``order`` so that it follows the target model's key order."""
    src, dst = (1, 0) if reverse else (0, 1)
    out: Dict[str, Tensor] = {}
    unknown: List[str] = []
    for key, value in sd.items():
        for rule in rules:
            match = _regex(rule[src]).fullmatch(key)
            if match:
                break
        else:
            unknown.append(key)
            continue
        new = rule[dst].format(**match.groupdict())
        if new in out:
            raise CheckpointError(f"{what}: two keys map to {new} (the second is {key})")
        out[new] = value
    if unknown:
        hint = ""
        if any(k.startswith(("fc.", "head.fc.")) for k in unknown):
            hint = " (a classifier: create the timm model with num_classes=0 or call reset_classifier(0))"
        raise CheckpointError(f"{what}: no counterpart for {_summary(unknown)}{hint}")
    return dict(sorted(out.items(), key=lambda item: order(item[0])))


def _index(key: str, position: int) -> int:
    return int(key.split(".")[position])


def _ours_convnext_order(key: str) -> Tuple:
    # ours: every downsample layer, then every stage, then norm
    return (0,) if key.startswith("downsample_layers.") else (1,) if key.startswith("stages.") else (2,)


def _timm_convnext_order(key: str) -> Tuple:
    # timm: stem, then per stage its downsample and its blocks, then the head
    if key.startswith("stem."):
        return (-1, 0)
    if key.startswith("stages."):
        return (_index(key, 1), 0 if key.split(".")[2] == "downsample" else 1)
    return (99, 0)


def _same_order(key: str) -> Tuple:
    return ()


def to_timm_state_dict(sd: Mapping[str, Tensor], arch: str) -> Dict[str, Tensor]:
    """Our backbone state dict (plain keys) -> timm's names, in timm's key order."""
    if backbone_family(arch) == "convnext":
        return _rename(sd, _CONVNEXT_NAMES, False, f"{arch} -> timm", _timm_convnext_order)
    return _rename(sd, _RESNET_NAMES, False, f"{arch} -> timm", _same_order)


def from_timm_state_dict(sd: Mapping[str, Tensor], arch: str) -> Dict[str, Tensor]:
    """A timm state dict (``num_classes=0``, no classifier) -> our names, in our key order."""
    if backbone_family(arch) == "convnext":
        return _rename(sd, _CONVNEXT_NAMES, True, f"timm -> {arch}", _ours_convnext_order)
    return _rename(sd, _RESNET_NAMES, True, f"timm -> {arch}", _same_order)


def timm_model_args(arch: str, sd: Optional[Mapping[str, Tensor]] = None,
                    backbone: Optional[nn.Module] = None) -> Tuple[str, dict]:
    """(timm model name, create_model arguments) for our ``arch``, adjusted to what the weights hold
    (layer scale, input channels) and to how ``backbone`` was built (dilation as output_stride)."""
    if arch not in TIMM_ARCHS:
        raise ValueError(f"no timm counterpart registered for {arch!r}; known: {', '.join(TIMM_ARCHS)}")
    name, args = TIMM_ARCHS[arch]
    args = dict(args)
    if backbone_family(arch) == "convnext":
        has_gamma = sd is not None and any(k.endswith(".gamma") for k in sd)
        args["ls_init_value"] = 1e-6 if has_gamma else None  # the value is overwritten by the weights
        if sd is not None and "downsample_layers.0.0.weight" in sd:
            args["in_chans"] = sd["downsample_layers.0.0.weight"].shape[1]
    if backbone is not None and backbone_family(arch) == "resnet":
        if getattr(backbone, "small_input", False):
            raise ValueError("a small_input ResNet (3x3 stride-1 stem, no max-pool) has no timm counterpart")
        # timm places dilation by output stride: layer4 dilated -> 16, layer3 and layer4 -> 8
        strides = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}
        dilate = tuple(getattr(backbone, "dilate", (False, False, False)))
        if dilate not in strides:
            raise ValueError(f"replace_stride_with_dilation={list(dilate)} has no timm output_stride")
        if any(dilate) and not hasattr(backbone.layer1[0], "conv3"):
            raise ValueError("a dilated BasicBlock ResNet has no timm counterpart: our BasicBlock dilates "
                             "only its second 3x3 convolution, timm's dilates both")
        if strides[dilate] != 32:
            args["output_stride"] = strides[dilate]
    return name, args


def to_timm(source, arch: Optional[str] = None, **timm_kwargs) -> nn.Module:
    """A timm model holding our backbone's weights: ``timm.create_model(name, pretrained=False,
    num_classes=0)`` for the matching name in ``TIMM_ARCHS`` (ConvNeXt without layer scale).

    source: our backbone module, its state dict, a checkpoint path/URL or a full checkpoint.
    arch: our architecture name; guessed from the weights' names and shapes when None.
    timm_kwargs: more timm model arguments (``drop_path_rate``, ``num_classes`` for a new
    head ...); they must not change the parameters that the weights fill.
    The model is returned in training mode, like a freshly created one. See the module docstring for
    the ConvNeXt final-norm difference.
    """
    import timm  # optional dependency, only needed here

    backbone = source if isinstance(source, nn.Module) else None
    sd = (backbone.state_dict() if backbone is not None
          else extract_backbone_state_dict(read_checkpoint(source), _describe(source)))
    if arch is None:
        arch = guess_arch(sd)
        if arch is None:
            raise CheckpointError("cannot tell the architecture of these weights: pass arch=")
    name, args = timm_model_args(arch, sd, backbone)
    args.update({"num_classes": 0, **timm_kwargs})
    # timm's registered factory, as timm.create_model(name, ...) calls it; create_model itself would
    # drop ls_init_value=None (it discards None arguments) and so add layer-scale gammas.
    model = timm.model_entrypoint(name)(pretrained=False, **args)
    converted = to_timm_state_dict(sd, arch)
    full = model.state_dict()
    # A classifier asked for with num_classes > 0 is new: it keeps its fresh init, nothing else may.
    new_head = {k: v for k, v in full.items() if k.startswith(("head.fc.", "fc."))}
    lines = misfit({k: v for k, v in full.items() if k not in new_head}, converted)
    if lines:
        raise CheckpointError("\n".join([f"{arch} weights do not fit timm {name} {args}:"] + lines))
    model.load_state_dict({**converted, **new_head}, strict=True)
    return model


def from_timm(source, arch: str, **backbone_kwargs) -> nn.Module:
    """Our backbone for ``arch`` holding a timm model's weights (module, state dict or checkpoint;
    without a classifier), loaded strictly. ``backbone_kwargs`` go to our factory (for example
    ``layer_scale_init_value=1e-6`` for timm's layer-scaled ImageNet ConvNeXts)."""
    sd = (source.state_dict() if isinstance(source, nn.Module)
          else extract_backbone_state_dict(read_checkpoint(source), _describe(source)))
    backbone, _ = build_backbone(arch, **backbone_kwargs)
    load_backbone_weights(backbone, from_timm_state_dict(sd, arch), arch)
    return backbone
