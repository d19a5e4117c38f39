"""A Patch Spatial Interaction bottleneck's tail in training as one function
over C++ loops (mmctx.models.norm_pixel_gate): bn3 (batch statistics,
running statistics updated), PSI's per-pixel gate (squeeze, patches, MLP),
the residual add and the ReLU give what the plain ops give, in the
function, in PSI-ResNet blocks and whole backbones; everything else keeps
the plain ops."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tail_checks import (assert_as_close_as_plain,
                         assert_fused_backbone_matches_plain,
                         assert_plain_where_fused_tail_does_not_apply,
                         count_calls, gated_backbone, random_norm,
                         tail_results)

from mmctx.models import PatchSpatialInteraction, norm_pixel_gate


def plain_tail(z, identity, norm, psi):
    return F.relu(psi.forward_residual(norm(z), identity))


def fused_tail(z, identity, norm, psi):
    return psi.forward_tail(z, identity, norm)


def random_psi(channels, feature_size, grid_size, dtype):
    psi = PatchSpatialInteraction(channels, feature_size=feature_size,
                                  grid_size=grid_size).to(dtype)
    with torch.no_grad():
        for p in psi.parameters():
            p.normal_(0, 0.5)
    return psi


# (map shape, PSI's reference feature size, grid): patches 2x2 at the
# reference size and off it (the per-offset maps resampled), one pixel per
# patch (grid = the map), rows longer than one loop chunk (1024 pixels), a
# 1x1 map
CASES = [
    ((2, 4, 8, 8), (8, 8), 4),
    ((2, 4, 6, 10), (8, 8), 4),
    ((2, 3, 5, 7), (5, 7), 4),
    ((2, 3, 40, 33), (8, 8), 4),
    ((3, 4, 1, 1), (2, 2), 2),
]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape, feature_size, grid', CASES)
@pytest.mark.parametrize('norm_kwargs', [
    dict(),
    dict(momentum=None),  # cumulative moving average
    dict(track_running_stats=False),  # batch statistics, nothing kept
])
def test_fused_tail_matches_the_plain_ops(dtype, shape, feature_size, grid,
                                          norm_kwargs):
    """Output; gradients of the map, the identity, bn3's weight and bias
    and PSI's parameters (squeeze, MLP); running statistics and batch
    counts after two steps. In float32 the fused path is held to the plain
    ops in float64, as close as the plain ops are."""
    check_fused_tail_matches_the_plain_ops(dtype, shape, feature_size, grid,
                                           norm_kwargs)


@pytest.mark.parametrize('path', ['gemm', 'conv'])
def test_fused_tail_matches_on_either_squeeze_path(path, monkeypatch):
    """The per-offset maps as a GEMM or as oneDNN's 1x1 conv (whichever
    ``pointwise_path`` finds faster here, or ``MMCTX_POINTWISE``)."""
    monkeypatch.setenv('MMCTX_POINTWISE', path)
    for dtype in (torch.float64, torch.float32):
        for shape, feature_size, grid in CASES[:2]:
            check_fused_tail_matches_the_plain_ops(dtype, shape,
                                                   feature_size, grid, {})


def check_fused_tail_matches_the_plain_ops(dtype, shape, feature_size, grid,
                                           norm_kwargs):
    torch.manual_seed(0)
    norm = random_norm(shape[1], dtype, **norm_kwargs)
    psi = random_psi(shape[1], feature_size, grid, dtype)
    plain = copy.deepcopy((norm, psi))
    reference = copy.deepcopy((norm, psi))
    for module in reference:
        module.double()
    # off-centre map: the variance comes from sums of squares
    z = torch.randn(shape, dtype=dtype) * 3 + 2
    identity = torch.randn(shape, dtype=dtype)
    assert psi.tail_applies(norm, z, identity)
    for _ in range(2):
        fused_results = tail_results(fused_tail, z, identity, norm, psi)
        plain_results = tail_results(plain_tail, z, identity, *plain)
        reference_results = tail_results(plain_tail, z.double(),
                                         identity.double(), *reference)
    assert_as_close_as_plain(fused_results, plain_results,
                             reference_results)


@pytest.mark.parametrize('shape, feature_size', [
    ((2, 3, 4, 4), (4, 4)), ((2, 3, 3, 5), (4, 4))])
def test_fused_tail_supports_double_backward(shape, feature_size):
    """Second derivatives through the fused tail are autograd's
    (``gradgradcheck``, float64): its backward rebuilds the plain ops when
    the graph of the gradient is recorded."""
    from torch.autograd import gradgradcheck
    torch.manual_seed(0)
    norm = random_norm(3, torch.float64, track_running_stats=False)
    psi = random_psi(3, feature_size, 2, torch.float64)
    head = [p for name, p in psi.named_parameters()
            if name != 'squeeze.weight']

    def tail(z, identity, weight, bias, offset_weights, *head_params):
        return norm_pixel_gate._NormPixelGateAddReLU.apply(
            z, identity, weight, bias, offset_weights, None, None, 0.,
            norm.eps, psi, norm_pixel_gate.kernels(), *head_params)

    inputs = [torch.randn(shape, dtype=torch.float64) for _ in range(2)] + [
        norm.weight, norm.bias, psi.offset_weights()]
    # the head computes with the module's own parameters
    inputs = [t.detach().clone().requires_grad_() for t in inputs] + head
    assert gradgradcheck(tail, inputs)


def psi_backbone(**kwargs):
    return gated_backbone('patch_spatial_interaction', 0.1,
                          type='PSIResNet', psi=dict(grid_size=4), **kwargs)


def count_fused_calls(monkeypatch):
    return count_calls(monkeypatch, norm_pixel_gate,
                       'norm_pixel_gate_add_relu')


@pytest.mark.parametrize('kwargs', [dict(), dict(with_cp=True)])
def test_psi_resnet_training_takes_the_fused_tail(kwargs, monkeypatch):
    """A PSI-ResNet training with BN updating runs its blocks' tails fused,
    and gives the plain blocks' outputs, gradients (input, every parameter)
    and BN statistics, at the reference size (patches 2/1/1/1 with grid 4)
    and another one (the per-offset maps resampled)."""
    net = psi_backbone(**kwargs).train()
    names = [name for name, _ in net.named_modules()
             if name.endswith('patch_spatial_interaction')]
    assert len(names) == 4
    assert_fused_backbone_matches_plain(net, norm_pixel_gate,
                                        'norm_pixel_gate_add_relu',
                                        bool(kwargs), monkeypatch)


def test_fused_tail_is_left_where_it_does_not_apply(monkeypatch):
    """Eval-mode BN (``norm_eval``, inference), autocast, traced graphs,
    hooks on bn3, ReLU or the gate, another norm type, a channels-last map
    or another plugin after the gate: the plain ops."""
    calls = count_fused_calls(monkeypatch)
    assert_plain_where_fused_tail_does_not_apply(
        psi_backbone, 'patch_spatial_interaction', calls)
    with torch.no_grad():
        net = psi_backbone().train()
        calls.clear()
        net(torch.randn(2, 3, 32, 32, dtype=torch.float64))
        assert len(calls) == 4  # no_grad training: BN still updates

    norm = random_norm(3, torch.float32)
    psi = random_psi(3, (4, 4), 2, torch.float32)
    z, identity = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert psi.tail_applies(norm, z, identity)
    assert not psi.tail_applies(norm.eval(), z, identity)
    assert not psi.tail_applies(nn.SyncBatchNorm(3).train(), z, identity)
    assert not psi.tail_applies(norm.train(), z.to(
        memory_format=torch.channels_last), identity)
    assert not psi.tail_applies(norm, z[:1, :, :1, :1],
                                identity[:1, :, :1, :1])  # 1 value
    assert not psi.tail_applies(norm, z.double(), identity.double())
    monkeypatch.setattr(norm_pixel_gate, 'kernels', lambda: None)
    assert not psi.tail_applies(norm, z, identity)  # no compiler
