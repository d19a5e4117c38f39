"""The fast paths of the context modules (issue 9) compute what the plain
ops compute: the hand-written backward passes (mmctx.models.gating) give
autograd's results, and every module gives the same outputs and gradients
on its fast path (training, inference) and on the size-generic path of
traced and exported graphs (the plain ops)."""
import time

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS

from mmctx.models import (GatherExcite, GEResNet, PatchSpatialInteraction,
                          SpatialBias, utils)
from mmctx.models.gating import (channel_dot, channel_gate, channel_gate_add,
                                 channel_scale_shift, global_mean_gate,
                                 pixel_gate_add)
from mmctx.models.utils import (PointwiseConv2d, adaptive_avg_pool2d_banded,
                                few_maps_product, pointwise_product,
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
@pytest.mark.parametrize('shape', [(2, 3, 5, 7), (1, 4, 1, 1)])
def test_gates_with_the_residual_add_match_autograd(dtype, shape):
    """The ``identity + gate(x)`` forms (one addcmul): same output and
    gradients for x, the gate and the identity as the plain product and
    add."""
    x, identity = torch.randn(shape, dtype=dtype), torch.randn(shape,
                                                               dtype=dtype)
    gate = torch.rand(*shape[:2], 1, 1, dtype=dtype)
    assert_same(grads(channel_gate_add, x, gate, identity),
                grads(lambda a, b, i: i + a * b, x, gate, identity), dtype)
    assert_same(
        grads(global_mean_gate, x, identity),
        grads(lambda a, i: i + a * a.mean((2, 3), True).sigmoid(), x,
              identity), dtype)
    # PSI: one weight per image and pixel
    weights = torch.rand(shape[0], 1, *shape[2:], dtype=dtype)
    fused = grads(pixel_gate_add, x, weights, identity)
    assert fused[0].dtype == dtype
    assert_same(fused, grads(lambda a, b, i: i + a * b, x, weights, identity),
                dtype)


def test_pixel_gate_add_takes_its_backward_only_where_autograd_records():
    x, identity = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    weights = torch.rand(2, 1, 4, 5, requires_grad=True)
    assert pixel_gate_add(x, weights, identity).grad_fn.name() == \
        '_PixelGateAddBackward'
    # Only the weights need a gradient: x and the identity get None.
    pixel_gate_add(x, weights, identity).sum().backward()
    torch.testing.assert_close(weights.grad, x.sum(1, keepdim=True))
    with torch.no_grad():
        assert pixel_gate_add(x, weights, identity).grad_fn is None
    with size_generic():  # traced / exported graphs: the plain op
        assert pixel_gate_add(x, weights, identity).grad_fn.name() == \
            'AddcmulBackward0'
    # weights that are not one per image and pixel: the plain op
    channel = torch.rand(2, 3, 1, 1, requires_grad=True)
    assert pixel_gate_add(x, channel, identity).grad_fn.name() == \
        'AddcmulBackward0'


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape, size', [
    ((2, 3, 200, 304), (56, 56)),  # GE-θ stage 1 at 800x1216
    ((1, 2, 25, 38), (7, 7)),  # fewer outputs than one band
    ((2, 3, 56, 56), (64, 64)),  # PSI at 224: upsampling
    ((1, 2, 57, 13), (56, 5)),  # odd sizes, one side shrinks
    ((2, 2, 171, 128), (56, 56)),
    ((1, 2, 1, 1), (4, 4)),
    ((3, 40, 56), (56, 64)),  # one side unchanged, 3-D input
])
def test_banded_pool_equals_adaptive_avg_pool(dtype, shape, size):
    """resample_to's banded GEMMs give F.adaptive_avg_pool2d's output and
    input gradient (float64: to 1e-10; float32: to 1e-5)."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    fused = grads(lambda t: adaptive_avg_pool2d_banded(t, size), x)
    assert fused[0].is_contiguous()
    assert_same(fused, grads(lambda t: F.adaptive_avg_pool2d(t, size), x),
                dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('batch', [1, 3, 19])  # 19: three batched products
@pytest.mark.parametrize('size', [(5, 6), (8, 9)])  # kernel grad: sum, GEMM
@pytest.mark.parametrize('channels_last', [False, True])
def test_channel_dot_matches_einsum(dtype, batch, size, channels_last):
    x = torch.randn(batch, 4, *size, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(4, *size, dtype=dtype)

    def plain(a, w):
        return torch.einsum('bchw,chw->bc', a, w)

    fused = grads(channel_dot, x, weight)
    # what the layers below receive: x's own layout
    assert fused[1][0].is_contiguous(memory_format=torch.channels_last
                                     if channels_last else
                                     torch.contiguous_format)
    assert_same(fused, grads(plain, x, weight), dtype)
    with torch.no_grad():  # inference: C++ loops (contiguous), no autograd
        # (against float64: over 1320 pixels float32's einsum is the
        # less exact of the two)
        torch.testing.assert_close(
            channel_dot(x, weight),
            plain(x.double(), weight.double()).to(dtype),
            **(dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64
               else dict(rtol=1e-5, atol=1e-4)))
        assert channel_dot(x, weight).dtype == dtype


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_channel_dot_inference_loops_over_long_rows(dtype):
    """Inference's channel dot products (C++ loops, float sums over chunks
    of 1024 pixels added in double) on rows of one and of several chunks,
    against float64's einsum."""
    for shape in [(3, 4, 40, 33), (2, 3, 7, 7)]:
        x = torch.randn(shape, dtype=dtype)
        weight = torch.randn(shape[1:], dtype=dtype)
        with torch.no_grad():
            got = channel_dot(x, weight)
        expected = torch.einsum('bchw,chw->bc', x.double(), weight.double())
        assert got.dtype == dtype
        torch.testing.assert_close(
            got.double(), expected,
            **(dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64
               else dict(rtol=1e-5, atol=1e-4)))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shift_batch', [3, 1])
def test_channel_scale_shift_equals_addcmul(dtype, shift_batch,
                                            monkeypatch):
    """The per-row multiply-add through the inference batch-norm kernel (GE's
    norm3 fold, GE-θ⁻'s gate gradient) gives addcmul's result; a map it does
    not apply to (channels_last, a gradient to record) gets addcmul."""
    kernel_calls = []
    batch_norm = F.batch_norm
    monkeypatch.setattr(F, 'batch_norm', lambda *args: kernel_calls.append(
        args[0].shape) or batch_norm(*args))
    x = torch.randn(3, 4, 5, 6, dtype=dtype)
    scale = torch.randn(3, 4, 1, 1, dtype=dtype)
    shift = torch.randn(shift_batch, 4, 1, 1, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else \
        dict(rtol=1e-6, atol=1e-6)
    expected = torch.addcmul(shift, x, scale)
    out = channel_scale_shift(x, scale, shift)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, **tol)
    assert kernel_calls == [(1, 12, 5, 6)]  # one row per image and channel
    last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(channel_scale_shift(last, scale, shift),
                               expected, **tol)
    # Recorded by autograd: addcmul (the kernel's backward is not needed)
    out = channel_scale_shift(x, scale.requires_grad_(), shift)
    assert type(out.grad_fn).__name__ == 'AddcmulBackward0'
    torch.testing.assert_close(out, expected, **tol)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize('batch', [1, 3])
def test_channel_gates_of_channels_last_maps_match_autograd(batch):
    """The gates' gradient reductions on maps that are not contiguous
    (channels_last: a product and a sum instead of the dot products)."""
    x = torch.randn(batch, 3, 5, 7).to(memory_format=torch.channels_last)
    gate = torch.rand(batch, 3, 1, 1)
    identity = torch.randn(batch, 3, 5, 7)
    assert_same(grads(channel_gate_add, x, gate, identity),
                grads(lambda a, b, i: i + a * b, x, gate, identity),
                torch.float32)
    assert_same(
        grads(global_mean_gate, x),
        grads(lambda t: t * t.mean((2, 3), True).sigmoid(), x),
        torch.float32)


