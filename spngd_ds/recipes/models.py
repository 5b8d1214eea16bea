"""Models for the recipes: a compact ResNet for small images, torchvision models by name.

Nothing here downloads weights: torchvision models are built with ``weights=None``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallResNet", "build_model", "init_bn_gamma", "replace_stem_conv", "torchvision_model_names"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut.

    ``(N, c_in, H, W) -> (N, c_out, H / stride, W / stride)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A compact ResNet for small images (CIFAR-style): 3x3 stem, three stages, avgpool, Linear.

    Stages have widths ``widths`` (default 16/32/64) and ``blocks_per_stage`` basic blocks each;
    stages 2 and 3 halve the resolution. ``(N, in_channels, H, W) -> (N, num_classes)`` logits for
    any ``H, W >= 4``; about 78k parameters with the defaults.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        """A CIFAR-style ResNet: three stages of ``widths`` channels, ``blocks_per_stage`` blocks each."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images ``x`` (N, in_channels, H, W)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_model_names() -> list[str]:
    """Names of torchvision's classification models (``resnet50``, ``resnet18``, ...), sorted."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def replace_stem_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the model's first ``Conv2d`` by a fresh one reading ``in_channels`` channels.

    Kernel, stride, padding, dilation, bias and output channels are kept (groups too when they
    divide ``in_channels``, else 1); the new weight gets PyTorch's default initialisation. Returns
    ``model`` (changed in place).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=module.groups if in_channels % module.groups == 0 else 1,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} input channels")


def init_bn_gamma(model: nn.Module, std: float, generator: torch.Generator | None = None) -> int:
    """Draw every BatchNorm scale from N(1, std^2) (the SP-NGD recipe uses std 0.05).

    Affects ``BatchNorm1d/2d/3d`` (and SyncBatchNorm) with ``affine=True``; biases are untouched.
    Returns the number of layers changed.
    """
    if std < 0:
        raise ValueError(f"bn_gamma_init_std must be non-negative, got {std}")
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                module.weight.normal_(1.0, std, generator=generator)
                count += 1
    return count


def build_model(name: str, num_classes: int, in_channels: int = 3, bn_gamma_init_std: float | None = None) -> nn.Module:
    """Build a model by name, randomly initialised.

    Args:
        name: ``"small_resnet"`` (:class:`SmallResNet`) or any torchvision classification model name
            (``"resnet50"``, ``"resnet18"``, ...), built with ``weights=None``.
        num_classes: size of the output layer.
        in_channels: input channels; torchvision models get a new stem conv when this is not 3.
        bn_gamma_init_std: when set, BatchNorm scales are drawn from N(1, std^2)
            (:func:`init_bn_gamma`); ``None`` keeps the default (all ones).

    Returns:
        A module mapping ``(N, in_channels, H, W)`` float images to ``(N, num_classes)`` logits.

    Raises:
        ValueError: unknown name (the message lists some valid ones).
    """
    model: nn.Module
    if name == "small_resnet":
        model = SmallResNet(num_classes=num_classes, in_channels=in_channels)
    else:
        import torchvision

        names = torchvision_model_names()
        if name not in names:
            examples = ["small_resnet", "resnet18", "resnet50", "resnet101", "wide_resnet50_2"]
            raise ValueError(
                f"unknown model {name!r}; use 'small_resnet' or a torchvision classification model, "
                f"e.g. {', '.join(examples)} ({len(names)} torchvision names in all)"
            )
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            replace_stem_conv(model, in_channels)
    if bn_gamma_init_std is not None:
        init_bn_gamma(model, bn_gamma_init_std)
    return model
