"""GE-θ⁻'s block tail in training as one function over C++ row kernels
(mmctx.models.norm_mean_gate): bn3 (batch statistics, running statistics
updated), the global-mean gate, the residual add and the ReLU give what the
plain ops give, in the function, in GE-ResNet blocks and whole backbones;
everything else keeps the plain ops."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

from mmctx.models import norm_mean_gate
from mmctx.models.gating import global_mean_gate
from mmctx.models.utils import size_generic


def plain_tail(z, identity, norm):
    return F.relu(global_mean_gate(norm(z), identity))


def random_norm(channels, dtype, **kwargs):
    norm = nn.BatchNorm2d(channels, **kwargs).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if norm.running_mean is not None:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    return norm


def tail_results(tail, z, identity, norm):
    z = z.detach().clone().requires_grad_()
    identity = identity.detach().clone().requires_grad_()
    norm.zero_grad()
    out = tail(z, identity, norm)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return [out.detach(), z.grad, identity.grad, norm.weight.grad,
            norm.bias.grad] + [b.clone() for b in norm.buffers()]


def test_kernels_build_on_this_machine():
    """The package's own requirements (a C++ compiler as on any Linux
    PyTorch machine; ninja, in setup.py) build the kernels."""
    assert norm_mean_gate.kernels() is not None


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', [
    (2, 3, 5, 7),
    (2, 3, 40, 33),  # rows longer than one summation chunk (1024)
    (3, 4, 1, 1),  # one pixel per map: the gate is a function of the pixel
])
@pytest.mark.parametrize('norm_kwargs', [
    dict(),
    dict(momentum=None),  # cumulative moving average
    dict(track_running_stats=False),  # batch statistics, nothing kept
])
def test_fused_tail_matches_the_plain_ops(dtype, shape, norm_kwargs):
    """Output; gradients of the map, the identity, bn3's weight and bias;
    the running statistics and the batch count after two steps. In float32
    both paths are held to the plain ops in float64 (the fused sums are in
    float64 per row, and closer to it)."""
    torch.manual_seed(0)
    norm = random_norm(shape[1], dtype, **norm_kwargs)
    plain_norm = copy.deepcopy(norm)
    reference_norm = copy.deepcopy(norm).double()
    # off-centre map: the variance comes from sums of squares
    z = torch.randn(shape, dtype=dtype) * 3 + 2
    identity = torch.randn(shape, dtype=dtype)
    assert norm_mean_gate.applies(norm, z, identity)
    for _ in range(2):
        fused = tail_results(norm_mean_gate.norm_mean_gate_add_relu, z,
                             identity, norm)
        plain = tail_results(plain_tail, z, identity, plain_norm)
        reference = tail_results(plain_tail, z.double(), identity.double(),
                                 reference_norm)
    assert len(fused) == len(plain) == len(reference)
    for a, b, r in zip(fused, plain, reference):
        if dtype is torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            continue
        scale = float(r.abs().max()) if r.is_floating_point() else 1
        for t in (a, b):
            torch.testing.assert_close(t.to(r.dtype), r, rtol=1e-5,
                                       atol=1e-6 * scale)


def test_fused_tail_supports_double_backward():
    """Second derivatives through the fused tail are autograd's
    (``gradgradcheck``, float64): its backward rebuilds the plain ops when
    the graph of the gradient is recorded."""
    from torch.autograd import gradgradcheck
    torch.manual_seed(0)
    norm = random_norm(3, torch.float64, track_running_stats=False)

    def tail(z, identity, weight, bias):
        return norm_mean_gate._NormMeanGateAddReLU.apply(
            z, identity, weight, bias, None, None, 0., norm.eps,
            norm_mean_gate.kernels())

    inputs = [torch.randn(2, 3, 4, 5, dtype=torch.float64,
                          requires_grad=True) for _ in range(2)]
    inputs += [p.detach().clone().requires_grad_() for p in
               (norm.weight, norm.bias)]
    assert gradgradcheck(tail, inputs)


def ge_backbone(**kwargs):
    torch.manual_seed(0)
    net = MODELS.build(dict(dict(type='GEResNet', depth=14,
                                 ge=dict(variant='parameter_free'),
                                 reference_input_size=32, norm_eval=False),
                            **kwargs))
    net.init_weights()
    with torch.no_grad():  # real weights: bn3 starts at zero
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.double()


def backbone_step(net, x):
    net.zero_grad()
    x = x.clone().requires_grad_()
    outs = net(x)
    sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum()
        for o in outs).backward()
    return [o.detach() for o in outs] + [x.grad] + [
        p.grad.clone() for p in net.parameters()] + [
        b.clone() for b in net.buffers()]


@pytest.mark.parametrize('kwargs', [dict(), dict(with_cp=True)])
def test_ge_resnet_training_takes_the_fused_tail(kwargs, monkeypatch):
    """A GE-θ⁻-ResNet training with BN updating runs every block's tail
    fused, and gives the plain blocks' outputs, gradients (input, every
    parameter) and BN statistics, at the reference size and another one."""
    net = ge_backbone(**kwargs).train()
    state = copy.deepcopy(net.state_dict())
    calls = []
    fused_tail = norm_mean_gate.norm_mean_gate_add_relu
    for size in (32, 40):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        results = []
        for fused in (True, False):
            net.load_state_dict(state)
            calls.clear()
            monkeypatch.setattr(
                norm_mean_gate, 'norm_mean_gate_add_relu',
                lambda *args: calls.append(1) or fused_tail(*args))
            monkeypatch.setattr(
                norm_mean_gate, 'applies',
                norm_mean_gate.applies if fused else lambda *args: False)
            results.append(backbone_step(net, x))
            monkeypatch.undo()
            # with_cp runs each block's forward again in the backward
            assert len(calls) == (4 * (1 + bool(kwargs)) if fused else 0)
        # float64; the fused variance is E[z²] - E[z]², which loses digits
        # of float64 maps (not of float32 ones, summed in float64)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_fused_tail_is_left_where_it_does_not_apply(monkeypatch):
    """Eval-mode BN (``norm_eval``, inference), autocast, traced graphs,
    hooks on bn3, ReLU or the gate, another norm type, a channels-last map
    or another plugin after the gate: the plain ops, with the same results
    as without the fused path."""
    calls = []
    fused_tail = norm_mean_gate.norm_mean_gate_add_relu
    monkeypatch.setattr(norm_mean_gate, 'norm_mean_gate_add_relu',
                        lambda *args: calls.append(1) or fused_tail(*args))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(net, x=x):
        calls.clear()
        backbone_step(net, x)
        return len(calls)

    assert run(ge_backbone().train()) == 4
    assert run(ge_backbone(norm_eval=True).train()) == 0
    net = ge_backbone().train()
    net.layer1[0].bn3.register_forward_hook(lambda *args: None)
    net.layer2[0].relu.register_forward_hook(lambda *args: None)
    net.layer3[0].gather_excite.register_forward_pre_hook(lambda *args: None)
    assert run(net) == 1
    assert run(ge_backbone().train(), torch.randn(
        2, 3, 64, 64, dtype=torch.float64).to(
            memory_format=torch.channels_last)) == 0  # channels-last maps
    with size_generic():
        assert run(ge_backbone().train()) == 0
    net = ge_backbone(plugins=[dict(
        cfg=dict(type='ContextBlock', ratio=1. / 4), position='after_conv3',
        stages=(True, False, False, False))]).train()
    assert run(net) == 3
    net = ge_backbone(norm_cfg=dict(type='GN', num_groups=4)).train()
    assert run(net) == 0
    net = ge_backbone().float().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert run(net, x.float()) == 0

    norm = random_norm(3, torch.float32)
    z, identity = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert norm_mean_gate.applies(norm, z, identity)
    assert not norm_mean_gate.applies(norm.eval(), z, identity)
    sync = nn.SyncBatchNorm(3).train()
    assert not norm_mean_gate.applies(sync, z, identity)
    assert not norm_mean_gate.applies(
        norm.train(), z.to(memory_format=torch.channels_last), identity)
    assert not norm_mean_gate.applies(norm, z[:1, :, :1, :1],
                                      identity[:1, :, :1, :1])  # 1 value
    assert not norm_mean_gate.applies(norm, z.bfloat16(), identity.bfloat16())


def test_without_kernels_the_plain_ops_run_with_one_warning(monkeypatch):
    """Where the kernels cannot be built (no compiler, no ninja), or with
    ``MMCTX_CPU_KERNELS=0``, GE-θ⁻ trains on the plain ops: one warning
    naming the source file, the same results."""
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError('Ninja is required to load C++ extensions')

    monkeypatch.setattr(norm_mean_gate, '_kernels', [])
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fail)
    with pytest.warns(UserWarning, match='norm_mean_gate.cpp.*Ninja'):
        assert norm_mean_gate.kernels() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert norm_mean_gate.kernels() is None  # tried once
        net = ge_backbone().train()
        state = copy.deepcopy(net.state_dict())
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        without = backbone_step(net, x)
    assert not [w for w in caught if 'norm_mean_gate' in str(w.message)]
    monkeypatch.undo()
    net.load_state_dict(state)
    for a, b in zip(without, backbone_step(net, x)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)

    monkeypatch.setattr(norm_mean_gate, '_kernels', [])
    monkeypatch.setenv('MMCTX_CPU_KERNELS', '0')
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fail)
    assert norm_mean_gate.kernels() is None