def test_fast_paths_support_double_backward():
    """Every hand-written backward is differentiable itself: second
    derivatives (gradient penalties, ``create_graph=True``) through the
    fast paths are autograd's (``gradgradcheck``, float64). GE-θ⁻'s gate
    once saved a gate computed without autograd, and its second derivative
    silently dropped the gate's dependence on the map."""
    from torch.autograd import gradgradcheck
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, identity = leaf(2, 3, 4, 5), leaf(2, 3, 4, 5)
    gate = torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    pixel_weights = torch.rand(2, 1, 4, 5, dtype=torch.float64,
                               requires_grad=True)
    checks = [
        (channel_gate, (x, gate)),
        (channel_gate_add, (x, gate, identity)),
        (pixel_gate_add, (x, pixel_weights, identity)),
        (channel_dot, (x, leaf(3, 4, 5))),
        (global_mean_gate, (x, )),
        (global_mean_gate, (x, identity)),
        (lambda t: adaptive_avg_pool2d_banded(t, (3, 3)), (leaf(2, 3, 7, 8), )),
        (pointwise_product, (leaf(4, 3, 1, 1), x)),
        (few_maps_product, (leaf(4, 3, 1, 1), x)),
    ]
    # The modules whole (their own fast paths inside, e.g. PSI's squeeze).
    modules = [GatherExcite(4, variant=variant, feature_size=3, reduction=2)
               for variant in ('parameter_free', 'depthwise',
                               'depthwise_excite')]
    modules += [PatchSpatialInteraction(4, feature_size=3, grid_size=3),
                SpatialBias(4, pool_size=2)]
    x, identity = leaf(2, 4, 3, 3), leaf(2, 4, 3, 3)
    for module in modules:
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
        module.double().eval()  # fixed norms: a deterministic function
        if hasattr(module, 'forward_residual'):
            checks.append((module.forward_residual, (x, identity)))
        checks.append((module, (x, )))
    for fn, inputs in checks[:9]:  # the functions take their fast paths
        assert fn(*inputs).grad_fn.name() not in ('MulBackward0',
                                                  'AddcmulBackward0')
    for fn, inputs in checks:
        assert gradgradcheck(fn, inputs), fn


def test_fast_paths_keep_autocast_dtypes():
    """Under bfloat16 autocast every module's fast path gives the output
    dtype and, up to bfloat16 rounding, the values of its plain ops (GE-θ's
    global gather once computed its dot product in float32 there, which
    carried float32 through the gate into the block's output)."""
    torch.manual_seed(0)
    modules = [GatherExcite(8, variant=variant, feature_size=4, reduction=2)
               for variant in ('parameter_free', 'depthwise',
                               'depthwise_excite')]
    modules += [PatchSpatialInteraction(8, feature_size=4, grid_size=4),
                SpatialBias(8, pool_size=2)]
    # a map as a conv under autocast gives it
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    identity = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    for module in modules:
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
        calls = [module]
        if hasattr(module, 'forward_residual'):
            calls.append(lambda t: module.forward_residual(t, identity))
        for call in calls:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                fast = call(x)
                with size_generic():
                    plain = call(x)
            assert fast.dtype == plain.dtype == torch.bfloat16, module
            torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05)


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


class ResidualForm(torch.nn.Module):
    """``gate.forward_residual(x, identity)`` as a module of x."""

    def __init__(self, gate, identity):
        super().__init__()
        self.gate, self.identity = gate, identity

    def forward(self, x):
        return self.gate.forward_residual(x, self.identity)


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
        # the residual form (the bottlenecks' call): pixel_gate_add
        identity = torch.randn(2, 8, size, size, dtype=torch.float64)
        residual = ResidualForm(psi, identity)
        fused = module_grads(residual, x)
        with size_generic():
            reference = module_grads(residual, x)
        assert_same(fused, reference, torch.float64)


