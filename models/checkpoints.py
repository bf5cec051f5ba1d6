"""Reading backbone weights from every form users have, with strict, explained loading.

Accepted forms (``extract_backbone_state_dict``):
- an exported backbone: plain keys (``conv1.weight``, ``stages.0.0.dwconv.weight`` ...), as the
  published ``<arch>_alpha<a>.pth`` files and our ``backbone.pth``;
- a pretraining checkpoint: ``{"model": {"module.backbone.<key>": ...}, ...}`` (our ``model.pth``,
  the reference's, and the published ``_fullckpt.pth`` files), with or without ``module.``;
- a state dict wrapped under ``state_dict`` or ``model``.
Shared by ``evaluate.py``, ``hubconf.py`` and ``segmentation/``.

Also here: the published files' URLs (``published_url``) and the whole pretraining model from a
full checkpoint, expanders and online classifier included (``load_pretraining_model``).
"""
import functools
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "read_checkpoint", "extract_backbone_state_dict", "load_backbone_weights",
           "guess_arch", "misfit", "PUBLISHED_URL", "published_url", "pretraining_state_dict",
           "pretraining_config_from_state_dict", "load_pretraining_model"]

# Where the authors published the weights: <arch>_alpha<0.9|0.75>.pth (backbone, plain keys) and
# <arch>_alpha<...>_fullckpt.pth (the pretraining checkpoint, keys under "model" with "module.").
PUBLISHED_URL = "https://dl.fbaipublicfiles.com/vicregl/{arch}_alpha{alpha}{suffix}.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or for another architecture."""


