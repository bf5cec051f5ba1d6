"""torch.hub entry points for the published VICRegL models.

    model = torch.hub.load("facebookresearch/vicregl:main", "convnext_small_alpha0p75")
    maps, pooled = model(images)  # (B, H*W, C), (B, C)

Each entry point ``<arch>_alpha<0p9|0p75>(pretrained=True, **kwargs)`` returns the backbone, its
weights downloaded once from https://dl.fbaipublicfiles.com/vicregl/ into torch.hub's cache and
loaded strictly. Options (keyword-only): ``weights=`` a local path or URL to load instead,
``full_checkpoint=True`` for the whole pretraining model with its expanders, ``timm_model=True`` for
the backbone as a timm model, ``trust_checkpoint=True`` to load a file that holds Python objects
(refused by default: unpickling such a file can run code). The entry points are generated from the ``_PUBLISHED`` table and share
one loader; checkpoint reading and conversion live in ``models/``.
"""
from models import build_backbone as _build_backbone
from models.checkpoints import (load_backbone_weights as _load_backbone_weights,
                                load_pretraining_model as _load_pretraining_model,
                                published_url as _published_url)

dependencies = ["torch"]  # timm only for timm_model=True, imported then

# (arch, alpha, pretraining data, ImageNet linear top-1 %, Pascal VOC linear frozen mIoU)
_PUBLISHED = [
    ("resnet50", 0.9, "ImageNet-1k", 71.2, 54.0),
    ("resnet50", 0.75, "ImageNet-1k", 70.4, 55.9),
    ("convnext_small", 0.9, "ImageNet-1k", 75.9, 66.7),
    ("convnext_small", 0.75, "ImageNet-1k", 74.6, 67.5),
    ("convnext_base", 0.9, "ImageNet-1k", 77.1, 69.3),
    ("convnext_base", 0.75, "ImageNet-1k", 76.3, 70.4),
    ("convnext_xlarge", 0.75, "ImageNet-22k", 79.4, 78.7),
]

_DOC = """VICRegL {arch} pretrained on {data} with alpha {alpha} (ImageNet linear top-1 {top1} %,
    Pascal VOC linear frozen mIoU {miou}).

    Returns the backbone (in training mode; call .eval() for features): forward(x) with x
    (B, 3, H, W) normalised with ImageNet statistics gives (maps (B, h*w, C), pooled (B, C)),
    h about H / 32 (7 for 224), C = model.num_features.

    Args:
        pretrained: load the published weights ({url}).
        weights: a local path or an http(s)/file URL to load instead (a backbone file or a full
            checkpoint); the weights must fit {arch} exactly.
        full_checkpoint: return the whole pretraining model, ``models.vicregl.VICRegL``, with
            .backbone, .projector (global expander), .maps_projector (local expander) and
            .classifier (online linear probe) loaded from ``..._fullckpt.pth`` (or ``weights``).
        timm_model: return the backbone as a timm model (needs timm); kwargs then go to timm.
            For ConvNeXt, timm's head.norm normalises after pooling where VICRegL normalises every
            position before pooling: timm's pooled output is not VICRegL's ``pooled``.
        progress: show the download progress bar.
        trust_checkpoint: also load files that hold Python objects besides tensors and plain data
            (such a pickle can run code when loaded: only for files you trust). Without it they
            raise models.checkpoints.UnsafeCheckpointError.
        **kwargs: backbone options (e.g. drop_path_rate, replace_stride_with_dilation); they must
            not change the parameter shapes, since the weights load strictly.

    A file that does not fit raises models.checkpoints.CheckpointError listing the missing,
    mismatched and unexpected keys.
    """


def _load(arch, alpha, pretrained=True, *, weights=None, full_checkpoint=False, timm_model=False,
          progress=True, trust_checkpoint=False, **kwargs):
    """The one loader behind every entry point."""
    if weights is not None and not pretrained:
        raise ValueError("weights= loads those weights: drop pretrained=False")
    if full_checkpoint and timm_model:
        raise ValueError("timm_model converts the backbone only; it cannot hold the expanders")
    source = weights if weights is not None else _published_url(arch, alpha, full_checkpoint)
    if full_checkpoint:
        if not pretrained:
            from models.vicregl import VICRegL, VICRegLConfig
            return VICRegL(VICRegLConfig(arch=arch, alpha=alpha, backbone_kwargs=kwargs))
        return _load_pretraining_model(source, arch, alpha, progress=progress, trusted=trust_checkpoint, **kwargs)
    backbone, _ = _build_backbone(arch, **({} if timm_model else kwargs))
    if pretrained:
        _load_backbone_weights(backbone, source, arch, progress=progress, trusted=trust_checkpoint)
    if timm_model:
        from models.timm_convert import to_timm
        return to_timm(backbone, arch, **kwargs)
    return backbone


def _entry_point(arch, alpha, data, top1, miou):
    def entry(pretrained=True, **kwargs):
        return _load(arch, alpha, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = f"{arch}_alpha{alpha:g}".replace(".", "p")
    entry.__module__ = __name__
    entry.__doc__ = _DOC.format(arch=arch, alpha=alpha, data=data, top1=top1, miou=miou,
                                url=_published_url(arch, alpha))
    return entry


# The seven module-level entry points: resnet50_alpha0p9 ... convnext_xlarge_alpha0p75.
_ENTRY_POINTS = [_entry_point(*row) for row in _PUBLISHED]
globals().update({entry.__name__: entry for entry in _ENTRY_POINTS})
__all__ = [entry.__name__ for entry in _ENTRY_POINTS]