@pytest.mark.parametrize('fusion', ['concat', 'add'])
def test_spatial_bias_squeeze_as_matmul_equals_conv(fusion):
    """SB's 1x1 squeeze is a PointwiseConv2d and eager code runs its
    Conv1d mix as one GEMM over the windows: same outputs and gradients on
    every path (training and inference, size-generic: the convs)."""
    torch.manual_seed(0)
    sb = SpatialBias(16, pool_size=4, fusion=fusion)
    for p in sb.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 9, 11)
    mixed = []
    handle = sb.mix.register_forward_pre_hook(lambda m, i: mixed.append(1))
    sb.spatial_bias_of_squeezed.__func__(
        sb, torch.randn(2, 5, 9, 11), (9, 11))
    assert mixed == [1]  # a hooked mix runs the Conv1d itself
    handle.remove()
    mixed.clear()
    real_mix = sb.mix.forward
    sb.mix.forward = lambda t: mixed.append(1) or real_mix(t)
    sb(x)
    assert not mixed  # eager code: the GEMM
    with size_generic():
        sb(x)
    assert mixed == [1]
    del sb.mix.forward
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
@pytest.mark.parametrize('path', ['gemm', 'conv', 'loops'])
def test_pointwise_conv_gemm_matches_conv(batch, path, monkeypatch):
    """PointwiseConv2d's GEMM and loops give the conv's output and
    gradients (input, weight, bias), in training and in inference; so do
    the bare pointwise_product and few_maps_product (PSI's squeeze).
    ``MMCTX_POINTWISE`` picks the path."""
    monkeypatch.setenv('MMCTX_POINTWISE', path)
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 5, 4)
    for bias in (False, True):
        conv = PointwiseConv2d(8, 3, 1, bias=bias)
        fused = module_grads(conv, x)
        ran = conv(x.double().requires_grad_()).grad_fn.name()
        assert (ran == 'ConvolutionBackward0') == (path == 'conv')
        if not bias:
            assert (ran == '_FewMapsProductBackward') == (path == 'loops')
        plain = torch.nn.Conv2d(8, 3, 1, bias=bias)
        plain.load_state_dict(conv.state_dict())
        assert_same(fused, module_grads(plain, x), torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(conv(x.double()), fused[0])
    weight = torch.randn(3, 8, 1, 1, dtype=torch.float64)
    for product in (pointwise_product, few_maps_product):
        assert_same(grads(product, weight, x.double()),
                     grads(lambda w, t: F.conv2d(t, w), weight, x.double()),
                     torch.float64)
        with torch.no_grad():  # nothing recorded: the loops alone
            torch.testing.assert_close(product(weight, x.double()),
                                       F.conv2d(x.double(), weight))


def test_pointwise_path_times_each_kind_of_product_once(monkeypatch):
    """``auto`` times both paths once per kind of product (weight shape,
    batch 1 or not, pixel count to a power of two, training or not) and
    keeps the faster; the timing leaves no gradients behind. A fixed
    ``MMCTX_POINTWISE`` is used as it is; another value is refused by
    name."""
    monkeypatch.setattr(utils, '_pointwise_choices', {})
    monkeypatch.delenv('MMCTX_POINTWISE', raising=False)
    timed = []
    real_timing = utils._time_pointwise_paths

    def counted(weight, x, train):
        timed.append((tuple(x.shape), train))
        return real_timing(weight, x, train)

    monkeypatch.setattr(utils, '_time_pointwise_paths', counted)
    weight = torch.randn(3, 8, 1, 1, requires_grad=True)
    for shape in [(2, 8, 5, 4), (2, 8, 4, 5), (2, 8, 6, 4), (1, 8, 5, 4),
                  (2, 8, 9, 9)]:
        assert utils.pointwise_path(weight, torch.randn(shape)) in (
            'gemm', 'conv', 'loops')
        with torch.no_grad():
            utils.pointwise_path(weight, torch.randn(shape))
    # 40 and 48 pixels share a kind; batch 1 and 162 pixels are new ones
    assert timed == [((2, 8, 5, 4), True), ((2, 8, 5, 4), False),
                     ((1, 8, 5, 4), True), ((1, 8, 5, 4), False),
                     ((2, 8, 9, 9), True), ((2, 8, 9, 9), False)]
    assert weight.grad is None

    def slow(path):
        def run(*args):
            time.sleep(0.01)
            return path(*args)
        return run

    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    products = dict(gemm='pointwise_product', loops='few_maps_product')
    for train in (True, False):
        for fast in ('gemm', 'conv', 'loops'):
            with monkeypatch.context() as patch:
                for path, name in products.items():
                    if path != fast:
                        patch.setattr(utils, name, slow(getattr(utils, name)))
                if fast != 'conv':
                    patch.setattr(utils.F, 'conv2d', slow(F.conv2d))
                assert utils._time_pointwise_paths(weight, x, train) == fast
    # the loops are a candidate for at most FEW_MAPS output maps
    with monkeypatch.context() as patch:
        patch.setattr(utils, 'pointwise_product',
                      slow(utils.pointwise_product))
        patch.setattr(utils, 'FEW_MAPS', 2)
        assert utils._time_pointwise_paths(weight, x, False) == 'conv'
    # first timed inside activation checkpointing, whose hooks must not
    # see the timing's graphs (the recomputation skips the timing)
    import torch.utils.checkpoint as cp
    monkeypatch.setattr(utils, '_pointwise_choices', {})
    conv = PointwiseConv2d(8, 3, 1)
    cp.checkpoint(lambda t: conv(t).relu(), x,
                  use_reentrant=False).sum().backward()
    assert len(utils._pointwise_choices) == 1
    assert x.grad is not None
    for path in ('gemm', 'conv', 'loops'):
        monkeypatch.setenv('MMCTX_POINTWISE', path)
        assert utils.pointwise_path(weight, x) == path
    # where the loops do not apply (more output maps), the GEMM
    assert utils.pointwise_path(torch.randn(17, 8, 1, 1), x) == 'gemm'
    monkeypatch.setenv('MMCTX_POINTWISE', 'blas')
    with pytest.raises(ValueError, match=r"MMCTX_POINTWISE must be one "
                       r"of \('auto', 'gemm', 'conv', 'loops'\), got "
                       r"'blas'"):
        utils.pointwise_path(weight, x)


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
def test_ge_resnet_inference_folds_norm3_exactly(variant, monkeypatch):
    """GE-ResNet inference folds each block's norm3 into its GE gate (where
    the fused inference tail does not run, e.g. without a compiler); the
    output equals the plain path (autograd on) at the reference size and
    at another size, with real (non-initial) weights and BN statistics."""
    from mmctx.models.backbones.gated_bottleneck import GatedBottleneck
    from mmctx.models.backbones.ge_resnet import GEBottleneck
    monkeypatch.setattr(GatedBottleneck, '_inference_tail_may_fuse',
                        lambda self, gate: False)
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


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('variant', ['depthwise', 'depthwise_excite'])
def test_folded_gate_loops_equal_the_tensor_ops(dtype, variant):
    """GE-θ / θ⁺'s gate folded with bn3 in inference as C++ loops (the
    dots and the kernel's sums in one read, then the context, gather norm,
    excite MLP and sigmoid in one call: ``_folded_gate_loops``) equals the
    tensor ops (``folded_gate`` without the loops) and the module on
    ``bn3(x)``, at the reference size, off it and at batch 1; the tensor
    ops run where a gather norm or excite conv is hooked, the gather norm
    trains or is a GroupNorm, or a norm's dtype differs from the map's."""
    from mmctx.models.norm_gate import kernels
    ops = kernels()
    torch.manual_seed(0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else \
        dict(rtol=1e-5, atol=1e-6)

    def build(norm_cfg=dict(type='BN')):
        ge = GatherExcite(32, variant=variant, extent='global',
                          feature_size=14, norm_cfg=norm_cfg)
        for p in ge.parameters():
            torch.nn.init.normal_(p, std=0.2)
        for m in ge.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        return ge.to(dtype).eval()

    ge = build()
    norm = torch.nn.BatchNorm2d(32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    norm.to(dtype).eval()
    with torch.no_grad():
        for shape in [(2, 32, 14, 14), (1, 32, 9, 20), (3, 32, 30, 31)]:
            x = torch.randn(shape, dtype=dtype)
            assert ge._gate_loops_apply(x)
            loops = ge._folded_gate_loops(x, norm, ops)
            plain = ge.folded_gate(x, norm)
            assert loops is not None
            for a, b in zip(loops, plain):
                assert a.shape == b.shape == (*shape[:2], 1, 1)
                assert a.dtype == dtype
                torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(x * loops[0] + loops[1],
                                       ge(norm(x)), **tol)
        # the dots' kernel sums, in the same read
        kernel = ge.gather.weight.squeeze(1)
        for x in (torch.randn(2, 32, 14, 14, dtype=dtype),
                  torch.randn(2, 32, 9, 20, dtype=dtype)):
            sums = x.new_empty(32, dtype=torch.float64)
            dots = (ops.channel_dots if x.shape[-1] == 14 else
                    ops.pooled_dot)(x, kernel, sums)
            assert dots.shape == (2, 32)
            torch.testing.assert_close(sums, kernel.double().sum((1, 2)),
                                       **tol)
        x = torch.randn(2, 32, 14, 14, dtype=dtype)
        layers = [ge.gather_norms[0]] + (
            list(ge.excite) if variant == 'depthwise_excite' else [])
        for layer in layers:
            handle = layer.register_forward_hook(lambda m, i, o: None)
            assert not ge._gate_loops_apply(x)
            handle.remove()
        assert ge._gate_loops_apply(x)
        ge.gather_norms[0].train()
        assert not ge._gate_loops_apply(x)
        ge.gather_norms[0].eval()
        assert not build(dict(type='GN', num_groups=4))._gate_loops_apply(x)
        other = torch.float32 if dtype is torch.float64 else torch.float64
        assert not ge._gate_loops_apply(x.to(other))
        norm.running_var.data = norm.running_var.to(other)
        assert ge._folded_gate_loops(x, norm, ops) is None


@pytest.mark.parametrize('backbone', [
    dict(type='GEResNet', ge=dict(variant='parameter_free')),
    dict(type='GEResNet', ge=dict(variant='depthwise')),
    dict(type='GEResNet', ge=dict(variant='depthwise_excite')),
    dict(type='PSIResNet', psi=dict(grid_size=4)),
])
def test_inference_tails_equal_the_upstream_block(backbone, monkeypatch):
    """In inference GE and PSI blocks run bn3, the gate, the add and the
    ReLU as one pass (``forward_inference_tail``): the outputs equal the
    upstream forward's (autograd on) with real weights and BN statistics,
    at the reference size, another size and batch 1. The tails write over
    conv3's output, except where a hook of conv3 may have kept it (then the
    kept map is left as conv3 wrote it). Channels_last maps, a hooked bn3
    and missing loops take the other paths, with the same outputs."""
    from mmctx.models import norm_gate, norm_pixel_gate
    torch.manual_seed(0)
    net = MODELS.build(dict(backbone, depth=50, reference_input_size=64,
                            base_channels=16))
    net.init_weights()
    _randomise_backbone(net)
    net.eval()
    gates = [m for m in net.modules()
             if hasattr(m, 'forward_inference_tail')]
    assert len(gates) == 16
    tails = []
    for gate in gates:
        monkeypatch.setattr(gate, 'forward_inference_tail', (
            lambda real: lambda *args, **kwargs: tails.append(
                kwargs['in_place']) or real(*args, **kwargs))(
                    gate.forward_inference_tail))

    def check(x, fused_blocks, in_place=None):
        tails.clear()
        with torch.no_grad():
            fast = net(x)
        assert len(tails) == fused_blocks
        assert tails == (in_place or [True] * fused_blocks)
        tails.clear()
        plain = net(x)  # autograd records: the upstream forward
        assert not tails
        for f, r in zip(fast, plain):
            torch.testing.assert_close(f, r.detach(), rtol=1e-5, atol=1e-5)

    for shape in [(2, 3, 64, 64), (1, 3, 80, 48)]:
        check(torch.randn(shape), 16)
    x = torch.randn(2, 3, 64, 64)
    check(x.contiguous(memory_format=torch.channels_last), 0)
    handle = net.layer1[0].norm3.register_forward_hook(lambda m, i, o: None)
    check(x, 15)
    handle.remove()
    kept = []
    handle = net.layer2[1].conv3.register_forward_hook(
        lambda m, i, o: kept.append((o, o.clone())))
    check(x, 16, in_place=[True] * 4 + [False] + [True] * 11)
    handle.remove()
    assert len(kept) == 2  # the fast forward's and the upstream's
    for map_, as_written in kept:
        assert torch.equal(map_, as_written)
    monkeypatch.setattr(norm_gate, 'kernels', lambda: None)
    monkeypatch.setattr(norm_pixel_gate, 'kernels', lambda: None)
    check(x, 0)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape, size', [
    ((2, 3, 20, 30), (7, 9)),  # pooling, uneven windows
    ((1, 2, 5, 6), (7, 8)),  # up-sampling: rows in several windows
    ((3, 4, 8, 8), (8, 2)),  # one axis kept
])
def test_pooled_dot_equals_the_pool_and_the_dot(dtype, shape, size):
    """GE-θ's inference gather away from the reference size, pooling and
    dot product in one read of the map, equals ``adaptive_avg_pool2d``
    and the per-channel dot product; it runs only without autograd and
    off the reference size."""
    from mmctx.models import norm_gate
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    kernel = torch.randn(shape[1], *size, dtype=dtype)
    reference = (F.adaptive_avg_pool2d(x.double(), size) *
                 kernel.double()).sum((2, 3))
    with torch.no_grad():
        assert norm_gate.pooled_dot_applies(x, kernel, size)
        assert not norm_gate.pooled_dot_applies(x, kernel, shape[-2:])
        got = norm_gate.pooled_dot(x, kernel)
    assert got.dtype == dtype
    tol = 1e-12 if dtype is torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), reference, rtol=tol, atol=tol)
    assert not norm_gate.pooled_dot_applies(x, kernel, size)  # autograd


