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
A hostile file costs no more time or memory than its real size either: a zip must not unpack to more
than the file holds, the loaded objects are walked once each (shared children once, no recursion,
at most ``_MAX_DEPTH`` deep), every tensor must hold the data its shape declares (an expanded tensor
of 4 bytes can declare 10**8 x 10**8 elements), the contents must be a dict whose ``model`` /
``state_dict`` entry is a state dict, naming a refused file's globals reads a bounded number of
opcodes, and a full checkpoint's shapes are checked on the meta device before its model is built.
Each refusal is one CheckpointError line that names the file.

Also here: the published files' URLs (``published_url``) and the whole pretraining model from a
full checkpoint, expanders and online classifier included (``load_pretraining_model``).
"""
import functools
import io
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from utils import TRUST_FLAG

__all__ = ["CheckpointError", "UnsafeCheckpointError", "TRUST_FLAG", "read_checkpoint", "check_entries",
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
_MAX_DEPTH = 100  # containers in containers: a checkpoint nests 4 or 5 (the optimizer's state)


def _scrub(obj, shown: str = "(in memory)"):
    """``obj`` with every placeholder replaced by its name (in place), so callers see plain data only,
    and every tensor checked (``_check_tensor``).

    Each dict, list and tuple is visited once, without recursion: a pickle's memo lets a 2 KB file share
    children so that there are 2**60 paths through 60 lists, or nest lists 100,000 deep, and neither
    may cost more than the number of objects the file really holds. Nesting deeper than ``_MAX_DEPTH``
    is refused, since what reads the result later (repr, copies, comparisons) recurses.
    """
    clean = {}  # id(object) -> the object to put in its place; also marks what was visited
    depth = {}  # id(container) -> how many containers deep it nests, itself included
    replaced = []  # tuples rebuilt: kept alive so that their ids are not reused during the walk
    stack = [(obj, (), False)]  # (object, where: (parent's where, key), its children done)
    while stack:
        node, where, leaving = stack.pop()
        if leaving:
            values = node.values() if isinstance(node, dict) else node
            depth[id(node)] = 1 + max((depth.get(id(v), 0) for v in values), default=0)
            if depth[id(node)] > _MAX_DEPTH:
                raise CheckpointError(f"cannot use checkpoint {shown}: it nests lists, tuples or dicts more than "
                                      f"{_MAX_DEPTH} levels deep (at {_where(where) or 'the top'}), which no "
                                      f"checkpoint does")
            if isinstance(node, tuple):
                new = tuple(clean.get(id(v), v) for v in node)
                if any(a is not b for a, b in zip(new, node)):
                    clean[id(node)] = new
                    replaced.append(node)
            else:
                for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                    if clean.get(id(v), v) is not v:
                        node[k] = clean[id(v)]
            continue
        if id(node) in clean:  # shared, or a cycle back to a container being walked
            continue
        if isinstance(node, _Placeholder):
            clean[id(node)] = node.name
        elif torch.is_tensor(node):
            _check_tensor(node, where, shown)
            clean[id(node)] = node
        elif isinstance(node, (dict, list, tuple)):
            clean[id(node)] = node
            stack.append((node, where, True))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((v, (where, k), False) for k, v in items if id(v) not in clean)
    return clean.get(id(obj), obj)


def _check_tensor(t: Tensor, where: tuple, shown: str) -> None:
    """Refuse a tensor that declares more than the file holds: a stride-0 (expanded) tensor of a few
    bytes can declare 10**8 x 10**8 elements, and whatever is built or copied to its shape would be
    allocated in full. Sparse and meta tensors (a shape without data) are refused for the same reason."""
    what = f"cannot use checkpoint {shown}: its tensor {_where(where)} of shape {tuple(t.shape)}"
    if t.layout != torch.strided or t.is_meta or t.is_nested:
        raise CheckpointError(f"{what} is a {'meta' if t.is_meta else t.layout} tensor; only dense tensors "
                              f"with their data are read")
    need, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if need > held:
        raise CheckpointError(f"{what} needs {need} bytes but the file holds {held} for it (an expanded or "
                              f"overlapping tensor), so it was not loaded")


def _where(where: tuple, shown: int = 4) -> str:
    """``['model']['conv1.weight']`` from the linked (parent, key) path; deep paths are elided."""
    keys = []
    while where:
        where, key = where
        keys.append(f"[{key!r}]")
    keys.reverse()
    return "".join(keys) if len(keys) <= 2 * shown else "".join(keys[:shown]) + "..." + "".join(keys[-shown:])


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
    _check_container(path, shown, trusted)
    if trusted:
        print(f"warning: {shown} is unpickled in full because of {TRUST_FLAG}: a file from an untrusted "
              f"source can run code on this machine", file=sys.stderr)
        try:  # the user opted in (--trust-checkpoint): a full unpickle
            obj = torch.load(path, map_location=map_location, weights_only=not trusted)
        except Exception as e:  # a truncated file, or whatever the file's own objects raise
            raise CheckpointError(f"cannot read checkpoint {shown}: {_first_line(e)}") from None
        return _checked(obj, shown)
    allowed = [(placeholder, name) for name, placeholder in _PLACEHOLDERS.items()]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below anyway
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise _unsafe(shown, unsafe) from None
        raise CheckpointError(f"cannot read checkpoint {shown}: it is truncated, or not a file that PyTorch's "
                              f"weights-only loader reads ({_weights_only_reason(e)})") from None
    except Exception as e:  # a truncated zip, pickle garbage, an empty file
        raise CheckpointError(f"cannot read checkpoint {shown}: it is truncated or not a PyTorch checkpoint "
                              f"({_first_line(e)})") from None
    return _checked(obj, shown)


def _unsafe(shown: str, names: List[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{shown} holds Python objects that could run code when loaded ({', '.join(names)}), so it was not "
        f"loaded; if you trust the file, pass {TRUST_FLAG} (torch.hub: trust_checkpoint=True)")


def _weights_only_reason(e: BaseException) -> str:
    """What the weights-only unpickler objected to ('Unsupported operand 140'), without its long preamble."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0]
    return _first_line(e)


