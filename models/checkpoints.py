"""Reading backbone weights from every form users have, with strict, explained loading.

Accepted forms (``extract_backbone_state_dict``):
- an exported backbone: plain keys (``conv1.weight``, ``stages.0.0.dwconv.weight`` ...), as the
  published ``<arch>_alpha<a>.pth`` files and our ``backbone.pth``;
- a pretraining checkpoint: ``{"model": {"module.backbone.<key>": ...}, ...}`` (our ``model.pth``,
  the reference's, and the published ``_fullckpt.pth`` files), with or without ``module.``;
- a state dict wrapped under ``state_dict`` or ``model``.
Shared by every script that reads weights (``main_vicregl.py``, ``evaluate.py``, ``hubconf.py``,
``segmentation/``, ``visualize.py``, ``export.py``).

Safety: files are unpickled with ``weights_only=True``, so a shared file cannot run code: only
tensors, numbers, strings, lists, tuples and dicts come out. The one exception to plain data that
published files need is allowed by name (``ALLOWED_GLOBALS``) and replaced by an inert string.
Anything else is refused with ``UnsafeCheckpointError``, unless the caller opts in with
``trusted=True`` (the scripts' ``--trust-checkpoint``, the hub's ``trust_checkpoint=True``).

Also here: the published files' URLs (``published_url``) and the whole pretraining model from a
full checkpoint, expanders and online classifier included (``load_pretraining_model``).
"""
import functools
import os
import pickle
import pickletools
import sys
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from utils import TRUST_FLAG

__all__ = ["CheckpointError", "UnsafeCheckpointError", "TRUST_FLAG", "read_checkpoint",
           "extract_backbone_state_dict", "load_backbone_weights", "load_backbone", "guess_arch", "guess_backbone", "misfit",
           "PUBLISHED_URL", "published_url", "pretraining_state_dict", "pretraining_config_from_state_dict",
           "load_pretraining_model"]

# Where the authors published the weights: <arch>_alpha<0.9|0.75>.pth (backbone, plain keys) and
# <arch>_alpha<...>_fullckpt.pth (the pretraining checkpoint, keys under "model" with "module.").
PUBLISHED_URL = "https://dl.fbaipublicfiles.com/vicregl/{arch}_alpha{alpha}{suffix}.pth"