def test_sb_resnet_inference_skips_the_concatenation_exactly():
    """SB-ResNet inference runs bn1, the ReLU and the branch's squeeze in
    one pass, conv3 on conv2's channels, and bn3, the bias maps' rank-k
    term, the residual add and the ReLU in one pass
    (SBBottleneck.forward_inference):
    the output equals the upstream forward's, with real weights and BN
    statistics, at two sizes and batch 1; training, autograd, autocast,
    channels_last maps, fusion='add' and hooks on the bypassed layers take
    the upstream forward."""
    from mmctx.models import SBResNet
    from mmctx.models.backbones import sb_resnet
    from mmctx.models.backbones.sb_resnet import SBBottleneck
    torch.manual_seed(0)
    net = SBResNet(depth=50, stage_with_sb=(True, True), base_channels=16,
                   num_stages=2, out_indices=(0, 1),
                   strides=(1, 2), dilations=(1, 1))
    net.init_weights()
    _randomise_backbone(net)
    net.eval()
    folded = []
    real = SBBottleneck.forward_inference

    def counted(block, x):
        folded.append(block)
        return real(block, x)

    def outputs(x):
        with torch.no_grad():
            return net(x)

    fused_squeezes = []
    real_fuses = SBBottleneck._squeeze_fuses
    fused_branches = []
    real_branch = SpatialBias.inference_bias

    def branch(module, *args):
        fused_branches.append(module)
        return real_branch(module, *args)

    def squeeze_fuses(block, out):
        fused_squeezes.append(real_fuses(block, out))
        return fused_squeezes[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SBBottleneck, 'forward_inference', counted)
        patch.setattr(SBBottleneck, '_squeeze_fuses', squeeze_fuses)
        patch.setattr(SpatialBias, 'inference_bias', branch)
        for shape in [(2, 3, 64, 48), (1, 3, 40, 72)]:
            x = torch.randn(shape)
            folded.clear()
            fused_squeezes.clear()
            fused_branches.clear()
            fast = outputs(x)
            assert len(folded) == 7  # every SB block
            # bn1, the ReLU and the squeeze in one pass; the branch and
            # bn2 + ReLU on its maps in two more
            assert fused_squeezes == [True] * 7
            assert len(fused_branches) == 7
            folded.clear()
            plain = net(x)  # autograd records: the upstream forward
            assert not folded
            for f, r in zip(fast, plain):
                torch.testing.assert_close(f, r.detach(), rtol=1e-5,
                                           atol=1e-5)
        x = torch.randn(2, 3, 64, 48)
        reference = outputs(x)
        with pytest.MonkeyPatch.context() as unfused:
            # the plain ops where the compiled loops do not apply
            unfused.setattr(SBBottleneck, '_squeeze_fuses',
                            lambda block, out: False)
            unfused.setattr(sb_resnet, '_tail_fuses', lambda *maps: False)
            unfused.setattr(SpatialBias, 'inference_bias_applies',
                            lambda module, maps: False)
            for f, r in zip(outputs(x), reference):
                torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
            # and without the loops (bn2 and its ReLU as tensor ops)
            unfused.setattr(sb_resnet, 'kernels', lambda: None)
            folded.clear()
            for f, r in zip(outputs(x), reference):
                torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
            assert len(folded) == 7
        block = net.layer1[1]
        for case in ('channels_last', 'autocast', 'hook', 'relu hook',
                     'train'):
            folded.clear()
            if case == 'channels_last':
                out = outputs(x.contiguous(memory_format=torch.channels_last))
            elif case == 'autocast':
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    out = outputs(x)
            elif case in ('hook', 'relu hook'):
                # (the fused passes apply the ReLU: its hook must see them)
                handle = (block.norm2 if case == 'hook' else
                          block.relu).register_forward_hook(
                              lambda m, i, o: None)
                out = outputs(x)
                handle.remove()
            else:
                net.train()
                out = outputs(x)
                net.eval()
            if case in ('hook', 'relu hook'):  # only the hooked block
                assert len(folded) == 6 and block not in folded, case
            elif case == 'channels_last':  # blocks fed a channels_last map
                assert net.layer1[0] not in folded, case
            else:
                assert not folded, case
            if case in ('channels_last', 'hook', 'relu hook'):
                for f, r in zip(out, reference):
                    torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
        add = SBResNet(depth=50, sb=dict(fusion='add'), base_channels=16,
                       stage_with_sb=(True, ), num_stages=1, out_indices=(0, ),
                       strides=(1, ), dilations=(1, ))
        add.eval()
        folded.clear()
        with torch.no_grad():
            add(x)
        assert not folded


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_spatial_bias_branch_loops_equal_the_plain_ops(dtype):
    """SB's branch in inference as two C++ passes and a GEMM
    (SpatialBias.inference_bias): norm + ReLU + adaptive pooling written as
    the Conv1d's windows, and the bilinear resampling + a following norm +
    ReLU, equal the plain ops for avg and max pooling, both grid sizes,
    maps larger, smaller and not divisible by the grid, non-square, batch
    1, and targets up- and downsampled; the plain ops run with autograd, in
    training, on channels_last maps and with a hooked mix."""
    from mmctx.models.norm_gate import kernels
    ops = kernels()
    torch.manual_seed(0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else \
        dict(rtol=1e-5, atol=1e-5)
    for pool_type in ('avg', 'max'):
        for pool_size, (batch, height, width), size in [
                (10, (2, 56, 56), (56, 56)), (10, (3, 56, 56), (28, 28)),
                (10, (1, 7, 9), (7, 9)), (6, (2, 13, 40), (7, 20)),
                (10, (1, 1, 1), (1, 1)), (6, (1, 25, 38), (50, 76))]:
            sb = SpatialBias(16, pool_size=pool_size, pool_type=pool_type)
            for p in sb.parameters():
                torch.nn.init.normal_(p, std=0.3)
            sb.norm.running_mean.normal_()
            sb.norm.running_var.uniform_(0.5, 2)
            sb.to(dtype).eval()
            maps = torch.randn(batch, 5, height, width, dtype=dtype)
            scale, shift = torch.randn(2, 3, dtype=dtype)
            with torch.no_grad():
                assert sb.inference_bias_applies(maps)
                got = sb.inference_bias(maps, size, scale, shift)
                expected = F.relu(
                    sb.spatial_bias_of_squeezed(maps, size)
                    * scale[:, None, None] + shift[:, None, None])
            torch.testing.assert_close(got, expected, **tol)
            # the first pass alone: the Conv1d's windows of the pooled maps
            affine = utils.eval_affine(sb.norm)
            pool = F.adaptive_avg_pool2d if pool_type == 'avg' \
                else F.adaptive_max_pool2d
            pooled = pool(F.relu(maps * affine[0][:, None, None]
                                 + affine[1][:, None, None]), pool_size)
            torch.testing.assert_close(
                ops.scale_shift_relu_pool_windows(maps, *affine, pool_size,
                                                  pool_type == 'max'),
                pooled.flatten(2).unfold(1, 3, 1), **tol)
    with torch.no_grad():
        assert not sb.inference_bias_applies(maps.transpose(2, 3))
    assert not sb.inference_bias_applies(maps)  # autograd records
    with torch.no_grad():
        sb.train()
        assert not sb.inference_bias_applies(maps)
        sb.eval()
        handle = sb.mix.register_forward_hook(lambda m, i, o: None)
        assert not sb.inference_bias_applies(maps)
        handle.remove()
        assert sb.inference_bias_applies(maps)
        with size_generic():
            assert not sb.inference_bias_applies(maps)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(2, 8, 5, 7), (1, 4, 40, 33)])
def test_rank_tail_equals_the_plain_ops(dtype, shape):
    """SB's tail loops: relu(identity + (z + W @ maps) * scale + shift) per
    pixel (bn3 as an affine map), into a new map or in place on z, and
    the rows' moments of z + W @ maps, for rows longer and shorter than a
    chunk."""
    from mmctx.models.norm_gate import kernels
    ops = kernels()
    torch.manual_seed(0)
    batch, channels, height, width = shape
    z, identity = torch.randn(2, *shape, dtype=dtype)
    maps = torch.rand(batch, 3, height, width, dtype=dtype)
    weight = torch.randn(channels, 3, dtype=dtype)
    scale, shift = torch.randn(2, channels, dtype=dtype)
    u = z + torch.einsum('ck,bkhw->bchw', weight, maps)
    reference = F.relu(identity + u * scale[:, None, None]
                       + shift[:, None, None])
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    for out in (torch.empty_like(z), z.clone()):  # z's copy: in place
        z_in = out if out.equal(z) else z
        got = ops.rank_scale_shift_add_relu(z_in, identity, scale, shift,
                                            weight, maps, out, None, None)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, reference, rtol=tol, atol=tol)
    # the identity through an affine map (a downsample's eval norm)
    id_scale, id_shift = torch.randn(2, channels, dtype=dtype)
    got = ops.rank_scale_shift_add_relu(z, identity, scale, shift, weight,
                                        maps, torch.empty_like(z), id_scale,
                                        id_shift)
    expected = F.relu(identity * id_scale[:, None, None]
                      + id_shift[:, None, None] + u * scale[:, None, None]
                      + shift[:, None, None])
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # the rows' moments of z + weight @ maps
    sums, squares = ops.rank_row_moments(z, weight, maps)
    assert sums.dtype == squares.dtype == torch.float64
    torch.testing.assert_close(sums, u.double().sum((2, 3)), rtol=tol,
                               atol=tol * u.shape[-1] * u.shape[-2])
    torch.testing.assert_close(squares, u.double().square().sum((2, 3)),
                               rtol=tol, atol=tol * u.shape[-1] * u.shape[-2])
    with pytest.raises(RuntimeError, match='maps must be'):
        ops.rank_row_moments(z, weight, maps[:, :2])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(2, 8, 5, 7), (1, 4, 40, 33)])