def _checked(obj, shown: str) -> Mapping:
    """``obj`` scrubbed (``_scrub``), if it has the shape of a checkpoint: a dict whose ``model`` and
    ``state_dict`` entries, when present, are state dicts. Anything else is one CheckpointError line."""
    obj = _scrub(obj, shown)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"cannot use checkpoint {shown}: it holds {_a(obj)}, where a dict was expected (a "
                              f"state dict, or a checkpoint with a 'model' or 'state_dict' entry)")
    check_entries(obj, shown, {"model": (Mapping, Tensor), "state_dict": (Mapping, Tensor)})
    return obj


def check_entries(obj: Mapping, shown: str, expected: Mapping[str, Union[type, Tuple[type, ...]]]) -> None:
    """Raise CheckpointError naming the file and the entry when an entry named in ``expected`` (name ->
    type or types) is present in ``obj`` with another type: ``{"epoch": int, "optimizer": Mapping}``."""
    for key, kinds in expected.items():
        if key in obj and not isinstance(obj[key], kinds):
            wanted = " or ".join(_KINDS.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise CheckpointError(f"cannot use checkpoint {shown}: its {key!r} entry is {_a(obj[key])}, where "
                                  f"{wanted} was expected")


_KINDS = {Mapping: "a dict", Tensor: "a tensor", int: "an int"}


def _a(obj) -> str:
    """'a list', 'a tensor', 'an int': what an object is, for messages."""
    name = "tensor" if torch.is_tensor(obj) else type(obj).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# The legacy format (torch.save(..., _use_new_zipfile_serialization=False)) starts with this number,
# pickled on its own; the zip format starts with a zip entry, as torch.load tells them apart.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_ZIP_MAGIC = b"PK\x03\x04"
# Reading a refused pickle's opcodes to name its globals stops after this many bytes or opcodes (a
# checkpoint's pickle holds a few dozen opcodes per tensor; its data is stored apart), so that garbage
# costs a fraction of a second, not one opcode per byte.
_SCAN_BYTES = 8 << 20
_SCAN_OPS = 200_000


def _check_container(path: str, shown: str, trusted: bool) -> None:
    """Refuse, before unpickling anything, a file that is neither of torch.save's formats, and a zip whose
    entries unpack to more than the file's size (torch.save stores them uncompressed: a compressed entry
    of zeros could make a 100 KB file unpack to gigabytes)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                unpacked = sum(info.file_size for info in z.infolist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # torch.load says what is wrong
            return
        size = os.path.getsize(path)
        if unpacked > size:
            raise CheckpointError(f"cannot use checkpoint {shown}: its zip entries unpack to {unpacked} bytes, "
                                  f"more than the file's {size} (compressed entries, which torch.save never "
                                  f"writes), so it was not loaded")
    elif not _is_legacy_header(head):
        unsafe = [] if trusted else _unsafe_globals(path)
        if unsafe:  # a bare pickle (pickle.dump) that names code
            raise _unsafe(shown, unsafe)
        raise CheckpointError(f"cannot read checkpoint {shown}: it is truncated or not a PyTorch checkpoint "
                              f"(neither a zip archive nor the legacy format that torch.save writes)")


def _is_legacy_header(head: bytes) -> bool:
    """Whether ``head`` starts with the legacy format's first pickle: the magic number alone."""
    values = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name == "STOP":
                return values == [_LEGACY_MAGIC]
            if op.name not in ("PROTO", "FRAME"):
                values.append(arg)
    except Exception:  # not a pickle, or not one that ends within ``head``
        pass
    return False


def _unsafe_globals(path: str) -> List[str]:
    """The names of the globals in ``path``'s pickles that the weights-only unpickler does not allow
    (empty when it failed for another reason), read from their opcodes without unpickling anything:
    ``data.pkl`` of a zip checkpoint, or the pickles at the start of any other file."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not pkl:
                    return []
                with z.open(pkl[0]) as f:
                    data = f.read(_SCAN_BYTES)
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_BYTES)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return []
    safe = _safe_global_names()
    return sorted({n for n in _pickle_globals(data) if n not in ALLOWED_GLOBALS and n not in safe})


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def _safe_global_names() -> set:
    """The globals that the weights-only unpickler allows (torch's own and those added by the user)."""
    try:
        from torch import _weights_only_unpickler as w
        return set(w._get_allowed_globals()) | set(w._get_user_allowed_globals())
    except Exception:  # a torch without these: every global found is named
        return set()


def _pickle_globals(data: bytes, pickles: int = 5) -> List[str]:
    """Every ``module.name`` that the first ``pickles`` pickles in ``data`` import (the legacy format
    writes five one after another), by reading at most ``_SCAN_OPS`` opcodes; never unpickled.

    ``GLOBAL`` names its global; ``STACK_GLOBAL`` takes the two strings pushed last, which are followed
    through the memo (``BINPUT`` ... ``BINGET``) as pickle itself writes repeated strings."""
    names, strings, memo, last, ops = [], [], {}, None, 0
    f = io.BytesIO(data)
    try:
        for _ in range(pickles):
            for op, arg, _ in pickletools.genops(f):
                ops += 1
                if ops > _SCAN_OPS:
                    return names
                if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # the top stays where it is
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = last
                    continue
                last = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else arg
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global of unknown name")
                elif isinstance(last, str):
                    strings.append(last)
            if not f.read(1):
                break
            f.seek(-1, io.SEEK_CUR)
    except Exception:  # garbage: the first opcode that is not one ends the scan
        pass
    return names


def _unwrap(obj: Mapping) -> Mapping:
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def extract_backbone_state_dict(obj: Mapping, shown: Optional[str] = None) -> Dict[str, Tensor]:
    """The backbone's weights (plain keys) from any accepted checkpoint form; ``shown``: the file's name
    for the error raised when it holds no state dict."""
    sd = _unwrap(obj)
    if not sd or not all(isinstance(k, str) for k in sd):
        raise _no_state_dict(shown)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not sd:
        raise _no_state_dict(shown)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _no_state_dict(shown: Optional[str]) -> CheckpointError:
    return CheckpointError(f"{'the checkpoint' if shown is None else 'checkpoint ' + shown} holds no state dict "
                           f"(no tensors by name, at the top or under 'model' or 'state_dict')")


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
    sd = extract_backbone_state_dict(read_checkpoint(source, map_location, progress, trusted=trusted),
                                     _describe(source))
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
    sd = extract_backbone_state_dict(obj, _describe(source))
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


def pretraining_state_dict(obj: Mapping, shown: Optional[str] = None) -> Dict[str, Tensor]:
    """The pretraining model's tensors from a checkpoint, ``module.`` stripped (other entries such
    as ``epoch`` and ``optimizer`` are ignored); ``shown`` as in ``extract_backbone_state_dict``."""
    sd = _unwrap(obj)
    if not sd or not all(isinstance(k, str) for k in sd):
        raise _no_state_dict(shown)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not sd:
        raise _no_state_dict(shown)
    return sd


def _expander_spec(sd: Mapping[str, Tensor], prefix: str) -> Optional[str]:
    """'8192-8192-8192' from the Linear weights ``<prefix>.<index>.weight`` (2-D), None if absent; a key
    whose index is not a number, or a Linear of width 0, raises CheckpointError naming it."""
    linears = []
    for k, v in sd.items():
        if k.startswith(prefix + ".") and k.count(".") == 2 and k.endswith(".weight") and v.ndim == 2:
            index = k.split(".")[1]
            if not (index.isascii() and index.isdigit()):
                raise CheckpointError(f"key {k} is not an expander layer ({prefix}.<layer number>.weight)")
            if v.shape[0] == 0:
                raise CheckpointError(f"key {k} has shape {tuple(v.shape)}: a layer of width 0")
            linears.append((int(index), v.shape[0]))
    return "-".join(str(width) for _, width in sorted(linears)) or None


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
        raise CheckpointError("the weights hold no expander (projector / maps_projector): it is not a "
                              "full pretraining checkpoint; load it as a backbone instead")
    if alpha is None:
        alpha = 1.0 if maps_mlp is None else 0.0 if mlp is None else VICRegLConfig.alpha
    elif (alpha > 0) != (mlp is not None) or (alpha < 1) != (maps_mlp is not None):
        raise CheckpointError(f"alpha={alpha} needs {'a' if alpha > 0 else 'no'} global expander (projector) "
                              f"and {'a' if alpha < 1 else 'no'} local expander (maps_projector); the file has "
                              f"projector: {mlp is not None}, maps_projector: {maps_mlp is not None}")
    classifier = sd.get("classifier.weight")
    if classifier is not None and classifier.ndim != 2:
        raise CheckpointError(f"key classifier.weight has shape {tuple(classifier.shape)}, where (classes, "
                              f"features) was expected")
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
    shown = _describe(source)
    sd = pretraining_state_dict(read_checkpoint(source, map_location, progress, trusted=trusted), shown)
    try:
        cfg = pretraining_config_from_state_dict(sd, arch, alpha, backbone_kwargs)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {shown}: {e}") from None
    # The widths come from the file: check every shape on the meta device (nothing allocated) first,
    # so that a file declaring huge expanders is refused before the model is built.
    with torch.device("meta"):
        own = VICRegL(cfg).state_dict()
    lines = misfit(own, sd)
    if lines:
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        lines += _guess_hint(backbone_sd, arch, bool(backbone_kwargs.get("small_input")))
        raise CheckpointError("\n".join([f"checkpoint {shown} does not fit the {arch} pretraining model:"]
                                        + lines))
    _check_held({k: sd[k] for k in own}, shown)
    model = VICRegL(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def _check_held(sd: Mapping[str, Tensor], shown: str) -> None:
    """Refuse tensors that need more bytes in all than their storages hold (expanded tensors, or many
    keys viewing one storage): a model built to their shapes must not outgrow what the file holds."""
    storages = {}
    for k, t in sd.items():
        _check_tensor(t, ((), k), shown)
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    need, held = sum(t.numel() * t.element_size() for t in sd.values()), sum(storages.values())
    if need > held:
        raise CheckpointError(f"cannot use checkpoint {shown}: its tensors need {need} bytes in all but share "
                              f"storages that hold {held}, so it was not loaded")
