"""torch.compile: every mmctx backbone compiles as one graph
(``fullgraph=True``) with dynamic H and W, in training and inference, and
equals eager.

Inference compiles with inductor (the default backend) for every backbone.
Training compiles with inductor for SB-ResNet and, for every backbone, with
``aot_eager``: the same capture (dynamo, one graph, dynamic sizes) and the
same forward + backward graphs from AOTAutograd, without inductor's code
generation, which costs about two minutes per backbone on a 2-core CPU."""
import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401

SMALL = dict(depth=14, base_channels=8)
# The reference size, not square: a square first input would make dynamo
# assume H == W ("duck sizing") and compile again for the next one.
# Sizes at which no map of these small networks is a single pixel (a side
# that may be 1 becomes a guard: another compilation at other sizes).
REF = (128, 144)
BACKBONES = {
    'R': dict(type='ContextResNet', **SMALL),
    'SB': dict(type='SBResNet', **SMALL, sb=dict(num_bias=3, pool_size=4)),
    'GE-θ⁻ (global, e=4)': dict(
        type='GEResNet', **SMALL, reference_input_size=REF,
        plugins=[dict(cfg=dict(type='GatherExcite', extent=4, postfix='_e4'),
                      stages=(True, True, True, False),
                      position='after_conv3')]),
    'GE-θ': dict(type='GEResNet', **SMALL, reference_input_size=REF,
                 ge=dict(variant='depthwise', extent='global')),
    'GE-θ⁺ (e=2)': dict(type='GEResNet', **SMALL, reference_input_size=REF,
                        ge=dict(variant='depthwise_excite', extent=2,
                                reduction=4)),
    'PSI': dict(type='PSIResNet', **SMALL, reference_input_size=REF,
                psi=dict(grid_size=4)),
    'CIFAR-SB': dict(type='CifarResNet', depth=11, base_channels=8,
                     stem_channels=8, sb=dict(num_bias=3, pool_size=4)),
}
# the reference size, then others: no recompilation for a new H x W
SIZES = [REF, (112, 160), (136, 104)]


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


def compile_once(model, backend):
    """``torch.compile`` that fails the test on a second compilation."""
    return torch.compile(model, fullgraph=True, dynamic=True,
                         backend=backend)


@pytest.mark.parametrize('name', list(BACKBONES))
def test_inference_compiles_fullgraph_dynamic_and_equals_eager(name):
    eager = build(name).eval()
    compiled = compile_once(build(name).eval(), 'inductor')
    with torch.no_grad(), torch._dynamo.config.patch(
            error_on_recompile=True):
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            for got, expected in zip(compiled(x), eager(x)):
                torch.testing.assert_close(got, expected, rtol=1e-5,
                                           atol=1e-5)


@pytest.mark.parametrize('name,backend', [
    *((name, 'aot_eager') for name in BACKBONES), ('SB', 'inductor')])
def test_training_compiles_fullgraph_dynamic_and_equals_eager(name, backend):
    """Outputs, every gradient and every BN running statistic after two
    training steps at two sizes. With inductor the second size compiles
    once more: inductor's backward of the plain ResNet-14 guards on a
    stage-3 width (a channels-last contiguity check) at these sizes, with
    or without context modules; the captured graph is dynamic
    (``aot_eager``)."""
    eager = build(name).train()
    model = build(name).train()
    compiled = compile_once(model, backend)
    with torch._dynamo.config.patch(
            error_on_recompile=backend == 'aot_eager'):
        for size in SIZES[:2]:
            x = torch.randn(2, 3, *size)
            expected, got = eager(x), compiled(x)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            loss_of(expected).backward()
            loss_of(got).backward()
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda s: f'{n}: {s}')
    for (n, b), c in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5,
                                   msg=lambda s: f'{n}: {s}')