def test_gate_tails_write_a_new_map_or_in_place(dtype, shape):
    """GE's and PSI's tail loops, relu(identity + z * a + b) per row and
    relu(identity + (z * a + b) * w) per pixel: the same into a new map,
    into a given one and in place on z (the inference tails' choice); an
    out of another shape is refused by name."""
    from mmctx.models.norm_gate import kernels
    ops = kernels()
    torch.manual_seed(0)
    batch, channels, height, width = shape
    z, identity = torch.randn(2, *shape, dtype=dtype)
    row_scale, row_shift = torch.randn(2, batch * channels, dtype=torch.float64)
    scale, shift = torch.randn(2, channels, dtype=torch.float64)
    weights = torch.rand(batch, height, width, dtype=dtype)
    per_row = F.relu(identity + z * row_scale.view(batch, channels, 1, 1)
                     .to(dtype) + row_shift.view(batch, channels, 1, 1)
                     .to(dtype))
    per_pixel = F.relu(identity + (z * scale.to(dtype)[:, None, None]
                                   + shift.to(dtype)[:, None, None])
                       * weights[:, None])
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    for out in (None, torch.empty_like(z), 'z'):
        z_in = z.clone()
        target = z_in if out == 'z' else out
        got = ops.scale_shift_add_relu(z_in, identity, row_scale, row_shift,
                                       target)
        torch.testing.assert_close(got, per_row, rtol=tol, atol=tol)
        if target is not None:
            assert got.data_ptr() == target.data_ptr()
        z_in = z.clone()
        target = z_in if out == 'z' else out
        got = ops.pixel_scale_shift_add_relu(z_in, identity, scale, shift,
                                             weights, target)
        torch.testing.assert_close(got, per_pixel, rtol=tol, atol=tol)
        if target is not None:
            assert got.data_ptr() == target.data_ptr()
    with pytest.raises(RuntimeError, match='out must be'):
        ops.scale_shift_add_relu(z, identity, row_scale, row_shift, z[:, :1])
    with pytest.raises(RuntimeError, match='out must be'):
        ops.pixel_scale_shift_add_relu(z, identity, scale, shift, weights,
                                       z.transpose(2, 3))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(2, 8, 5, 7), (1, 6, 40, 33)])
@pytest.mark.parametrize('maps', [5, 7])  # a compiled rank, one at run time
@pytest.mark.parametrize('norm_mode', ['batch', 'cumulative', 'eval'])
def test_norm_relu_squeeze_equals_the_plain_ops(dtype, shape, maps,
                                                norm_mode):
    """SB's bn1, ReLU and squeeze in training as one function
    (norm_squeeze): the ReLU's output, the squeeze, the gradients of the
    input, the squeeze weight and the norm's weight and bias, the running
    statistics and the batch count equal the plain ops', with rows longer
    and shorter than a chunk, a training norm (momentum, cumulative) or
    an eval one (``norm_eval``), and a loss on only one of the outputs;
    second derivatives are autograd's."""
    import copy

    from torch.autograd import gradcheck, gradgradcheck

    from mmctx.models import norm_squeeze
    torch.manual_seed(0)
    channels = shape[1]
    norm = torch.nn.BatchNorm2d(
        channels, momentum=None if norm_mode == 'cumulative' else 0.1)
    squeeze = PointwiseConv2d(channels, maps, 1, bias=False)
    relu = torch.nn.ReLU(inplace=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias, 0, 0.5)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    norm.num_batches_tracked += 3
    norm.train(norm_mode != 'eval')
    norm, squeeze = norm.to(dtype), squeeze.to(dtype)
    x = torch.randn(shape, dtype=dtype)
    assert norm_squeeze.applies(norm, relu, squeeze, x)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype is torch.float64 else \
        dict(rtol=1e-4, atol=1e-4)
    for used in ('both', 'out', 'maps'):
        results = []
        for fused in (True, False):
            n, sq = copy.deepcopy(norm), copy.deepcopy(squeeze)
            xi = x.clone().requires_grad_()
            if fused:
                out, squeezed = norm_squeeze.norm_relu_squeeze(xi, n, sq)
            else:
                out = relu(n(xi))
                squeezed = F.conv2d(out, sq.weight)
            loss = 0
            for t, use in ((out, 'out'), (squeezed, 'maps')):
                if used in ('both', use):
                    loss = loss + (t * torch.linspace(
                        -1, 2, t.numel(), dtype=dtype).view_as(t)).sum()
            loss.backward()
            results.append([out, squeezed, xi.grad, sq.weight.grad,
                            n.weight.grad, n.bias.grad, n.running_mean,
                            n.running_var, n.num_batches_tracked])
        for f, r in zip(*results):
            torch.testing.assert_close(f, r, **tol)

    if dtype is torch.float32 or shape[-1] > 10:
        return
    # first and second derivatives of every input, the latter the plain
    # ops' on the saved inputs
    from mmctx.models.norm_gate import kernels
    running_mean, running_var = norm.running_mean.clone(), \
        norm.running_var.clone()

    def function(x, weight, norm_weight, norm_bias):
        return norm_squeeze._NormReLUSqueeze.apply(
            x, weight, norm_weight, norm_bias, running_mean, running_var,
            0.1, norm.eps, norm_mode != 'eval', kernels())

    inputs = (torch.randn(2, channels, 3, 4, dtype=dtype),
              squeeze.weight.detach().flatten(1), norm.weight.detach(),
              norm.bias.detach())
    inputs = [t.clone().requires_grad_() for t in inputs]
    assert gradcheck(function, inputs)
    assert gradgradcheck(function, inputs)
    out = inputs[0].detach()
    with pytest.raises(RuntimeError, match='grad_maps must be'):
        kernels().relu_few_maps_combine(
            out, out, out, inputs[1].detach(), out[:, :1], *norm.weight.data[
                None].expand(3, -1).double())


def test_norm_relu_squeeze_applies_only_where_it_computes_the_same():
    """norm_squeeze.applies: a SyncBN, a norm without affine parameters, a
    hooked norm, ReLU or squeeze, a squeeze with a bias or too many maps,
    a channels_last map and autocast take the plain ops."""
    from mmctx.models import norm_squeeze
    norm = torch.nn.BatchNorm2d(8).train()
    squeeze = PointwiseConv2d(8, 5, 1, bias=False)
    relu = torch.nn.ReLU(inplace=True)
    x = torch.randn(2, 8, 6, 6)
    assert norm_squeeze.applies(norm, relu, squeeze, x)
    assert not norm_squeeze.applies(torch.nn.SyncBatchNorm(8), relu,
                                    squeeze, x)
    assert not norm_squeeze.applies(torch.nn.BatchNorm2d(8, affine=False),
                                    relu, squeeze, x)
    assert not norm_squeeze.applies(norm, relu, PointwiseConv2d(8, 5, 1),
                                    x)
    assert not norm_squeeze.applies(norm, relu, PointwiseConv2d(8, 17, 1,
                                                                bias=False),
                                    x)
    assert not norm_squeeze.applies(
        norm, relu, squeeze, x.to(memory_format=torch.channels_last))
    assert not norm_squeeze.applies(norm, relu, squeeze, x[:1, :, :1, :1])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not norm_squeeze.applies(norm, relu, squeeze, x)
    for module in (norm, relu, squeeze):
        handle = module.register_forward_hook(lambda m, i, o: None)
        assert not norm_squeeze.applies(norm, relu, squeeze, x)
        handle.remove()
    assert norm_squeeze.applies(norm, relu, squeeze, x)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,size', [
    ((2, 5, 13, 17), (13, 17)),  # odd sizes: overlapping pooling windows
    ((3, 5, 28, 28), (14, 14)),  # a strided conv2
    ((1, 5, 4, 5), (2, 3)),  # smaller than the 10x10 grid
    ((1, 7, 40, 33), (40, 33))])  # five bias maps
