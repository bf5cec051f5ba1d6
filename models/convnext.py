"""ConvNeXt backbones returning the normalised last feature map and its mean.

Parameter names (``downsample_layers``, ``stages``, ``norm``) are those of the published VICRegL
checkpoints. Unlike the classification ConvNeXt, the final LayerNorm is applied to every position of
the last map (the local loss needs normalised per-position features) and ``pooled`` is the mean of the
normalised positions.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvNeXt", "LayerNorm2d", "DropPath",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
    "convnext_test",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d) [-> gamma] + residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # VICRegL uses layer_scale_init_value 0: no `gamma` parameter at all (checkpoint keys).
        self.gamma = (nn.Parameter(torch.full((dim,), layer_scale_init_value))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt trunk. ``forward(x)`` returns ``(maps, pooled)``.

    Shapes: x (B, 3, H, W) -> maps (B, h*w, C) normalised per position, pooled (B, C),
    C = ``dims[-1]`` = ``num_features``, h = H // 32 (floor at every downsampling).
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 0.0, in_chans: int = 3):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4),
                                                    LayerNorm2d(dims[0], eps=1e-6)))
        for k in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[k], eps=1e-6),
                                                        nn.Conv2d(dims[k], dims[k + 1], 2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for k, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*[
                Block(dims[k], rates[start + b], layer_scale_init_value) for b in range(depth)]))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.num_features = dims[-1]
        self.dims = list(dims)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def map_size(self, size: int) -> int:
        """Side of the last feature map for a square input of side ``size``."""
        return convnext_map_size(size)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        """The four stage outputs before the final norm, each (B, dims[k], H_k, W_k)."""
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.forward_stages(x)[-1]  # (B, C, h, w)
        maps = self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
        return maps, maps.mean(dim=1)


def convnext_map_size(size: int) -> int:
    """Output side of a ConvNeXt: stride-4 stem then three stride-2 steps, each flooring."""
    return size // 4 // 2 // 2 // 2


def _convnext(depths, dims, **kwargs) -> Tuple[ConvNeXt, int]:
    model = ConvNeXt(depths, dims, **kwargs)
    return model, model.num_features


def convnext_tiny(**kwargs) -> Tuple[ConvNeXt, int]:
    return _convnext([3, 3, 9, 3], [96, 192, 384, 768], **kwargs)


def convnext_small(**kwargs) -> Tuple[ConvNeXt, int]:
    return _convnext([3, 3, 27, 3], [96, 192, 384, 768], **kwargs)


def convnext_base(**kwargs) -> Tuple[ConvNeXt, int]:
    return _convnext([3, 3, 27, 3], [128, 256, 512, 1024], **kwargs)


def convnext_large(**kwargs) -> Tuple[ConvNeXt, int]:
    return _convnext([3, 3, 27, 3], [192, 384, 768, 1536], **kwargs)


def convnext_xlarge(**kwargs) -> Tuple[ConvNeXt, int]:
    return _convnext([3, 3, 27, 3], [256, 512, 1024, 2048], **kwargs)


def convnext_test(**kwargs) -> Tuple[ConvNeXt, int]:
    """Tiny ConvNeXt for tests and CPU demos: depths [1, 1, 1, 1], dims 8-16-32-64."""
    return _convnext([1, 1, 1, 1], [8, 16, 32, 64], **kwargs)
