"""SB, GE and PSI modules: equal to plain reference formulations at the
reference size, usable at any size, and strict about their arguments."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.models import GatherExcite, PatchSpatialInteraction, SpatialBias


def randomize(module, seed=0):
    """Non-trivial weights and BN statistics everywhere (init zeroes some)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, b in module.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    module.eval()
    return module


def bn(x, norm):
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight,
                        norm.bias, False, 0.0, norm.eps)


# ---------------------------------------------------------------- references
def reference_spatial_bias(m, a, out_hw):
    """The paper's SB steps, written out (batch-safe, size from the target)."""
    r, k = m.pool_size, m.num_bias
    x = F.relu(bn(F.conv2d(a, m.squeeze.weight), m.norm))
    x = F.adaptive_avg_pool2d(x, r)
    b, c = x.shape[:2]
    x = x.view(b, c, r * r).permute(0, 2, 1)  # (B, r*r, k+2)
    x = F.conv1d(x, m.mix.weight, m.mix.bias)  # (B, r*r, k)
    x = x.permute(0, 2, 1).reshape(b, k, r, r)
    if out_hw is None:
        return x
    # The reference upsamples by a scale factor (valid at the reference size)
    return F.interpolate(x, scale_factor=out_hw / r, mode='bilinear',
                         align_corners=False)


def reference_gather_excite(m, x):
    h, w = x.shape[-2:]
    if m.variant == 'parameter_free':
        if m.extent == 'global':
            g = F.adaptive_avg_pool2d(x, 1)
        else:  # GENet's overlapping windows (timm's GatherExcite)
            e = m.extent
            g = F.avg_pool2d(x, 2 * e - 1, e, e - 1, count_include_pad=False)
    elif m.extent == 'global':
        g = bn(F.conv2d(x, m.gather.weight, groups=x.shape[1]),
               m.gather_norms[0])
    else:
        g = x
        for i, (conv, norm) in enumerate(zip(m.gather, m.gather_norms)):
            if i:
                g = F.relu(g)
            g = bn(F.conv2d(g, conv.weight, stride=2, padding=1,
                            groups=x.shape[1]), norm)
    if m.variant == 'depthwise_excite':
        e1, e2 = m.excite[0], m.excite[2]
        g = F.conv2d(F.relu(F.conv2d(F.relu(g), e1.weight, e1.bias)),
                     e2.weight, e2.bias)
    g = F.interpolate(g, size=(h, w), mode='nearest')
    return x * torch.sigmoid(g)


def reference_psi(m, x, patch, grid):
    b = x.shape[0]
    s = F.conv2d(x, m.squeeze.weight, m.squeeze.bias, stride=patch)
    v = s.view(b, grid * grid)
    v = m.mlp[2](F.relu(m.mlp[0](v)))
    w = torch.sigmoid(v).view(b, 1, grid, grid)
    return x * F.interpolate(w, size=x.shape[-2:], mode='nearest')