@pytest.mark.parametrize('norm_mode', ['batch', 'cumulative', 'eval'])
def test_bias_maps_equal_the_plain_ops(dtype, shape, size, norm_mode):
    """SB's branch after the squeeze with bn2 and the ReLU on its maps in
    training as one function (bias_maps): the output, the gradients of the
    squeezed maps and of the branch norm's, the Conv1d's and bn2's weights
    and biases, the running statistics and batch counts equal the plain
    ops' (``spatial_bias_of_squeezed``, then bn2 on its slice of
    channels), with training norms (momentum, cumulative) or eval ones;
    first and second derivatives pass gradcheck."""
    import copy

    from torch.autograd import gradcheck, gradgradcheck

    from mmctx.models import bias_maps
    from mmctx.models.norm_gate import kernels, step_statistics
    torch.manual_seed(0)
    planes, k = 8, shape[1] - 2
    branch = SpatialBias(planes, num_bias=k)
    bn2 = torch.nn.BatchNorm2d(planes + k)
    for norm in (branch.norm, bn2):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias, 0, 0.5)
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.num_batches_tracked += 3
        norm.momentum = None if norm_mode == 'cumulative' else 0.1
    torch.nn.init.normal_(branch.mix.weight, 0, 0.1)
    branch.train(norm_mode != 'eval')
    bn2.train(norm_mode != 'eval')
    branch, bn2 = branch.to(dtype), bn2.to(dtype)
    maps = torch.randn(shape, dtype=dtype)
    part = slice(planes, None)
    assert bias_maps.applies(branch, bn2, maps, size)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype is torch.float64 else \
        dict(rtol=1e-4, atol=1e-4)
    results = []
    for fused in (True, False):
        br, bn = copy.deepcopy(branch), copy.deepcopy(bn2)
        mi = maps.clone().requires_grad_()
        if fused:
            out = bias_maps.bias_maps(br, mi, size, bn, part)
        else:  # as SBBottleneck.forward_train's plain ops
            mean, var, factor = step_statistics(bn)
            out = F.relu(F.batch_norm(
                br.spatial_bias_of_squeezed(mi, size), mean[part],
                var[part], bn.weight[part], bn.bias[part], bn.training,
                factor, bn.eps))
        (out * torch.linspace(-1, 2, out.numel(), dtype=dtype).view_as(
            out)).sum().backward()
        results.append([out, mi.grad, br.norm.weight.grad,
                        br.norm.bias.grad, br.mix.weight.grad,
                        br.mix.bias.grad, bn.weight.grad, bn.bias.grad,
                        br.norm.running_mean, br.norm.running_var,
                        br.norm.num_batches_tracked, bn.running_mean,
                        bn.running_var, bn.num_batches_tracked])
    for f, r in zip(*results):
        torch.testing.assert_close(f, r, **tol)

    if dtype is torch.float32 or shape[-1] > 20:
        return
    # first and second derivatives of every input, on a 3x3 grid (fewer
    # Conv1d weights to differentiate numerically)
    ops, small = kernels(), SpatialBias(planes, num_bias=k, pool_size=3)
    stats = [(norm.running_mean[sl].clone(), norm.running_var[sl].clone(),
              0., norm.eps, False) if norm_mode == 'eval' else
             (None, None, 0.1, norm.eps, True)
             for norm, sl in ((branch.norm, slice(None)), (bn2, part))]

    def function(maps, *params):
        return bias_maps._BiasMaps.apply(maps, *params, *stats, 3, size,
                                         ops)

    inputs = [maps, branch.norm.weight, branch.norm.bias,
              small.mix.weight.to(dtype), small.mix.bias.to(dtype),
              bn2.weight[part], bn2.bias[part]]
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    assert gradcheck(function, inputs)
    assert gradgradcheck(function, inputs)


def test_bias_maps_apply_only_where_they_compute_the_same():
    """bias_maps.applies: max pooling, add fusion, a SyncBN, norms without
    affine parameters, a hooked norm, pooling or Conv1d, a channels_last
    map, a single value per channel in training and autocast take the
    plain ops."""
    from mmctx.models import bias_maps
    branch = SpatialBias(8).train()
    bn2 = torch.nn.BatchNorm2d(11).train()
    maps, size = torch.randn(2, 5, 6, 6), (6, 6)
    assert bias_maps.applies(branch, bn2, maps, size)
    assert not bias_maps.applies(SpatialBias(8, pool_type='max'), bn2, maps,
                                 size)
    assert not bias_maps.applies(SpatialBias(8, fusion='add'), bn2, maps,
                                 size)
    assert not bias_maps.applies(branch, torch.nn.SyncBatchNorm(11), maps,
                                 size)
    assert not bias_maps.applies(
        branch, torch.nn.BatchNorm2d(11, affine=False), maps, size)
    assert not bias_maps.applies(
        branch, bn2, maps.to(memory_format=torch.channels_last), size)
    assert not bias_maps.applies(branch, bn2, maps[:1], (1, 1))
    assert not bias_maps.applies(branch, bn2, maps[:1, :, :1, :1], size)
    assert not bias_maps.applies(branch, bn2, maps.double(), size)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not bias_maps.applies(branch, bn2, maps, size)
    for module in (branch.norm, branch.pool, branch.mix):
        handle = module.register_forward_hook(lambda m, i, o: None)
        assert not bias_maps.applies(branch, bn2, maps, size)
        handle.remove()
    assert bias_maps.applies(branch, bn2, maps, size)


@pytest.mark.parametrize('norm_eval', [False, True])
def test_sb_resnet_training_skips_the_concatenation_exactly(norm_eval):
    """SB-ResNet training (SBBottleneck.forward_train): bn2 on conv2's map
    and on the bias maps apart (the branch with bn2 on its maps as one
    function), conv3 at ResNet's width and bn3 of it plus
    the bias maps' rank-k term with the add and the ReLU as one function
    give the upstream forward's outputs, the gradients of the input and of
    every parameter, and the running statistics (momentum and cumulative)
    and batch counts, at two sizes and batch 1 (float64), with training
    norms and with frozen ones (``norm_eval=True``); activation
    checkpointing, SyncBN and a hooked bn3 take the upstream forward;
    second derivatives are autograd's."""
    import copy

    from torch.autograd import gradgradcheck

    from mmctx.models import SBResNet, bias_maps, norm_rank, norm_squeeze
    from mmctx.models.backbones.sb_resnet import SBBottleneck
    torch.manual_seed(0)
    fast = SBResNet(depth=50, stage_with_sb=(True, True), base_channels=16,
                    num_stages=2, out_indices=(0, 1), strides=(1, 2),
                    dilations=(1, 1), norm_eval=norm_eval)
    fast.init_weights()
    _randomise_backbone(fast)
    fast.layer1[0].norm2.momentum = fast.layer2[1].norm3.momentum = None
    fast.double().train()
    plain = copy.deepcopy(fast)
    trained, fused, heads, branches = [], [], [], []
    real_train, real_tail, real_head = SBBottleneck.forward_train, \
        norm_rank.rank_norm_add_relu, norm_squeeze.norm_relu_squeeze
    real_branch = bias_maps.bias_maps

    def counted_branch(*args):
        branches.append(args)
        return real_branch(*args)

    def counted(block, x):
        trained.append(block)
        return real_train(block, x)

    def counted_tail(*args):
        fused.append(args)
        return real_tail(*args)

    def counted_head(*args):
        heads.append(args)
        return real_head(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SBBottleneck, 'forward_train', counted)
        patch.setattr(norm_rank, 'rank_norm_add_relu', counted_tail)
        patch.setattr(norm_squeeze, 'norm_relu_squeeze', counted_head)
        patch.setattr(bias_maps, 'bias_maps', counted_branch)
        for shape in [(2, 3, 64, 48), (1, 3, 40, 72)]:
            x = torch.randn(shape, dtype=torch.float64)
            for calls in (trained, fused, heads, branches):
                calls.clear()
            outs, grads = backbone_grads(fast, x)
            # every SB block, bn1 + ReLU + squeeze, the tail and (without
            # norm_eval, where the branch norm's statistics hook updates
            # its running statistics) the branch fused
            assert len(trained) == len(fused) == len(heads) == 7
            assert len(branches) == (0 if norm_eval else 7)
            with pytest.MonkeyPatch.context() as upstream:
                upstream.setattr(SBBottleneck, '_training_applies',
                                 lambda block, x: False)
                ref_outs, ref_grads = backbone_grads(plain, x)
            for f, r in zip(outs + grads, ref_outs + ref_grads):
                torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9)
            for (name, f), r in zip(fast.state_dict().items(),
                                    plain.state_dict().values()):
                torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9,
                                           msg=name)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        block = fast.layer1[1]
        for case in ('with_cp', 'SyncBN', 'hook'):
            trained.clear()
            if case == 'with_cp':
                block.with_cp = True
                fast(x)
                block.with_cp = False
            elif case == 'SyncBN':
                norm3 = block.norm3
                sync = torch.nn.SyncBatchNorm(norm3.num_features).double()
                block.add_module(block.norm3_name, sync)
                fast.train()  # norm_eval: SyncBN in eval mode is fused
                sync.train()
                fast(x)
                block.add_module(block.norm3_name, norm3)
                fast.train()
            else:
                handle = block.norm3.register_forward_hook(
                    lambda m, i, o: None)
                fast(x)
                handle.remove()
            # only the changed block runs upstream's
            assert len(trained) == 6 and block not in trained, case

    # second derivatives through the fused tail
    norm = torch.nn.BatchNorm2d(4, track_running_stats=norm_eval).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    if norm_eval:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.eval()

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    z, identity = leaf(2, 4, 3, 3), leaf(2, 4, 3, 3)
    maps, rank = leaf(2, 2, 3, 3).detach().abs().requires_grad_(), leaf(4, 2)
    assert norm_rank.applies(norm, z, identity, maps, norm)
    assert gradgradcheck(
        lambda *t: norm_rank.rank_norm_add_relu(*t, norm),
        (z, maps, rank, identity))