# Globals that published checkpoints name although they hold no code we need. The original LARS kept
# its two parameter filters (both this function of the original's optimizers.py) in every param group,
# so the published ResNet-50 _fullckpt.pth files refer to it in their optimizer state. It is unpickled
# as an inert placeholder and then replaced by its name: nothing of it is ever run or returned.
ALLOWED_GLOBALS = ("optimizers.exclude_bias_and_norm",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or for another architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds Python objects (which could run code when unpickled): refused unless
    the caller trusts the file."""


class _Placeholder:
    """What an allowed global becomes while unpickling: calling it does nothing but refuse."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise CheckpointError(f"the checkpoint tried to call {self.name}, which is only allowed as a name")


_PLACEHOLDERS = {name: _Placeholder(name) for name in ALLOWED_GLOBALS}


def _scrub(obj):
    """``obj`` with every placeholder replaced by its name (in place), so callers see plain data only."""
    if isinstance(obj, _Placeholder):
        return obj.name
    if isinstance(obj, (dict, list)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            clean = _scrub(v)
            if clean is not v:
                obj[k] = clean
        return obj
    if isinstance(obj, tuple):
        clean = tuple(_scrub(v) for v in obj)
        return obj if all(a is b for a, b in zip(clean, obj)) else clean
    return obj


def read_checkpoint(source: Union[str, os.PathLike, Mapping], map_location="cpu", progress: bool = True,
                    check_hash: bool = False, trusted: bool = False) -> Mapping:
    """Load a checkpoint from a path, an http(s):// or file:// URL (downloaded once into torch.hub's
    cache, with its progress bar), or return an already loaded mapping.

    Unpickling is ``weights_only``: a file holding other Python objects raises UnsafeCheckpointError
    naming them, unless ``trusted`` (then it is fully unpickled, with a warning on stderr). A missing,
    truncated or foreign file raises CheckpointError.
    """
    if isinstance(source, Mapping):
        return source
    source = str(source)
    if urlparse(source).scheme in ("http", "https", "file"):
        path = _download(source, progress, check_hash)
    elif os.path.isfile(source):
        path = source
    else:
        raise CheckpointError(f"checkpoint file not found: {source}")
    return _load_file(path, source, map_location, trusted)


def _download(url: str, progress: bool, check_hash: bool) -> str:
    """The local copy of ``url`` in torch.hub's cache (``<hub dir>/checkpoints/<file name>``), downloaded
    first when absent. ``check_hash``: the file name's ``-<sha256 prefix>`` suffix must match."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urlparse(url).path) or "checkpoint.pth")
    if os.path.isfile(path):
        return path
    match = torch.hub.HASH_REGEX.search(os.path.basename(path)) if check_hash else None
    try:
        os.makedirs(folder, exist_ok=True)
        if progress:
            print(f'Downloading: "{url}" to {path}', file=sys.stderr)
        torch.hub.download_url_to_file(url, path, match.group(1) if match else None, progress=progress)
    except Exception as e:  # offline, 404, a refused hash, a full disk
        raise CheckpointError(f"cannot download {url}: {_first_line(e)}") from e
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_file(path: str, shown: str, map_location, trusted: bool):
    if trusted:
        print(f"warning: {shown} is unpickled in full because of {TRUST_FLAG}: a file from an untrusted "
              f"source can run code on this machine", file=sys.stderr)
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    allowed = [(placeholder, name) for name, placeholder in _PLACEHOLDERS.items()]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below anyway
            return _scrub(torch.load(path, map_location=map_location, weights_only=True))
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{shown} holds Python objects that could run code when loaded ({', '.join(unsafe)}), so it "
                f"was not loaded; if you trust the file, pass {TRUST_FLAG} (torch.hub: "
                f"trust_checkpoint=True)") from None
        raise CheckpointError(f"cannot read checkpoint {shown}: it is truncated, or not a file that PyTorch's "
                              f"weights-only loader reads ({_first_line(e)})") from None
    except Exception as e:  # a truncated zip, pickle garbage, an empty file
        raise CheckpointError(f"cannot read checkpoint {shown}: it is truncated or not a PyTorch checkpoint "
                              f"({_first_line(e)})") from None


def _unsafe_globals(path: str) -> List[str]:
    """The names of the globals in ``path`` that the weights-only unpickler does not allow (empty when
    it failed for another reason), read without unpickling anything."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive: a raw pickle or the legacy format
        names = _pickle_globals(path)
    return sorted({n for n in names if n not in ALLOWED_GLOBALS})


def _pickle_globals(path: str) -> List[str]:
    """Every ``module.name`` that the pickles in ``path`` import, by reading their opcodes only."""
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            while f.peek(1):  # one pickle after another, as the legacy format writes them
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # garbage after the last complete pickle
        pass
    return names


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
                          progress: bool = True, trusted: bool = False) -> Tuple[List[str], List[str]]:
    """Load backbone weights strictly, with a message that lists what does not fit.

    Every backbone key must be present with its shape (missing or mismatched keys raise
    CheckpointError, naming them and, when recognisable, the architecture the file was made for).
    Unexpected keys raise too unless ``allow_unexpected``. Returns (missing, unexpected): both empty
    on success unless unexpected keys were allowed. ``progress``: torch.hub's download bar for URLs;
    ``trusted``: see ``read_checkpoint``.
    """
    sd = extract_backbone_state_dict(read_checkpoint(source, map_location, progress, trusted=trusted))
    return _load_strict(backbone, sd, arch, _describe(source), allow_unexpected)


def _load_strict(backbone: nn.Module, sd: Mapping[str, Tensor], arch: Optional[str], shown: str,
                 allow_unexpected: bool = False) -> Tuple[List[str], List[str]]:
    own = backbone.state_dict()
    lines = misfit(own, sd, allow_unexpected)
    if lines:
        lines += _guess_hint(sd, arch, _has_small_stem(backbone))
        raise CheckpointError("\n".join([f"checkpoint {shown} does not fit {arch or type(backbone).__name__}:"]
                                        + lines))
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)
    return [], [k for k in sd if k not in own]


