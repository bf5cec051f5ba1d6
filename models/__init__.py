"""Backbones, expanders, the VICRegL pretraining model and its losses.

``build_backbone(arch, **kwargs) -> (backbone, num_features)`` is the single entry point to every
architecture; ``map_size(arch, size)`` says how large the last feature map is for a crop size
without building anything.
"""
from typing import Callable, Dict, List, Tuple

from torch import nn

from . import convnext, resnet
from .convnext import ConvNeXt, convnext_map_size
from .resnet import ResNet, resnet_map_size

__all__ = ["VICRegL", "VICRegLConfig", "BACKBONES", "build_backbone", "backbone_family", "map_size", "available_archs",
           "ResNet", "ConvNeXt"]

BACKBONES: Dict[str, Callable[..., Tuple[nn.Module, int]]] = {
    name: getattr(resnet, name) for name in
    ["resnet18", "resnet34", "resnet50", "resnet101", "resnet50x2", "resnet50x4", "resnet50x5",
     "resnet200x2", "resnet_mini", "resnet_test"]
}
BACKBONES.update({
    name: getattr(convnext, name) for name in
    ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
     "convnext_test"]
})

# Keyword arguments that only one family understands (the scripts pass what the user asked for).
FAMILY_KWARGS = {
    "resnet": {"zero_init_residual", "small_input", "replace_stride_with_dilation", "widen",
               "width_per_group", "groups", "base_channels"},
    "convnext": {"drop_path_rate", "layer_scale_init_value", "in_chans"},
}


def available_archs() -> List[str]:
    return sorted(BACKBONES)


def backbone_family(arch: str) -> str:
    """'resnet' or 'convnext'; ValueError naming the known architectures otherwise."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown --arch {arch!r}; choose one of: {', '.join(available_archs())}")
    return "resnet" if arch.startswith("resnet") else "convnext"


def build_backbone(arch: str, **kwargs) -> Tuple[nn.Module, int]:
    """Build a backbone by name -> (module, output width).

    Keyword arguments meant for the other family are an error, so a typo never passes silently.
    """
    family = backbone_family(arch)
    unknown = set(kwargs) - FAMILY_KWARGS[family]
    if unknown:
        raise ValueError(f"{arch} does not take {sorted(unknown)}; it takes {sorted(FAMILY_KWARGS[family])}")
    return BACKBONES[arch](**kwargs)


def backbone_kwargs(arch: str, **options) -> dict:
    """Keep only the options that ``arch``'s family understands (for scripts with many flags)."""
    return {k: v for k, v in options.items() if k in FAMILY_KWARGS[backbone_family(arch)]}


def map_size(arch: str, size: int, small_input: bool = False, replace_stride_with_dilation=None) -> int:
    """Side of ``arch``'s last feature map for a square crop of side ``size`` (nothing is built).

    224 -> 7 and 96 -> 3 for both families; other sizes round differently (ResNet rounds up at
    every stride-2 step, ConvNeXt floors).
    """
    if backbone_family(arch) == "resnet":
        return resnet_map_size(size, small_input, replace_stride_with_dilation)
    return convnext_map_size(size)


from .vicregl import VICRegL, VICRegLConfig  # noqa: E402  (needs build_backbone above)