def test_eval_affine_follows_every_change_of_the_norm():
    """utils.eval_affine: an eval BatchNorm as (scale, shift), equal to the
    norm after every kind of change, including one through ``.data`` that
    leaves the version counters alone (mmengine's EMAHook swaps parameters
    that way before validation), and in the dtype asked for; without
    autograd one C++ call (in double) gives what the tensor ops give."""
    from mmctx.models import utils
    from mmctx.models.norm_gate import kernels
    from mmctx.models.utils import eval_affine
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(6).eval()
    for t in (norm.weight, norm.bias, norm.running_mean):
        torch.nn.init.normal_(t.data)
    norm.running_var.data.uniform_(0.5, 2)
    x = torch.randn(2, 6, 3, 3)

    def check():
        scale, shift = eval_affine(norm)
        torch.testing.assert_close(x * scale[:, None, None]
                                   + shift[:, None, None], norm(x))

    with torch.no_grad():
        check()
        norm.running_mean.add_(1)  # in place
        check()
        version = norm.weight._version
        norm.weight.data.copy_(torch.randn(6))  # an EMA swap
        assert norm.weight._version == version
        check()
        norm.weight = torch.nn.Parameter(norm.weight.detach() * 2)
        check()
        assert eval_affine(norm, torch.float64)[0].dtype == torch.float64
        assert eval_affine(norm)[0].dtype == torch.float32
        for dtype in (torch.float32, torch.float64):
            tensors = (norm.weight, norm.bias, norm.running_mean,
                       norm.running_var)
            assert utils._affine_loops(tensors, dtype) is kernels()
            loops = eval_affine(norm, dtype)
            ops = utils.norm_affine(*(t.to(dtype) for t in tensors[2:]),
                                    *(t.to(dtype) for t in tensors[:2]),
                                    norm.eps)[1:]
            for got, expected in zip(loops, ops):
                assert got.dtype == dtype
                torch.testing.assert_close(got, expected)
        double = torch.nn.BatchNorm2d(6).double().eval()
        assert eval_affine(double)[0].dtype == torch.float64
        assert utils._affine_loops(
            (norm.weight, norm.bias, norm.running_mean,
             norm.running_var.double()), torch.float32) is None
        with pytest.raises(RuntimeError, match='one dtype and size'):
            kernels().norm_scale_shift(norm.weight, norm.bias,
                                       norm.running_mean[:3],
                                       norm.running_var, 1e-5, False)
    assert utils._affine_loops((norm.weight, ), torch.float32) is None
    assert eval_affine(norm)[0].requires_grad  # autograd records


def test_idle_statistics_hook_does_not_count_as_a_hook():
    """The context norms' statistics pre-hook (TrainableContextMixin) keeps
    fast paths off a norm only while it has work (``norm_eval`` training);
    in inference it does nothing and utils.hooked ignores it, so SB's
    branch takes its C++ path in an mmctx backbone; other hooks count."""
    from mmctx.models import SBResNet
    from mmctx.models.utils import hooked
    net = SBResNet(depth=50, base_channels=16, num_stages=1,
                   out_indices=(0, ), strides=(1, ), dilations=(1, ),
                   stage_with_sb=(True, ), norm_eval=True)
    norm = net.layer1[0].spatial_bias.norm
    assert norm._forward_pre_hooks  # the statistics hook
    net.train()
    assert hooked(norm)  # norm_eval training: it updates the statistics
    net.eval()
    assert not hooked(norm)
    handle = norm.register_forward_pre_hook(lambda m, i: None)
    assert hooked(norm)
    handle.remove()
    calls = []
    real = SpatialBias.inference_bias
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpatialBias, 'inference_bias',
                      lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            net(torch.randn(1, 3, 32, 32))
    assert len(calls) == 3


