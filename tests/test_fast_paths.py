"""The fast paths of the context modules (issue 9) compute what the plain
ops compute: the hand-written backward passes (mmctx.models.gating) give
autograd's results, and every module gives the same outputs and gradients
on its fast path (training, inference) and on the size-generic path of
traced and exported graphs (the plain ops)."""
import pytest
import torch
import torch.nn.functional as F

from mmctx.models import (GatherExcite, GEResNet, PatchSpatialInteraction,
                          SpatialBias)
from mmctx.models.gating import channel_dot, channel_gate, global_mean_gate
from mmctx.models.utils import (PointwiseConv2d, pointwise_product,
                                size_generic)


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    # A loss whose gradient differs per element, so every path is exercised.
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def assert_same(fused, reference, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype is torch.float64 else \
        dict(rtol=1e-5, atol=1e-5)
    (out, grad), (ref_out, ref_grad) = fused, reference
    torch.testing.assert_close(out, ref_out, **tol)
    for g, r in zip(grad, ref_grad):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 6, 1)])
def test_global_mean_gate_matches_autograd(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    assert_same(grads(global_mean_gate, x),
                grads(lambda t: t * t.mean((2, 3), True).sigmoid(), x), dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_channel_gate_matches_autograd(dtype):
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    gate = torch.rand(2, 3, 1, 1, dtype=dtype)
    assert_same(grads(channel_gate, x, gate),
                grads(lambda a, b: a * b, x, gate), dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('batch', [1, 3])
def test_channel_dot_matches_einsum(dtype, batch):
    x = torch.randn(batch, 4, 5, 6, dtype=dtype)
    weight = torch.randn(4, 5, 6, dtype=dtype)
    fused = grads(channel_dot, x, weight)
    assert fused[1][0].is_contiguous()  # what the layers below receive
    assert_same(fused,
                grads(lambda a, w: torch.einsum('bchw,chw->bc', a, w), x,
                      weight), dtype)


def test_fused_ops_fall_back_where_autograd_does_not_record():
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert global_mean_gate(x).grad_fn is None
    # Only one operand needs a gradient: the other gets None, no work.
    gate = torch.rand(2, 3, 1, 1, requires_grad=True)
    out = channel_gate(x, gate)
    out.sum().backward()
    assert x.grad is None and gate.grad is not None
    # Traced and exported graphs keep the plain ops.
    xg = x.clone().requires_grad_()
    with size_generic():
        assert type(global_mean_gate(xg).grad_fn).__name__ == 'MulBackward0'


def module_grads(module, x):
    """Output and gradients (input, then parameters) of ``module`` in
    float64: the comparisons test formulas, and a train-mode BN over a few
    values would amplify float32 rounding past any fixed tolerance."""
    module.double().zero_grad()
    x = x.double().requires_grad_()
    out = module(x)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), [x.grad] + [
        p.grad.clone() for p in module.parameters()
    ]


@pytest.mark.parametrize('variant', ['parameter_free', 'depthwise',
                                     'depthwise_excite'])
@pytest.mark.parametrize('size', [8, 12])  # reference size, and resampled
def test_gather_excite_fused_equals_plain_ops(variant, size):
    """The fused path (eager, grad) against the size-generic path (plain
    autograd ops): same outputs and the same gradients for the input and
    every parameter, in train and eval mode, and the same outputs with no
    grad (the inference path)."""
    torch.manual_seed(0)
    ge = GatherExcite(16, variant=variant, extent='global', feature_size=8,
                      reduction=4)
    for p in ge.parameters():  # away from the zero init: real gates
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, size, size)
    for mode in (True, False):
        ge.train(mode)
        state = {k: v.clone() for k, v in ge.state_dict().items()}
        fused = module_grads(ge, x)
        ge.load_state_dict(state)  # same BN statistics for the reference
        with size_generic():
            reference = module_grads(ge, x)
        assert_same(fused, reference, torch.float64)
        ge.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(ge(x.double()), fused[0])
        ge.load_state_dict(state)


def test_psi_fused_equals_plain_ops():
    torch.manual_seed(0)
    psi = PatchSpatialInteraction(8, feature_size=8, grid_size=4)
    for p in psi.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for size in (8, 12):
        x = torch.randn(2, 8, size, size)
        fused = module_grads(psi, x)
        with size_generic():
            reference = module_grads(psi, x)
        assert_same(fused, reference, torch.float64)


@pytest.mark.parametrize('fusion', ['concat', 'add'])
def test_spatial_bias_squeeze_as_matmul_equals_conv(fusion):
    """SB's 1x1 squeeze is a PointwiseConv2d: same outputs and gradients
    on every path (GEMM in training and inference, size-generic)."""
    torch.manual_seed(0)
    sb = SpatialBias(16, pool_size=4, fusion=fusion)
    for p in sb.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 9, 11)
    for mode in (True, False):
        sb.train(mode)
        state = {k: v.clone() for k, v in sb.state_dict().items()}
        fused = module_grads(sb, x)
        sb.load_state_dict(state)
        with size_generic():
            reference = module_grads(sb, x)
        assert_same(fused, reference, torch.float64)
        sb.load_state_dict(state)
        with torch.no_grad():  # the inference GEMM
            torch.testing.assert_close(sb(x.double()), fused[0])
        sb.load_state_dict(state)


