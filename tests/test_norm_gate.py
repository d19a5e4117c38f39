"""A Gather-Excite bottleneck's tail in training as one function over C++
row kernels (mmctx.models.norm_gate): bn3 (batch statistics, running
statistics updated), the global gate (GE-θ⁻'s mean; GE-θ / GE-θ⁺'s kernel,
norm and excite), the residual add and the ReLU give what the plain ops
give, in the function, in GE-ResNet blocks and whole backbones; everything
else keeps the plain ops."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tail_checks import (assert_as_close_as_plain,
                         assert_fused_backbone_matches_plain,
                         assert_plain_where_fused_tail_does_not_apply,
                         backbone_step, count_calls, gated_backbone,
                         random_norm, tail_results)

from mmctx.models import GatherExcite, norm_gate

VARIANTS = ('parameter_free', 'depthwise', 'depthwise_excite')


def plain_tail(z, identity, norm, gate):
    return F.relu(gate.forward_residual(norm(z), identity))


def random_gate(channels, variant, size, dtype):
    gate = GatherExcite(channels, variant=variant, feature_size=size,
                        reduction=2).to(dtype)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.3)
    return gate


@pytest.mark.parametrize('size', [(7, 9), (16, 24), (4, 4), (3, 4)])
def test_resample_adjoint_is_the_adjoint_of_the_resampling(size):
    """<x, resample_adjoint(k)> = <resample_to(x), k> for every map x, and
    its gradient is the resampling (``gradcheck``; off the grid's size the
    C++ pooling, ``adaptive_avg_pool``, equal to ``F.adaptive_avg_pool2d``
    in float32 too; second derivatives through the banded GEMMs)."""
    from torch.autograd import gradcheck, gradgradcheck

    from mmctx.models.norm_gate import resample_adjoint
    from mmctx.models.utils import resample_to
    torch.manual_seed(0)
    kernel = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(
        (x * resample_adjoint(kernel, size)).sum((2, 3)),
        (resample_to(x, (4, 4)) * kernel).sum((2, 3)))
    assert gradcheck(lambda k: resample_adjoint(k, size), (kernel, ))
    assert gradgradcheck(lambda k: resample_adjoint(k, size), (kernel, ))
    for dtype in (torch.float32, torch.float64):
        k = kernel.detach().to(dtype).requires_grad_()
        grad = torch.randn(3, *size, dtype=dtype)
        resample_adjoint(k, size).backward(grad)
        torch.testing.assert_close(
            k.grad, F.adaptive_avg_pool2d(grad[None], (4, 4))[0])
    ops = norm_gate.kernels()
    with pytest.raises(RuntimeError, match='x must be a contiguous'):
        ops.adaptive_avg_pool(torch.randn(2, 5, 5).transpose(1, 2), 2, 2)


def test_kernels_build_on_this_machine():
    """The package's own requirements (a C++ compiler as on any Linux
    PyTorch machine; ninja, in setup.py) build the kernels."""
    assert norm_gate.kernels() is not None


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('shape', [
    (2, 4, 5, 7),
    (2, 4, 40, 33),  # rows longer than one summation chunk (1024)
    (3, 4, 1, 1),  # one pixel per map
])
@pytest.mark.parametrize('norm_kwargs', [
    dict(),
    dict(momentum=None),  # cumulative moving average
    dict(track_running_stats=False),  # batch statistics, nothing kept
])
def test_fused_tail_matches_the_plain_ops(dtype, variant, shape,
                                          norm_kwargs):
    """Output; gradients of the map, the identity, bn3's weight and bias
    and the gate's parameters; running statistics (bn3's, the gather
    norm's) and batch counts after two steps. In float32 the fused path is
    held to the plain ops in float64, as close as the plain ops are."""
    torch.manual_seed(0)
    norm = random_norm(shape[1], dtype, **norm_kwargs)
    gate = random_gate(shape[1], variant, shape[2:], dtype)
    plain = copy.deepcopy((norm, gate))
    reference = copy.deepcopy((norm, gate))
    for module in reference:
        module.double()
    # off-centre map: the variance comes from sums of squares
    z = torch.randn(shape, dtype=dtype) * 3 + 2
    identity = torch.randn(shape, dtype=dtype)
    assert norm_gate.applies(norm, z, identity, gate)
    for _ in range(2):
        fused_results = tail_results(norm_gate.norm_gate_add_relu, z,
                                     identity, norm, gate)
        plain_results = tail_results(plain_tail, z, identity, *plain)
        reference_results = tail_results(plain_tail, z.double(),
                                         identity.double(), *reference)
    # some gradients are ill-conditioned: the gather norm's over a batch
    # of two
    assert_as_close_as_plain(fused_results, plain_results,
                             reference_results)


@pytest.mark.parametrize('variant', VARIANTS)
def test_fused_tail_supports_double_backward(variant):
    """Second derivatives through the fused tail are autograd's
    (``gradgradcheck``, float64): its backward rebuilds the plain ops when
    the graph of the gradient is recorded, and leaves the gather norm's
    running statistics as the forward left them."""
    from torch.autograd import gradgradcheck
    torch.manual_seed(0)
    norm = random_norm(3, torch.float64, track_running_stats=False)
    gate = random_gate(3, variant, (4, 5), torch.float64)
    kernel, _ = norm_gate._kernel(gate, (4, 5))
    kernels = [] if kernel is None else [kernel.detach().clone()]
    head = [p for name, p in gate.named_parameters()
            if not name.startswith('gather.')]

    def tail(z, identity, weight, bias, *rest):
        kernel, head_params = (None, rest) if not kernels else (
            rest[0], rest[1:])
        return norm_gate._NormGateAddReLU.apply(
            z, identity, weight, bias, kernel,
            None if kernel is None else kernel.detach().sum(
                (1, 2), dtype=torch.float64), None, None, 0., norm.eps,
            gate, norm_gate.kernels(), *head_params)

    inputs = [torch.randn(2, 3, 4, 5, dtype=torch.float64)
              for _ in range(2)] + [norm.weight, norm.bias] + kernels
    # the head computes with the module's own parameters
    inputs = [t.detach().clone().requires_grad_() for t in inputs] + head
    out = tail(*inputs)
    stats = [b.clone() for b in gate.buffers()]
    torch.autograd.grad(out.sum(), inputs, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(stats, gate.buffers()))
    assert gradgradcheck(tail, inputs)


def ge_backbone(variant='parameter_free', **kwargs):
    return gated_backbone('gather_excite', 0.02, type='GEResNet',
                          ge=dict(variant=variant), **kwargs)


def count_fused_calls(monkeypatch):
    return count_calls(monkeypatch, norm_gate, 'norm_gate_add_relu')


@pytest.mark.parametrize('variant, kwargs', [
    ('parameter_free', dict()),
    ('parameter_free', dict(with_cp=True)),
    ('depthwise', dict()),
    ('depthwise_excite', dict()),
])
def test_ge_resnet_training_takes_the_fused_tail(variant, kwargs,
                                                  monkeypatch):
    """A GE-ResNet training with BN updating runs its blocks' tails fused,
    and gives the plain blocks' outputs, gradients (input, every parameter)
    and BN statistics, at the reference size and another one (GE-θ / θ⁺:
    their kernels' resampling adjoint)."""
    net = ge_backbone(variant, **kwargs).train()
    assert_fused_backbone_matches_plain(net, norm_gate, 'norm_gate_add_relu',
                                        bool(kwargs), monkeypatch)


def test_fused_tail_is_left_where_it_does_not_apply(monkeypatch):
    """Eval-mode BN (``norm_eval``, inference), autocast, traced graphs,
    hooks on bn3, ReLU or the gate, another norm type, a channels-last map,
    another plugin after the gate or a windowed gate: the plain ops."""
    calls = count_fused_calls(monkeypatch)
    run = assert_plain_where_fused_tail_does_not_apply(
        ge_backbone, 'gather_excite', calls)
    net = ge_backbone('depthwise').train()
    net.layer1[0].gather_excite.extent = 2  # a windowed gate
    net.layer1[0].gather_excite.gather = nn.ModuleList(
        [nn.Conv2d(256, 256, 3, 2, 1, groups=256)]).double()
    assert run(net) == 3

    norm = random_norm(3, torch.float32)
    gate = random_gate(3, 'depthwise', (4, 4), torch.float32)
    z, identity = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert norm_gate.applies(norm, z, identity, gate)
    assert not norm_gate.applies(norm.eval(), z, identity, gate)
    sync = nn.SyncBatchNorm(3).train()
    assert not norm_gate.applies(sync, z, identity, gate)
    assert not norm_gate.applies(
        norm.train(), z.to(memory_format=torch.channels_last), identity, gate)
    assert not norm_gate.applies(norm, z[:1, :, :1, :1],
                                 identity[:1, :, :1, :1], gate)  # 1 value
    assert not norm_gate.applies(norm, z.double(), identity.double(), gate)


def test_without_kernels_the_plain_ops_run_with_one_warning(monkeypatch):
    """Where the kernels cannot be built (no compiler, no ninja), or with
    ``MMCTX_CPU_KERNELS=0``, GE trains on the plain ops: one warning naming
    the source file, the same results."""
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError('Ninja is required to load C++ extensions')

    monkeypatch.setattr(norm_gate, '_kernels', [])
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fail)
    with pytest.warns(UserWarning, match='norm_gate.cpp.*Ninja'):
        assert norm_gate.kernels() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert norm_gate.kernels() is None  # tried once
        net = ge_backbone().train()
        state = copy.deepcopy(net.state_dict())
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        without = backbone_step(net, x)
    assert not [w for w in caught if 'norm_gate' in str(w.message)]
    monkeypatch.undo()
    net.load_state_dict(state)
    for a, b in zip(without, backbone_step(net, x)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)

    monkeypatch.setattr(norm_gate, '_kernels', [])
    monkeypatch.setenv('MMCTX_CPU_KERNELS', '0')
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fail)
    assert norm_gate.kernels() is None