def backbone_grads(net, x):
    """module_grads for a backbone's tuple of stage outputs."""
    net.double().zero_grad()
    x = x.double().requires_grad_()
    outs = net(x)
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(
        o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [x.grad] + [
        p.grad.clone() for p in net.parameters()
    ]


def _randomise_backbone(net):
    """Real (non-initial) weights and BN statistics, so every gate and
    every path carries a signal."""
    for name, t in net.state_dict().items():
        if name.endswith('running_var'):
            t.uniform_(0.5, 2)
        elif t.is_floating_point() and t.dim() == 1:
            t.normal_(0, 0.5)
        elif t.is_floating_point() and t.dim() > 1 and 'conv' not in name \
                and 'downsample' not in name:
            t.normal_(0, 0.05)


@pytest.mark.parametrize('backbone', [
    dict(type='GEResNet', ge=dict(variant='parameter_free')),
    dict(type='GEResNet', ge=dict(variant='depthwise_excite')),
    dict(type='GEResNet', ge=dict(variant='depthwise', extent=2)),
    dict(type='PSIResNet', psi=dict(grid_size=4)),
    dict(type='GEResNet', ge=dict(variant='depthwise'), with_cp=True),
])
def test_gated_bottleneck_equals_the_upstream_block(backbone, monkeypatch):
    """GE / PSI blocks apply the gate and the residual add in one pass
    (GatedBottleneck); the upstream forward (gate, then ``out +=
    identity``) gives the same outputs and the same gradients for the input
    and every parameter, in training and in inference, at the reference
    size and another one."""
    from mmengine.registry import MODELS

    from mmctx.models.backbones.gated_bottleneck import GatedBottleneck
    torch.manual_seed(0)
    net = MODELS.build(dict(backbone, depth=14, reference_input_size=32))
    net.init_weights()
    _randomise_backbone(net)
    blocks = [m for m in net.modules() if isinstance(m, GatedBottleneck)]
    assert len(blocks) == 4
    residual_gate = GatedBottleneck.residual_gate
    used = []

    def record(block, x):
        gate = residual_gate(block, x)
        used.append(gate is not None)
        return gate

    state = {k: v.clone() for k, v in net.state_dict().items()}
    for mode in (True, False):
        for size in (32, 40):
            x = torch.randn(2, 3, size, size)
            results = []
            for fused in (True, False):
                net.load_state_dict(state)
                net.train(mode)
                used.clear()
                monkeypatch.setattr(
                    GatedBottleneck, 'residual_gate',
                    record if fused else lambda block, x: None)
                results.append(backbone_grads(net, x))
                assert used == ([True] * 4 if fused else [])
                net.load_state_dict(state)
                with torch.no_grad():  # inference (GE global: the fold)
                    results.append(net.double()(x.double()))
            fused, fused_inference, upstream, upstream_inference = results
            for a, b in zip(fused[0] + fused[1] + list(fused_inference),
                            upstream[0] + upstream[1] +
                            list(upstream_inference)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize('backbone', [
    dict(type='GEResNet', ge=dict(variant='parameter_free')),
    dict(type='GEResNet', ge=dict(variant='depthwise')),
    dict(type='GEResNet', ge=dict(variant='depthwise_excite')),
    dict(type='PSIResNet', psi=dict(grid_size=4)),
    dict(type='SBResNet'),
])
def test_backbones_keep_autocast_dtypes(backbone):
    """Under bfloat16 autocast, training and inference (GE: the norm3 fold)
    give the stage outputs of the plain ops: same dtypes, same values up to
    bfloat16 rounding (the fold once returned float32 there)."""
    from mmengine.registry import MODELS
    torch.manual_seed(0)
    cfg = dict(backbone, depth=14)
    if backbone['type'] != 'SBResNet':
        cfg['reference_input_size'] = 32
    net = MODELS.build(cfg)
    net.init_weights()
    _randomise_backbone(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for training in (True, False):
        for size in (32, 40):
            x = torch.randn(2, 3, size, size)
            outs = []
            for plain in (False, True):
                net.load_state_dict(state)
                net.train(training)
                with torch.set_grad_enabled(training), \
                        torch.autocast('cpu', dtype=torch.bfloat16), \
                        size_generic(plain):
                    outs.append(net(x))
            for fast, ref in zip(*outs):
                assert fast.dtype == ref.dtype, (training, size)
                torch.testing.assert_close(fast.float(), ref.float(),
                                           rtol=0.05, atol=0.05)


def test_gated_bottleneck_keeps_a_hooked_gate_on_the_upstream_path():
    """A forward hook on the gate sees the gate's own output (not the
    block's sum), so a hooked gate runs the upstream forward."""
    from mmctx.models import PSIResNet
    torch.manual_seed(0)
    net = PSIResNet(depth=14, reference_input_size=32,
                    psi=dict(grid_size=4)).eval()
    gate = net.layer1[0].patch_spatial_interaction
    seen = []
    # (a clone: the upstream block then adds the identity in place)
    gate.register_forward_hook(
        lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    (x, out), = seen
    torch.testing.assert_close(out, gate(x))


def test_flop_counters_trace_the_adaptive_pool():
    """Traced with the eager paths kept (complexity.py's FLOP count),
    resample_to records ``adaptive_avg_pool2d``, an op FLOP counters know,
    not the banded GEMMs' custom function."""
    from mmctx.models.utils import resample_to
    x = torch.randn(1, 4, 20, 30)
    with size_generic(False):
        graph = torch.jit.trace(lambda t: resample_to(t, (7, 7)), x).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert 'aten::adaptive_avg_pool2d' in kinds, kinds
    assert 'prim::PythonOp' not in kinds, kinds


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_ge_excite_as_linear_matches_its_convs(dtype):
    """GE-θ⁺'s excite on a (B, C, 1, 1) context runs as ``F.linear`` with
    the convs' weights: same output and the same gradients of the context
    and of every excite parameter as ``self.excite``; a map context, a
    traced graph and a hooked conv use the convs."""
    torch.manual_seed(0)
    ge = GatherExcite(32, variant='depthwise_excite', extent='global',
                      feature_size=4, reduction=4).to(dtype)
    for p in ge.excite.parameters():  # init_weights zeroes the last conv
        torch.nn.init.normal_(p)
    params = list(ge.excite.parameters())

    def run(fn, context):
        context = context.detach().clone().requires_grad_()
        out = fn(context)
        weight = torch.linspace(-1, 2, out.numel(), dtype=dtype)
        grads = torch.autograd.grad((out.flatten() * weight).sum(),
                                    [context] + params)
        return out.detach(), grads

    for context in (torch.randn(3, 32, 1, 1, dtype=dtype),
                    torch.randn(1, 32, 1, 1, dtype=dtype)):
        assert_same(run(ge._excite, context), run(ge.excite, context), dtype)

    calls = []
    real = F.linear
    try:
        F.linear = lambda *a: calls.append(1) or real(*a)
        ge._excite(torch.randn(2, 32, 1, 1, dtype=dtype))
        assert len(calls) == 2  # the fast path ran
        calls.clear()
        ge._excite(torch.randn(2, 32, 3, 3, dtype=dtype))  # a map
        excite = torch.nn.Module()
        excite.ge = ge
        excite.forward = ge._excite
        torch.jit.trace(excite, torch.randn(2, 32, 1, 1, dtype=dtype),
                        check_trace=False)
        handle = ge.excite[2].register_forward_hook(lambda *a: None)
        ge._excite(torch.randn(2, 32, 1, 1, dtype=dtype))
        handle.remove()
        assert not calls  # each took the convs
    finally:
        F.linear = real


def test_psi_offset_pooling_after_inference_mode_trains(monkeypatch):
    """PSI's per-offset pooling matrices are kept per size; built first
    under ``torch.inference_mode`` (here without the C++ loops, which
    inference takes otherwise) they are still normal tensors, so a later
    training step at that size can save them for its backward."""
    from mmctx.models import patch_spatial_interaction
    monkeypatch.setattr(patch_spatial_interaction,
                        'offset_patch_loops_apply', lambda maps: False)
    torch.manual_seed(0)
    psi = PatchSpatialInteraction(16, feature_size=(16, 16), grid_size=4)
    x = torch.randn(2, 16, 12, 12)  # off the reference size
    with torch.inference_mode():
        expected = psi(x)
    x.requires_grad_()
    out = psi(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('feature_size, grid, size, batch', [
    ((64, 64), 16, (56, 56), 2),  # 16 offset maps, up-sampling windows
    ((64, 64), 16, (64, 64), 2),  # the reference size
    ((64, 64), 16, (200, 304), 1),  # down-sampling, non-square
    ((32, 32), 16, (28, 28), 3),  # 4 maps
    ((16, 16), 16, (14, 14), 2),  # one map, one pixel per patch
    ((12, 12), 4, (13, 9), 2),  # 9 maps, uneven windows both ways
])
def test_psi_offset_patch_loops_equal_the_pooling(dtype, feature_size, grid,
                                                  size, batch):
    """Without autograd, PSI's patch values from its per-offset maps come
    from C++ loops (``offset_patches``) that sum each map's windows at its
    own offset: equal to the per-offset pooling GEMMs and to resampling
    every map to the reference grid and picking each patch's pixel, with
    the gate's outputs equal too; autograd, export and missing loops keep
    the torch ops; bad maps are refused by name."""
    from mmctx.models import norm_gate, patch_spatial_interaction
    from mmctx.models.utils import resample_to
    torch.manual_seed(0)
    psi = PatchSpatialInteraction(8, feature_size=feature_size,
                                  grid_size=grid).to(dtype)
    torch.nn.init.normal_(psi.squeeze.bias)
    torch.nn.init.normal_(psi.mlp[-1].weight)  # a gate that varies
    (ph, pw), (gh, gw) = psi.squeeze.kernel_size, psi.grid
    maps = torch.randn(batch, ph * pw, *size, dtype=dtype)
    assert patch_spatial_interaction.offset_patch_loops_apply(maps)
    with torch.no_grad():
        fast = psi.patches_of_offset_maps(maps)
    recorded = maps.clone().requires_grad_()
    assert not patch_spatial_interaction.offset_patch_loops_apply(recorded)
    plain = psi.patches_of_offset_maps(recorded)
    picked = resample_to(maps, feature_size).reshape(
        batch, ph, pw, gh, ph, gw, pw)
    picked = torch.einsum('zijaibj->zab', picked) + psi.squeeze.bias
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    assert fast.dtype == dtype and fast.shape == (batch, gh, gw)
    torch.testing.assert_close(fast, plain.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(fast, picked, rtol=tol, atol=tol)
    x = torch.randn(batch, 8, *size, dtype=dtype)
    with torch.no_grad():
        fast_gate = psi(x)
    torch.testing.assert_close(fast_gate, psi(x).detach(), rtol=tol,
                               atol=tol)
    with size_generic():
        assert not patch_spatial_interaction.offset_patch_loops_apply(maps)
    applied = []

    def traced(maps):  # a FLOP counter's trace: no loops, whose output
        applied.append(  # the trace would keep as a constant
            patch_spatial_interaction.offset_patch_loops_apply(maps))
        return psi.patches_of_offset_maps(maps)

    psi.requires_grad_(False)  # its parameters: constants of the trace
    # the eager paths, as tools/analysis/complexity.py counts them
    with torch.no_grad(), size_generic(False):
        graph = torch.jit.trace(traced, (maps, ), check_trace=False)
    assert applied == [False]
    torch.testing.assert_close(graph(maps * 2), plain.detach() * 2
                               - psi.squeeze.bias, rtol=tol, atol=tol)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_gate, 'kernels', lambda: None)
        assert not patch_spatial_interaction.offset_patch_loops_apply(maps)
    ops = norm_gate.kernels()
    with pytest.raises(RuntimeError, match='maps must hold ph \\* pw'):
        ops.offset_patches(maps, ph + 1, pw, gh, gw)
    with pytest.raises(RuntimeError, match='maps must be a contiguous'):
        ops.offset_patches(maps.transpose(2, 3), ph, pw, gh, gw)


def test_empty_batches_take_the_tensor_ops():
    """An empty batch (or map) in inference gives empty outputs shaped like
    ResNet-50's: the compiled loops, whose per-row arithmetic divides by
    the rows and pixels, step aside (``size_generic_path``). Run in a
    subprocess: before the fix the loops died of SIGFPE (exit 136) at
    batch 0 and took the test runner with them."""
    import subprocess
    import sys
    code = '''
import torch
from mmengine.registry import MODELS
import mmctx  # noqa: F401
from mmctx.models import GatherExcite, SpatialBias
for cfg in [dict(type='mmdet.ResNet'),
            dict(type='GEResNet', ge=dict(variant='parameter_free')),
            dict(type='GEResNet', ge=dict(variant='depthwise')),
            dict(type='GEResNet', ge=dict(variant='depthwise_excite')),
            dict(type='SBResNet'), dict(type='PSIResNet')]:
    if cfg['type'] in ('GEResNet', 'PSIResNet'):
        cfg = dict(cfg, reference_input_size=64)
    net = MODELS.build(dict(cfg, depth=50, base_channels=16))
    net.init_weights()
    net.eval()
    for shape in [(0, 3, 64, 64), (0, 3, 80, 48)]:
        with torch.no_grad():
            outs = net(torch.randn(shape))
        assert [tuple(o.shape[:2]) for o in outs] == [
            (0, 64), (0, 128), (0, 256), (0, 512)], (cfg, outs)
for module, x in [(GatherExcite(8, variant='depthwise_excite',
                                extent='global', feature_size=4,
                                reduction=2), torch.randn(0, 8, 6, 6)),
                  (SpatialBias(8), torch.randn(0, 8, 6, 6))]:
    with torch.no_grad():
        assert module.eval()(x).shape[0] == 0
print('ok')
'''
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().endswith('ok')
