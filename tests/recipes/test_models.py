"""Models of the recipes: the compact ResNet, torchvision by name, stem replacement, BN gamma init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spngd_ds.recipes.models import SmallResNet, build_model, init_bn_gamma, replace_stem_conv

pytestmark = pytest.mark.timeout(60)


def test_small_resnet_forward_shape() -> None:
    model = build_model("small_resnet", num_classes=10, in_channels=1, bn_gamma_init_std=None)
    assert isinstance(model, SmallResNet)
    out = model(torch.randn(4, 1, 32, 32))
    assert out.shape == (4, 10) and out.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 100_000
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU} <= kinds
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_small_resnet_backward_reaches_every_parameter() -> None:
    model = build_model("small_resnet", num_classes=5, in_channels=3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet50_one_channel_at_32px() -> None:
    model = build_model("resnet50", num_classes=10, in_channels=1)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_torchvision_three_channels_keeps_stem() -> None:
    model = build_model("resnet18", num_classes=7, in_channels=3)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc, nn.Linear)
    assert model.conv1.in_channels == 3 and model.fc.out_features == 7


def test_replace_stem_conv_on_a_nested_model() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True)), nn.Conv2d(8, 8, 1))
    replace_stem_conv(model, 2)
    first = model.get_submodule("0.0")
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2 and first.bias is not None
    second = model.get_submodule("1")
    assert isinstance(second, nn.Conv2d) and second.in_channels == 8
    assert model(torch.randn(1, 2, 5, 5)).shape == (1, 8, 5, 5)


def test_bn_gamma_init_std() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=10, in_channels=3, bn_gamma_init_std=0.05)
    gammas = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert gammas.numel() > 20_000
    assert abs(float(gammas.mean()) - 1.0) < 0.005
    assert abs(float(gammas.std()) - 0.05) < 0.005
    betas = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert torch.count_nonzero(betas) == 0
    default = build_model("small_resnet", num_classes=10, in_channels=1, bn_gamma_init_std=None)
    assert all(torch.all(m.weight == 1) for m in default.modules() if isinstance(m, nn.BatchNorm2d))


def test_init_bn_gamma_counts_and_rejects_negative() -> None:
    model = SmallResNet(num_classes=10, in_channels=1)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert init_bn_gamma(model, 0.0) == n_bn
    with pytest.raises(ValueError, match="non-negative"):
        init_bn_gamma(model, -1.0)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*small_resnet.*resnet50"):
        build_model("resnet51", num_classes=10, in_channels=3, bn_gamma_init_std=None)