def read_checkpoint(source: Union[str, os.PathLike, Mapping], map_location="cpu", progress: bool = True,
                    check_hash: bool = False) -> Mapping:
    """Load a checkpoint from a path, an http(s):// or file:// URL (through torch.hub's cache and
    progress bar), or return an already loaded mapping. Unreadable files raise CheckpointError."""
    if isinstance(source, Mapping):
        return source
    source = str(source)
    scheme = urlparse(source).scheme
    try:
        if scheme in ("http", "https", "file"):
            return torch.hub.load_state_dict_from_url(source, map_location=map_location, progress=progress,
                                                      check_hash=check_hash)
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint file not found: {source}")
        return torch.load(source, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, pickle garbage, network error...
        raise CheckpointError(f"cannot read checkpoint {source}: {type(e).__name__}: {e}. "
                              f"The file may be truncated or not a PyTorch checkpoint.") from e


def _unwrap(obj: Mapping) -> Mapping:
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def extract_backbone_state_dict(obj: Mapping) -> Dict[str, Tensor]:
    """The backbone's weights (plain keys) from any accepted checkpoint form."""
    sd = _unwrap(obj)
    if not sd or not all(isinstance(k, str) for k in sd):
        raise CheckpointError("the checkpoint holds no state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _summary(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def misfit(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], allow_unexpected: bool = False) -> List[str]:
    """Lines saying why ``sd`` does not load strictly into a module whose state dict is ``own``:
    missing keys, shape mismatches and (unless allowed) unexpected keys. Empty when it fits."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    lines = []
    if missing:
        lines.append(f"  missing {len(missing)} of {len(own)} keys: {_summary(missing)}")
    if mismatched:
        lines.append(f"  shape mismatch (file vs model): {_summary(mismatched)}")
    if unexpected and not allow_unexpected:
        lines.append(f"  unexpected keys: {_summary(unexpected)}")
    return lines


def load_backbone_weights(backbone: nn.Module, source, arch: Optional[str] = None,
                          map_location="cpu", allow_unexpected: bool = False,
                          progress: bool = True) -> Tuple[List[str], List[str]]:
    """Load backbone weights strictly, with a message that lists what does not fit.

    Every backbone key must be present with its shape (missing or mismatched keys raise
    CheckpointError, naming them and, when recognisable, the architecture the file was made for).
    Unexpected keys raise too unless ``allow_unexpected``. Returns (missing, unexpected): both empty
    on success unless unexpected keys were allowed. ``progress``: torch.hub's download bar for URLs.
    """
    sd = extract_backbone_state_dict(read_checkpoint(source, map_location, progress))
    own = backbone.state_dict()
    lines = misfit(own, sd, allow_unexpected)
    if lines:
        name = arch or type(backbone).__name__
        guess = guess_arch(sd)
        if guess and guess != arch:
            lines.append(f"  the file looks like a {guess} checkpoint: pass --arch {guess}")
        raise CheckpointError("\n".join([f"checkpoint {_describe(source)} does not fit {name}:"] + lines))
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)
    return [], [k for k in sd if k not in own]


def _describe(source) -> str:
    return "(in memory)" if isinstance(source, Mapping) else str(source)


def guess_arch(sd: Mapping[str, Tensor]) -> Optional[str]:
    """The registered architecture whose parameter names and shapes equal ``sd``'s, if any.

    Only architectures of the file's family with as many entries are built (on the meta device,
    once per process), so a failed load explains itself in milliseconds."""
    from . import BACKBONES, backbone_family  # late import: models/__init__ imports this module's users
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    family = "resnet" if "conv1.weight" in shapes else "convnext" if "downsample_layers.0.0.weight" in shapes else None
    for arch in BACKBONES:
        if backbone_family(arch) != family:
            continue
        own = _arch_shapes(arch)
        if len(own) == len(shapes) and own == shapes:
            return arch
    return None


@functools.lru_cache(maxsize=None)
def _arch_shapes(arch: str) -> Dict[str, Tuple[int, ...]]:
    from . import build_backbone
    with torch.device("meta"):
        net, _ = build_backbone(arch)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def published_url(arch: str, alpha: float, full_checkpoint: bool = False) -> str:
    """URL of a published file: ``published_url("resnet50", 0.9)`` ->
    https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.9.pth (``_fullckpt.pth`` for the full one)."""
    return PUBLISHED_URL.format(arch=arch, alpha=f"{alpha:g}", suffix="_fullckpt" if full_checkpoint else "")


def pretraining_state_dict(obj: Mapping) -> Dict[str, Tensor]:
    """The pretraining model's tensors from a checkpoint, ``module.`` stripped (other entries such
    as ``epoch`` and ``optimizer`` are ignored)."""
    sd = _unwrap(obj)
    if not sd or not all(isinstance(k, str) for k in sd):
        raise CheckpointError("the checkpoint holds no state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}


def _expander_spec(sd: Mapping[str, Tensor], prefix: str) -> Optional[str]:
    """'8192-8192-8192' from the Linear weights ``<prefix>.<index>.weight`` (2-D), None if absent."""
    linears = sorted((int(k.split(".")[1]), v.shape[0]) for k, v in sd.items()
                     if k.startswith(prefix + ".") and k.count(".") == 2 and k.endswith(".weight")
                     and v.ndim == 2)
    return "-".join(str(width) for _, width in linears) or None


def pretraining_config_from_state_dict(sd: Mapping[str, Tensor], arch: str, alpha: Optional[float] = None,
                                       backbone_kwargs: Optional[dict] = None):
    """The ``VICRegLConfig`` that a pretraining state dict (plain keys, no ``module.``) was made with.

    Expander widths come from the Linear shapes, ``num_classes`` from the classifier (0 without one).
    ``alpha`` only weighs the losses, so the file cannot tell it exactly: when None it is 1 for a file
    with only the global expander, 0 with only the local one and the default 0.75 with both; when
    given it must agree with the expanders present. A file without expanders raises CheckpointError.
    """
    from .vicregl import VICRegLConfig  # late import: models/vicregl imports the package
    mlp, maps_mlp = _expander_spec(sd, "projector"), _expander_spec(sd, "maps_projector")
    if mlp is None and maps_mlp is None:
        raise CheckpointError("the checkpoint holds no expander (projector / maps_projector): it is not a "
                              "full pretraining checkpoint; load it as a backbone instead")
    if alpha is None:
        alpha = 1.0 if maps_mlp is None else 0.0 if mlp is None else VICRegLConfig.alpha
    elif (alpha > 0) != (mlp is not None) or (alpha < 1) != (maps_mlp is not None):
        raise CheckpointError(f"alpha={alpha} needs {'a' if alpha > 0 else 'no'} global expander (projector) "
                              f"and {'a' if alpha < 1 else 'no'} local expander (maps_projector); the file has "
                              f"projector: {mlp is not None}, maps_projector: {maps_mlp is not None}")
    classifier = sd.get("classifier.weight")
    return VICRegLConfig(arch=arch, alpha=alpha, mlp=mlp or VICRegLConfig.mlp,
                         maps_mlp=maps_mlp or VICRegLConfig.maps_mlp,
                         num_classes=0 if classifier is None else classifier.shape[0],
                         backbone_kwargs=dict(backbone_kwargs or {}))


def load_pretraining_model(source, arch: str, alpha: Optional[float] = None, map_location="cpu",
                           progress: bool = True, **backbone_kwargs):
    """The whole ``VICRegL`` pretraining model (backbone, projector, maps_projector, classifier) from a
    full checkpoint (``_fullckpt.pth``, our ``model.pth``): path, URL or loaded mapping.

    The expanders' widths and the number of classes are read from the file
    (``pretraining_config_from_state_dict``); every key must fit strictly, otherwise CheckpointError
    lists the missing, mismatched and unexpected keys. ``backbone_kwargs`` go to the backbone factory.
    """
    from .vicregl import VICRegL
    sd = pretraining_state_dict(read_checkpoint(source, map_location, progress))
    model = VICRegL(pretraining_config_from_state_dict(sd, arch, alpha, backbone_kwargs))
    own = model.state_dict()
    lines = misfit(own, sd)
    if lines:
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        guess = guess_arch(backbone_sd) if backbone_sd else None
        if guess and guess != arch:
            lines.append(f"  the file looks like a {guess} checkpoint: pass --arch {guess}")
        raise CheckpointError("\n".join([f"checkpoint {_describe(source)} does not fit the {arch} "
                                         f"pretraining model:"] + lines))
    model.load_state_dict(sd, strict=True)
    return model
