"""ResNet backbones returning the last feature map and its average pool.

The layout and parameter names follow torchvision's ResNet (without ``fc``), so the published
VICRegL checkpoints load with ``strict=True``. One geometric quirk is kept on purpose: the reference
zero-pads the input by one pixel and then runs the 7x7 stride-2 stem with padding 2. That is the same
geometry as torchvision's padding 3, but it is what the published weights were trained with, so we
reproduce it literally.
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck",
    "resnet18", "resnet34", "resnet50", "resnet101",
    "resnet50x2", "resnet50x4", "resnet50x5", "resnet200x2", "resnet_mini", "resnet_test",
]


def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, groups=groups,
                     dilation=dilation, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, grouped, dilated) -> 1x1 with a residual connection (ResNet-50 and up)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk. ``forward(x)`` returns ``(maps, pooled)``.

    Args:
        block, layers: block type and number of blocks per stage.
        widen: multiplies every width (resnet50x2 has widen=2 and 4096 output channels).
        width_per_group, groups: ResNeXt-style grouping (64 and 1 for plain ResNets).
        replace_stride_with_dilation: for layer2..layer4; ``[False, True, True]`` gives output stride 8.
        zero_init_residual: start the last BN of every residual branch at 0 (pretraining uses True).
        base_channels: stem width before widening (64; the tiny test net uses 8).
        small_input: **NEW** a 3x3 stride-1 first convolution and no max-pool, for 32-pixel images
            (a 32x32 input then gives a 4x4 map). Changes ``conv1``'s shape: not for published weights.

    Shapes: x (B, 3, H, W) -> maps (B, h*w, C) in row-major (h, w) order, pooled (B, C),
    with C = ``num_features``.
    """

    def __init__(self, block: Block, layers: Sequence[int], widen: int = 1, width_per_group: int = 64,
                 groups: int = 1, replace_stride_with_dilation: Optional[Sequence[bool]] = None,
                 zero_init_residual: bool = False, small_input: bool = False, base_channels: int = 64):
        super().__init__()
        dilate = list(replace_stride_with_dilation or [False, False, False])
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 booleans, got {dilate}")
        self.small_input = small_input
        self.dilate = dilate
        self.groups, self.base_width = groups, width_per_group
        self.c_in = base_channels * widen
        self.dilation = 1
        if small_input:
            self.padding = nn.Identity()
            self.conv1 = nn.Conv2d(3, self.c_in, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            # Pad 1 then conv padding 2: the reference's stem (same geometry as padding 3).
            self.padding = nn.ConstantPad2d(1, 0.0)
            self.conv1 = nn.Conv2d(3, self.c_in, 7, stride=2, padding=2, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.c_in)
        self.relu = nn.ReLU(inplace=True)
        widths = [base_channels * widen * 2 ** k for k in range(4)]
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[3] * block.expansion
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.c_in != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.c_in, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.c_in, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation)]
        self.c_in = planes * block.expansion
        layers += [block(self.c_in, planes, groups=self.groups, base_width=self.base_width,
                         dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def map_size(self, size: int) -> int:
        """Side of the last feature map for a square input of side ``size``."""
        return resnet_map_size(size, self.small_input, self.dilate)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        """The four stage outputs, each (B, C_k, H_k, W_k) (used by segmentation)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.forward_stages(x)[-1]  # (B, C, h, w)
        pooled = self.avgpool(x).flatten(1)  # (B, C)
        maps = x.flatten(2).transpose(1, 2)  # (B, h*w, C), position = row * w + col
        return maps, pooled


def resnet_map_size(size: int, small_input: bool = False,
                    dilate: Optional[Sequence[bool]] = None) -> int:
    """Output side of a ResNet for an input side: every stride-2 step maps s to ceil(s / 2)."""
    dilate = list(dilate or [False, False, False])
    halvings = (0 if small_input else 2) + sum(not d for d in dilate)
    for _ in range(halvings):
        size = (size + 1) // 2
    return size


def _resnet(block: Block, layers: Sequence[int], **kwargs) -> Tuple[ResNet, int]:
    model = ResNet(block, layers, **kwargs)
    return model, model.num_features


def resnet18(**kwargs) -> Tuple[ResNet, int]:
    """**NEW** ResNet-18 (basic blocks [2, 2, 2, 2], 512 channels) for small runs."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet50x2(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 4, 6, 3], widen=2, **kwargs)


def resnet50x4(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 4, 6, 3], widen=4, **kwargs)


def resnet50x5(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 4, 6, 3], widen=5, **kwargs)


def resnet200x2(**kwargs) -> Tuple[ResNet, int]:
    return _resnet(Bottleneck, [3, 24, 36, 3], widen=2, **kwargs)


def resnet_mini(**kwargs) -> Tuple[ResNet, int]:
    """**NEW** ResNet-18 at a quarter of the width (widths 16-32-64-128, 0.7M parameters): small
    enough to pretrain on a laptop CPU in minutes, large enough to learn (the CPU demo's net)."""
    kwargs.setdefault("base_channels", 16)
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet_test(**kwargs) -> Tuple[ResNet, int]:
    """Tiny ResNet for tests and CPU demos: basic blocks [1, 1, 1, 1], widths 8-16-32-64."""
    kwargs.setdefault("base_channels", 8)
    return _resnet(BasicBlock, [1, 1, 1, 1], **kwargs)
