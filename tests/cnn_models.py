"""Small CNNs written the way torchvision and timm write theirs (same module structure and forward code, fewer and
narrower layers), for the conv-BN block tests and benchmarks; the real packages are optional extras."""

from __future__ import annotations

import torch
from torch import nn

from fusedbn import BatchNormAct2d


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck: 1×1, 3×3, 1×1 conv-BN, residual add, one ReLU module called thrice."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet: stem conv 7×7/2-BN-ReLU, max pool, four stages, average pool, linear."""

    def __init__(self, block, layers, width=64, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_like(width=64, layers=(3, 4, 6, 3), num_classes=10):
    return ResNet(Bottleneck, layers, width, num_classes)


def resnet18_like(width=64, layers=(2, 2, 2, 2), num_classes=10):
    return ResNet(BasicBlock, layers, width, num_classes)


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation with BatchNorm2d and an activation module."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU6):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual: expand 1×1, depthwise 3×3 (ReLU6), project 1×1, x + conv(x)."""

    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers = [Conv2dNormActivation(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_like(num_classes=10, width=16):
    settings = [(1, width, 1, 1), (6, width + 8, 2, 2), (6, 2 * width, 2, 2)]
    features = [Conv2dNormActivation(3, width, stride=2)]
    cin = width
    for t, c, n, s in settings:
        for i in range(n):
            features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    features.append(Conv2dNormActivation(cin, 4 * cin, 1))
    return nn.Sequential(*features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * cin, num_classes))


class SqueezeExcite(nn.Module):
    """timm.layers.SqueezeExcite (conv_reduce, act, conv_expand, gate)."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(channels, reduced, 1, bias=True), nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * x_se.sigmoid()


class TimmInvertedResidual(nn.Module):
    """timm's efficientnet_blocks.InvertedResidual: conv_pw, bn1 (BatchNormAct2d), conv_dw, bn2, se, conv_pwl, bn3,
    then x + shortcut."""

    def __init__(self, cin, cout, stride, expand, act_layer):
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), BatchNormAct2d(mid, act_layer=act_layer)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act_layer=act_layer)
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), BatchNormAct2d(cout, apply_act=False)

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(x)))
        if self.has_skip:
            x = x + shortcut
        return x


def efficientnet_like(num_classes=10, act_layer=nn.SiLU, width=16):
    """timm-style EfficientNet / MobileNetV3 (act_layer=nn.Hardswish) stem, blocks and head."""
    blocks = [TimmInvertedResidual(width, width, 1, 1, act_layer), TimmInvertedResidual(width, 24, 2, 6, act_layer),
              TimmInvertedResidual(24, 24, 1, 6, act_layer)]
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), BatchNormAct2d(width, act_layer=act_layer),
                         *blocks, nn.Conv2d(24, 64, 1, bias=False), BatchNormAct2d(64, act_layer=act_layer),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


MODELS = {"resnet50_like": lambda: resnet50_like(width=8, layers=(1, 2, 1, 1)),
          "resnet18_like": lambda: resnet18_like(width=8, layers=(1, 1, 1, 1)),
          "mobilenet_v2_like": mobilenet_v2_like,
          "efficientnet_like": efficientnet_like,
          "mobilenet_v3_like": lambda: efficientnet_like(act_layer=nn.Hardswish)}