@pytest.mark.parametrize('batch', [1, 3])
def test_pointwise_conv_gemm_matches_conv(batch):
    """PointwiseConv2d gives the conv's output and gradients (input,
    weight, bias) in training, and the same output from its inference
    GEMM; the GEMM's own backward (used by PSI's squeeze) matches too."""
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 5, 4)
    for bias in (False, True):
        conv = PointwiseConv2d(8, 3, 1, bias=bias)
        fused = module_grads(conv, x)  # training: the conv itself
        plain = torch.nn.Conv2d(8, 3, 1, bias=bias)
        plain.load_state_dict(conv.state_dict())
        assert_same(fused, module_grads(plain, x), torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(conv(x.double()), fused[0])
    weight = torch.randn(3, 8, 1, 1, dtype=torch.float64)
    assert_same(grads(pointwise_product, weight, x.double()),
                grads(lambda w, t: F.conv2d(t, w), weight, x.double()),
                torch.float64)


def test_pointwise_conv_falls_back_to_the_conv():
    """Strided convs, channels_last maps, autocast and traced graphs run
    the conv itself; the class and state dict are a stock conv's."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 4, requires_grad=True)
    conv = PointwiseConv2d(8, 3, 1)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert conv(nhwc).grad_fn.name() == 'ConvolutionBackward0'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert conv(x).grad_fn.name() == 'ConvolutionBackward0'
    with size_generic():
        assert conv(x).grad_fn.name() == 'ConvolutionBackward0'
    strided = PointwiseConv2d(8, 3, 1, stride=2)
    assert strided(x).grad_fn.name() == 'ConvolutionBackward0'
    assert isinstance(conv, torch.nn.Conv2d)
    assert list(conv.state_dict()) == list(
        torch.nn.Conv2d(8, 3, 1).state_dict())


@pytest.mark.parametrize('variant', ['parameter_free', 'depthwise',
                                     'depthwise_excite'])
def test_ge_resnet_inference_folds_norm3_exactly(variant):
    """GE-ResNet inference folds each block's norm3 into its GE gate; the
    output equals the plain path (autograd on) at the reference size and
    at another size, with real (non-initial) weights and BN statistics."""
    from mmctx.models.backbones.ge_resnet import GEBottleneck
    torch.manual_seed(0)
    net = GEResNet(depth=14, reference_input_size=64, ge=dict(
        variant=variant, extent='global'))
    net.init_weights()
    for name, t in net.state_dict().items():
        if name.endswith('running_var'):
            t.uniform_(0.5, 2)
        elif t.is_floating_point() and t.dim() == 1:
            t.normal_(0, 0.5)
        elif t.is_floating_point() and 'gather_excite' in name:  # not convs
            t.normal_(0, 0.05)
    net.eval()
    blocks = [m for m in net.modules() if isinstance(m, GEBottleneck)]
    assert len(blocks) == 4
    calls = []
    for block in blocks:  # count the folded forwards
        block.__dict__['forward_plugin'] = (
            lambda b: lambda x, names: calls.append(b._fold_norm3) or
            GEBottleneck.forward_plugin(b, x, names))(block)
    for size in (64, 80):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            calls.clear()
            folded = net(x)
            assert calls and all(calls[-1:])
        calls.clear()
        plain = net(x)  # autograd records: the plain path
        assert not any(calls)
        for f, p in zip(folded, plain):
            torch.testing.assert_close(f, p.detach(), rtol=1e-4, atol=1e-5)