# ------------------------------------------------------------- equality tests
@pytest.mark.parametrize('size,stride', [(56, 1), (56, 2), (28, 1), (14, 2)])
def test_spatial_bias_matches_reference(size, stride):
    m = randomize(SpatialBias(64, num_bias=3, pool_size=10))
    a = torch.randn(2, 64, size, size)
    target = torch.randn(2, 64, size // stride, size // stride)
    out = m(a, target)
    assert out.shape == (2, 67, size // stride, size // stride)
    assert torch.equal(out[:, :64], target)
    ref = reference_spatial_bias(m, a, size // stride)
    torch.testing.assert_close(out[:, 64:], ref, rtol=1e-5, atol=1e-5)


def test_spatial_bias_add_mode_is_identity_at_init_then_adds():
    m = SpatialBias(32, num_bias=2, pool_size=6, fusion='add')
    m.init_weights()
    m.eval()
    x = torch.randn(1, 32, 20, 24)
    assert m(x).shape == x.shape
    assert torch.equal(m(x), x)
    randomize(m)
    # add mode = x + proj(the bias maps at x's size)
    maps = F.interpolate(reference_spatial_bias(m, x, None), size=(20, 24),
                         mode='bilinear', align_corners=False)
    torch.testing.assert_close(m(x), x + m.proj(maps))


def test_spatial_bias_max_pool():
    m = randomize(SpatialBias(16, num_bias=1, pool_size=4, pool_type='max'))
    x = torch.randn(1, 16, 8, 8)
    pooled = F.adaptive_max_pool2d(
        F.relu(bn(F.conv2d(x, m.squeeze.weight), m.norm)), 4)
    maps = pooled.flatten(2).transpose(1, 2)
    bias = m.mix(maps).transpose(1, 2).reshape(1, 1, 4, 4)
    torch.testing.assert_close(
        m(x)[:, 16:], F.interpolate(bias, size=(8, 8), mode='bilinear'))


@pytest.mark.parametrize('variant', ['parameter_free', 'depthwise',
                                     'depthwise_excite'])
@pytest.mark.parametrize('extent', [2, 4, 8, 'global'])
def test_gather_excite_matches_reference(variant, extent):
    m = randomize(
        GatherExcite(32, variant=variant, extent=extent, feature_size=16))
    x = torch.randn(2, 32, 16, 16)
    torch.testing.assert_close(m(x), reference_gather_excite(m, x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('feature_size,patch,grid', [(64, 4, 16), (32, 2, 16),
                                                     (16, 1, 16), (8, 1, 8)])
def test_psi_matches_reference(feature_size, patch, grid):
    m = randomize(PatchSpatialInteraction(48, feature_size=feature_size))
    assert m.squeeze.kernel_size == (patch, patch)
    assert m.grid == (grid, grid)
    x = torch.randn(2, 48, feature_size, feature_size)
    # (PSI squeezes the channels before its pooling, which at the reference
    # size is the identity: the same sums in another order)
    torch.testing.assert_close(m(x), reference_psi(m, x, patch, grid),
                               rtol=1e-5, atol=5e-5)


def test_gates_start_constant():
    x = torch.randn(2, 32, 16, 16)
    for m in (GatherExcite(32, 'depthwise', 'global', feature_size=16),
              GatherExcite(32, 'depthwise_excite', 4),
              PatchSpatialInteraction(32, feature_size=16)):
        m.init_weights()
        m.train()
        torch.testing.assert_close(m(x), x * m.constant_gate)


# ------------------------------------------------------------ any input size
def all_modules():
    return [
        SpatialBias(16, num_bias=3, pool_size=10),
        SpatialBias(16, num_bias=3, pool_size=6, fusion='add'),
        SpatialBias(16, num_bias=2, pool_size=10, pool_type='max'),
        *(GatherExcite(16, v, e, feature_size=(7, 9), reduction=4)
          for v in ('parameter_free', 'depthwise', 'depthwise_excite')
          for e in (2, 4, 8, 'global')),
        PatchSpatialInteraction(16, feature_size=64),
        PatchSpatialInteraction(16, feature_size=(8, 12), grid_size=4),
    ]


@pytest.mark.parametrize('hw', [(1, 1), (3, 5), (7, 7), (33, 57), (64, 64)])
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('training', [True, False])
def test_modules_any_size(hw, batch, training):
    for m in all_modules():
        m.init_weights()
        randomize(m).train(training)
        x = torch.randn(batch, 16, *hw, requires_grad=True)
        out = m(x)
        channels = getattr(m, 'out_channels', 16)
        assert out.shape == (batch, channels, *hw), type(m).__name__
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        assert torch.isfinite(x.grad).all()
        for p in m.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_spatial_bias_any_target_size():
    m = randomize(SpatialBias(16))
    a = torch.randn(1, 16, 33, 57)
    out = m(a, torch.randn(1, 16, 17, 29))
    assert out.shape == (1, 19, 17, 29)


def official_local_gather_gate(x, e):
    """GE-θ⁻'s gate for extent ``e``, written from the GENet definition with
    loops: cell (a, b) of the ⌈H/e⌉ x ⌈W/e⌉ gathered map is the mean of the
    input pixels inside the (2e-1) x (2e-1) window at rows a*e - (e-1) ..
    a*e + (e-1) (likewise columns), clipped to the map (padding not
    counted); pixel (i, j) then takes cell (floor(i*⌈H/e⌉/H),
    floor(j*⌈W/e⌉/W)), nearest interpolation back to H x W."""
    height, width = x.shape[-2:]
    gh, gw = -(-height // e), -(-width // e)
    gathered = torch.empty(*x.shape[:2], gh, gw, dtype=torch.float64)
    for a in range(gh):
        for b in range(gw):
            rows = slice(max(a * e - (e - 1), 0), min(a * e + e, height))
            cols = slice(max(b * e - (e - 1), 0), min(b * e + e, width))
            gathered[..., a, b] = x[..., rows, cols].double().mean((2, 3))
    gate = torch.empty(*x.shape, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            gate[..., i, j] = gathered[..., i * gh // height, j * gw // width]
    return torch.sigmoid(gate)


@pytest.mark.parametrize('extent', [2, 4, 8])
@pytest.mark.parametrize('hw', [(16, 16), (7, 9), (33, 57), (56, 56),
                                (25, 8), (3, 2), (1, 1)])
def test_ge_parameter_free_local_gather_is_the_official_one(extent, hw):
    """GE-θ⁻ with extent 2/4/8 at square, odd, non-square and tiny sizes
    equals an independent re-implementation of the official definition."""
    m = GatherExcite(4, 'parameter_free', extent=extent)
    x = torch.rand(2, 4, *hw)
    expected = x.double() * official_local_gather_gate(x, extent)
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5,
                               atol=1e-6)
    assert m.context(x).shape[-2:] == (-(-hw[0] // extent),
                                        -(-hw[1] // extent))


def test_ge_e8_window_is_15x15_stride_8():
    """The paper's figure for e = 8: "Ave Pooling (15x15, stride 8)": the
    centre cell of a 24x24 map averages rows / cols 1..15."""
    m = GatherExcite(1, 'parameter_free', extent=8)
    x = torch.rand(1, 1, 24, 24)
    torch.testing.assert_close(m.context(x)[0, 0, 1, 1],
                               x[0, 0, 1:16, 1:16].mean())


def test_registered_in_root_registry():
    for name in ('SpatialBias', 'GatherExcite', 'PatchSpatialInteraction'):
        assert MODELS.get(name) is not None
    m = MODELS.build(dict(type='GatherExcite', in_channels=8, extent=2))
    assert isinstance(m, GatherExcite)


# -------------------------------------------------------------- bad arguments
@pytest.mark.parametrize('build,arg', [
    (lambda: SpatialBias(8, num_bias=8), 'num_bias'),
    (lambda: SpatialBias(8, num_bias=0), 'num_bias'),
    (lambda: SpatialBias(8, pool_size=0), 'pool_size'),
    (lambda: SpatialBias(8, pool_size=-3), 'pool_size'),
    (lambda: SpatialBias(8, pool_type='median'), 'pool_type'),
    (lambda: SpatialBias(8, fusion='mul'), 'fusion'),
    (lambda: GatherExcite(8, extent=3), 'extent'),
    (lambda: GatherExcite(8, extent=16), 'extent'),
    (lambda: GatherExcite(8, variant='theta'), 'variant'),
    (lambda: GatherExcite(8, 'depthwise', 'global'), 'feature_size'),
    (lambda: GatherExcite(8, 'depthwise', 'global', feature_size=0),
     'feature_size'),
    (lambda: GatherExcite(8, 'depthwise_excite', 2, reduction=16),
     'reduction'),
    (lambda: PatchSpatialInteraction(8, feature_size=None), 'feature_size'),
    (lambda: PatchSpatialInteraction(8, feature_size=16, grid_size=0),
     'grid_size'),
    (lambda: PatchSpatialInteraction(8, 16, hidden_ratio=0), 'hidden_ratio'),
])
def test_bad_arguments_raise_at_construction(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


def test_parameter_counts_per_block():
    # SPEC: 17*planes + 16 + 3*r^4 + r^2 for an SB block (k=3); the module
    # itself holds 5*planes + 10 + 3*r^4 + r^2 of them.
    planes, r = 64, 10
    m = SpatialBias(planes, num_bias=3, pool_size=r)
    assert sum(p.numel() for p in m.parameters()) == \
        5 * planes + 10 + 3 * r**4 + r**2
    assert math.isclose(
        sum(p.numel() for p in GatherExcite(8).parameters()), 0)
    assert isinstance(m.mix, nn.Conv1d) and m.mix.kernel_size == (3, )


@pytest.mark.parametrize('feature_size,grid,hw', [
    (64, 16, (56, 56)), (64, 16, (200, 304)), (32, 16, (33, 57)),
    (8, 16, (7, 7)), ((8, 12), 4, (5, 3)), (16, 16, (1, 1))])
def test_psi_away_from_reference_pools_to_it_first(feature_size, grid, hw):
    """Off the reference size PSI is PSI of the map average-pooled to the
    reference size, its weights mapped back to H x W (nearest)."""
    m = randomize(PatchSpatialInteraction(24, feature_size, grid_size=grid))
    x = torch.randn(2, 24, *hw)
    patches = m.squeeze(F.adaptive_avg_pool2d(x, m.feature_size))
    weights = m.mlp(patches.flatten(1)).sigmoid().view(2, 1, *m.grid)
    expected = x * F.interpolate(weights, size=hw, mode='nearest')
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)
