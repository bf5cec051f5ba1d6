"""Reading backbone weights from every form users have, with strict, explained loading.

Accepted forms (``extract_backbone_state_dict``):
- an exported backbone: plain keys (``conv1.weight``, ``stages.0.0.dwconv.weight`` ...), as the
  published ``<arch>_alpha<a>.pth`` files and our ``backbone.pth``;
- a pretraining checkpoint: ``{"model": {"module.backbone.<key>": ...}, ...}`` (our ``model.pth``,
  the reference's, and the published ``_fullckpt.pth`` files), with or without ``module.``;
- a state dict wrapped under ``state_dict`` or ``model``.
Shared by ``evaluate.py``, ``hubconf.py`` and ``segmentation/``.
"""
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "read_checkpoint", "extract_backbone_state_dict", "load_backbone_weights",
           "guess_arch"]


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


def load_backbone_weights(backbone: nn.Module, source, arch: Optional[str] = None,
                          map_location="cpu", allow_unexpected: bool = False) -> Tuple[List[str], List[str]]:
    """Load backbone weights strictly, with a message that lists what does not fit.

    Every backbone key must be present with its shape (missing or mismatched keys raise
    CheckpointError, naming them and, when recognisable, the architecture the file was made for).
    Unexpected keys raise too unless ``allow_unexpected``. Returns (missing, unexpected): both empty
    on success unless unexpected keys were allowed.
    """
    sd = extract_backbone_state_dict(read_checkpoint(source, map_location))
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    if missing or mismatched or (unexpected and not allow_unexpected):
        name = arch or type(backbone).__name__
        lines = [f"checkpoint {_describe(source)} does not fit {name}:"]
        if missing:
            lines.append(f"  missing {len(missing)} of {len(own)} keys: {_summary(missing)}")
        if mismatched:
            lines.append(f"  shape mismatch (file vs model): {_summary(mismatched)}")
        if unexpected and not allow_unexpected:
            lines.append(f"  unexpected keys: {_summary(unexpected)}")
        guess = guess_arch(sd)
        if guess and guess != arch:
            lines.append(f"  the file looks like a {guess} checkpoint: pass --arch {guess}")
        raise CheckpointError("\n".join(lines))
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)
    return missing, unexpected


def _describe(source) -> str:
    return "(in memory)" if isinstance(source, Mapping) else str(source)


def guess_arch(sd: Mapping[str, Tensor]) -> Optional[str]:
    """The registered architecture whose parameter names and shapes equal ``sd``'s, if any."""
    from . import BACKBONES, build_backbone  # late import: models/__init__ imports this module's users
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for arch in BACKBONES:
        with torch.device("meta"):
            net, _ = build_backbone(arch)
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            return arch
    return None
