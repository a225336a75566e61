"""compile_frozen: inductor's freezing really on (weights become compile-time constants), or off on request."""

from __future__ import annotations

import torch
from torch import nn

from gemma3n.encoders.frozen_compile import compile_frozen


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 1)).eval().requires_grad_(False)


def test_frozen_weights_are_a_compile_time_snapshot():
    net = _conv_net()
    x = torch.randn(2, 4, 8, 8)
    run = compile_frozen(net.forward)
    with torch.no_grad():
        first = run(x)
        assert torch.allclose(first, net(x), rtol=1e-5, atol=1e-6)  # same math (packed weights, fused GELU)
        net[0].weight.mul_(2)  # frozen: the compiled graph holds its own copy of the weights
        assert torch.equal(run(x), first)


def test_without_freezing_the_weights_stay_inputs():
    net = _conv_net()
    x = torch.randn(2, 4, 8, 8)
    run = compile_frozen(net.forward, freezing=False)
    with torch.no_grad():
        first = run(x)
        net[0].weight.mul_(2)
        changed = run(x)
    assert not torch.allclose(changed, first)
    assert torch.allclose(changed, net(x), rtol=1e-5, atol=1e-6)