def load_backbone(source, arch: Optional[str] = None, small_input: Optional[bool] = None,
                  progress: bool = True, trusted: bool = False) -> Tuple[nn.Module, str, bool]:
    """``(backbone, arch, small_input)`` from a checkpoint whose architecture need not be known.

    ``arch`` and ``small_input``, when None, come from a ``model.pth``'s saved arguments, else from the
    weights' shapes (``guess_backbone``). The weights load strictly (``load_backbone_weights``).
    """
    from . import backbone_family, build_backbone
    obj = read_checkpoint(source, progress=progress, trusted=trusted)
    sd = extract_backbone_state_dict(obj)
    saved = obj.get("args") if isinstance(obj.get("args"), Mapping) else {}
    arch = arch or saved.get("arch")
    if small_input is None and arch is not None and saved.get("arch") == arch and "small_input" in saved:
        small_input = bool(saved["small_input"])
    guess = guess_backbone(sd)
    if arch is None:
        if guess is None:
            raise CheckpointError(f"cannot recognise the architecture of {_describe(source)} from its weights: "
                                  f"pass --arch")
        arch = guess[0]
    try:
        family = backbone_family(arch)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if small_input is None:
        small_input = family == "resnet" and guess == (arch, True)
    if small_input and family != "resnet":
        raise CheckpointError("--small-input applies to ResNet backbones only")
    backbone, _ = build_backbone(arch, **({"small_input": True} if small_input else {}))
    _load_strict(backbone, sd, arch, _describe(source))
    return backbone, arch, bool(small_input)


def _describe(source) -> str:
    return "(in memory)" if isinstance(source, Mapping) else str(source)


def guess_arch(sd: Mapping[str, Tensor]) -> Optional[str]:
    """The registered architecture whose parameter names and shapes equal ``sd``'s, if any (the
    small-input ResNet stem included: see ``guess_backbone`` to know which stem)."""
    guess = guess_backbone(sd)
    return guess[0] if guess else None


def guess_backbone(sd: Mapping[str, Tensor]) -> Optional[Tuple[str, bool]]:
    """``(arch, small_input)`` whose parameter names and shapes equal ``sd``'s, if any.

    Only architectures of the file's family with as many entries are built (on the meta device,
    once per process), so a failed load explains itself in milliseconds. ``small_input``: the ResNet
    stem for 32-pixel images (a 3x3 stride-1 first convolution), visible in ``conv1.weight``'s shape.
    """
    from . import BACKBONES, backbone_family  # late import: models/__init__ imports this module's users
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    family = "resnet" if "conv1.weight" in shapes else "convnext" if "downsample_layers.0.0.weight" in shapes else None
    stems = (False, True) if family == "resnet" else (False,)
    for arch in BACKBONES:
        if backbone_family(arch) != family:
            continue
        for small_input in stems:
            own = _arch_shapes(arch, small_input)
            if len(own) == len(shapes) and own == shapes:
                return arch, small_input
    return None


def _has_small_stem(backbone: nn.Module) -> bool:
    conv1 = getattr(backbone, "conv1", None)
    return isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3)


def _guess_hint(sd: Mapping[str, Tensor], arch: Optional[str], small_input: bool) -> List[str]:
    """A line saying which --arch (and stem) the weights fit, when that differs from what was asked."""
    guess = guess_backbone(sd)
    if guess is None or guess == (arch, small_input):
        return []
    flags = f"--arch {guess[0]}" + (" --small-input" if guess[1] else "")
    if guess[0] == arch:
        return [f"  the file was made {'with' if guess[1] else 'without'} the small-input ResNet stem: "
                f"{'pass' if guess[1] else 'drop'} --small-input"]
    return [f"  the file looks like a {guess[0]}{' (small-input stem)' if guess[1] else ''} checkpoint: "
            f"pass {flags}"]


@functools.lru_cache(maxsize=None)
def _arch_shapes(arch: str, small_input: bool = False) -> Dict[str, Tuple[int, ...]]:
    from . import build_backbone
    with torch.device("meta"):
        net, _ = build_backbone(arch, **({"small_input": True} if small_input else {}))
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
                           progress: bool = True, trusted: bool = False, **backbone_kwargs):
    """The whole ``VICRegL`` pretraining model (backbone, projector, maps_projector, classifier) from a
    full checkpoint (``_fullckpt.pth``, our ``model.pth``): path, URL or loaded mapping.

    The expanders' widths and the number of classes are read from the file
    (``pretraining_config_from_state_dict``); every key must fit strictly, otherwise CheckpointError
    lists the missing, mismatched and unexpected keys. ``backbone_kwargs`` go to the backbone factory.
    """
    from .vicregl import VICRegL
    sd = pretraining_state_dict(read_checkpoint(source, map_location, progress, trusted=trusted))
    model = VICRegL(pretraining_config_from_state_dict(sd, arch, alpha, backbone_kwargs))
    own = model.state_dict()
    lines = misfit(own, sd)
    if lines:
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        lines += _guess_hint(backbone_sd, arch, bool(backbone_kwargs.get("small_input")))
        raise CheckpointError("\n".join([f"checkpoint {_describe(source)} does not fit the {arch} "
                                         f"pretraining model:"] + lines))
    model.load_state_dict(sd, strict=True)
    return model
