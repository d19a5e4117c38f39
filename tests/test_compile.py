"""torch.compile: every mmctx backbone compiles as one graph
(``fullgraph=True``) with dynamic H and W, in training and inference, and
equals eager."""
import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401

SMALL = dict(depth=14, base_channels=8)
BACKBONES = {
    'R': dict(type='ContextResNet', **SMALL),
    'SB': dict(type='SBResNet', **SMALL, sb=dict(num_bias=3, pool_size=4)),
    'GE-θ⁻ (global, e=4)': dict(
        type='GEResNet', **SMALL, reference_input_size=64,
        plugins=[dict(cfg=dict(type='GatherExcite', extent=4, postfix='_e4'),
                      position='after_conv3')]),
    'GE-θ': dict(type='GEResNet', **SMALL, reference_input_size=64,
                 ge=dict(variant='depthwise', extent='global')),
    'GE-θ⁺ (e=2)': dict(type='GEResNet', **SMALL, reference_input_size=64,
                        ge=dict(variant='depthwise_excite', extent=2,
                                reduction=4)),
    'PSI': dict(type='PSIResNet', **SMALL, reference_input_size=64,
                psi=dict(grid_size=4)),
    'CIFAR-SB': dict(type='CifarResNet', depth=11, base_channels=8,
                     stem_channels=8, sb=dict(num_bias=3, pool_size=4)),
}
# the reference size, then others: no recompilation for a new H x W
SIZES = [(64, 64), (48, 80), (70, 52)]


def build(name):
    torch.manual_seed(0)
    model = MODELS.build(BACKBONES[name])
    model.init_weights()
    with torch.no_grad():  # non-trivial gates and norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def loss_of(outs):
    return sum(o.float().square().mean() for o in outs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('name', list(BACKBONES))
def test_compiles_fullgraph_dynamic_and_equals_eager(name):
    eager = build(name)
    compiled_model = build(name)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True)
    # inference
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            for got, expected in zip(compiled(x), eager(x)):
                torch.testing.assert_close(got, expected, rtol=1e-5,
                                           atol=1e-5)
    # training: outputs, gradients and BN running statistics
    eager.train()
    compiled_model.train()
    for size in SIZES[:2]:
        x = torch.randn(2, 3, *size)
        loss_of(eager(x)).backward()
        loss_of(compiled(x)).backward()
    for (n, p), q in zip(eager.named_parameters(),
                         compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda s: f'{n}: {s}')
    for (n, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5,
                                   msg=lambda s: f'{n}: {s}')
