import numpy as np
import pytest
import torch

from models.resnet import build_resnet


def randomised_batchnorm(model: torch.nn.Module, seed: int, zero_bias: bool) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics, as a trained network has; optionally bias-free."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = 0.5 + torch.rand(c, generator=g)
            module.running_var = 0.5 + torch.rand(c, generator=g)
            if zero_bias:
                module.bias.data.zero_()
                module.running_mean.zero_()
            else:
                module.bias.data = 0.1 * torch.randn(c, generator=g)
                module.running_mean = 0.1 * torch.randn(c, generator=g)
    if zero_bias:
        model.fc.bias.data.zero_()
    return model


def tiny_resnet(num_classes: int = 4, seed: int = 0, zero_bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomised_batchnorm(build_resnet("resnet18", num_classes), seed, zero_bias).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def small_model():
    return tiny_resnet()


@pytest.fixture(scope="session")
def small_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
