"""SB, GE and PSI in the ResNetV1c, ResNetV1d and ResNeXt families.

- exact parameter counts of SB-ResNeXt-50-32x4d and GE-θ⁺-ResNeXt-50,
  computed by hand (formulas below);
- stock checkpoints of each family, written here with random weights in
  the torchvision, open-mmlab (mmdet / mmseg) and mmpretrain layouts: the
  context backbones start as the plain pretrained backbone (same outputs);
- the context modules keep training in frozen stages;
- any input size, forward and backward.

(Every upstream option with each family, against upstream's structure and
outputs: tests/test_resnet_options.py.)
"""
import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401

from test_modules import randomize

X32x4d = dict(groups=32, base_width=4)
BLOCKS_50 = (3, 4, 6, 3)
SB = dict(sb=dict(num_bias=3, pool_size=10))
GE_PLUS = dict(ge=dict(variant='depthwise_excite', extent='global',
                       reduction=16), reference_input_size=224)
PSI = dict(psi=dict(grid_size=16), reference_input_size=256)
MODULES = {'SB': SB, 'GE': GE_PLUS, 'PSI': PSI}


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ formulas
def sb_block_params(planes, width, k=3, r=10):
    """What SB adds to a bottleneck whose conv2 has ``width`` channels
    (planes in a ResNet; groups x group width in a ResNeXt): the squeeze
    1x1 conv (width -> k + 2, no bias) and its BN; the Conv1d over the r x r
    grid positions (r^2 -> r^2, kernel 3, bias); bn2's k more channels
    (weight, bias); conv3's k more input channels (to 4 x planes)."""
    squeeze = width * (k + 2) + 2 * (k + 2)
    mix = r * r * r * r * 3 + r * r
    return squeeze + mix + 2 * k + k * 4 * planes


def ge_plus_block_params(channels, size, reduction=16):
    """GE-θ⁺ after conv3 (``channels`` = 4 x planes): a depthwise gather whose
    kernel spans the stage's ``size`` x ``size`` map at the reference input,
    its BN, and the SE excite (two 1x1 convs with bias)."""
    hidden = channels // reduction
    gather = channels * size * size + 2 * channels
    excite = channels * hidden + hidden + hidden * channels + channels
    return gather + excite


# ResNeXt-50-32x4d without its classifier: torchvision's resnext50_32x4d has
# 25,028,904 parameters with the 2048 -> 1000 fc (2,049,000)
RESNEXT50_32X4D = 25_028_904 - 2048 * 1000 - 1000


def test_resnext50_32x4d_is_upstream_and_torchvision_count():
    plain = MODELS.build(dict(type='ContextResNeXt', depth=50, **X32x4d))
    upstream = MODELS.build(dict(type='mmdet.ResNeXt', depth=50, **X32x4d))
    assert count(plain) == count(upstream) == RESNEXT50_32X4D == 22_979_904


def test_sb_resnext50_32x4d_parameter_count():
    """k = 3, r = 10, stages 1-3 (3 + 4 + 6 blocks); a 32x4d block of planes
    p has conv2 width 32 x floor(4 p / 64) = 2p."""
    added = sum(blocks * sb_block_params(planes=64 * 2**i, width=128 * 2**i)
                for i, blocks in enumerate(BLOCKS_50[:3]))
    assert added == 3 * 31_524 + 4 * 32_932 + 6 * 35_748 == 440_788
    model = MODELS.build(dict(type='SBResNeXt', depth=50, **X32x4d, **SB))
    assert count(model) == RESNEXT50_32X4D + added == 23_420_692
    # the same formula gives the SPEC's SB-ResNet-50 (17 planes + 16 +
    # 3 r^4 + r^2 per block; 25,986,620 with the 1000-class fc)
    resnet = sum(blocks * sb_block_params(planes=64 * 2**i, width=64 * 2**i)
                 for i, blocks in enumerate(BLOCKS_50[:3]))
    assert 25_557_032 + resnet == 25_986_620


def test_ge_plus_resnext50_parameter_count():
    """GE-θ⁺, global extent at 224 (maps 56 / 28 / 14 / 7), every block: it
    sits after conv3, whose output a ResNeXt shares with the ResNet, so it
    adds what it adds to ResNet-50 (33,637,592 - 25,557,032)."""
    added = sum(blocks * ge_plus_block_params(256 * 2**i, 56 // 2**i)
                for i, blocks in enumerate(BLOCKS_50))
    assert added == 33_637_592 - 25_557_032 == 8_080_560
    model = MODELS.build(dict(type='GEResNeXt', depth=50, **X32x4d,
                              **GE_PLUS))
    assert count(model) == RESNEXT50_32X4D + added == 31_060_464


# ------------------------------------------------- stock checkpoints per family
# family: (upstream backbone as mmdet / mmseg build it, its mmpretrain twin,
#          the mmctx type suffix, arguments)
FAMILIES = {
    'ResNeXt-50-32x4d': ('mmdet.ResNeXt', dict(
        type='mmpretrain.ResNeXt', depth=50, groups=32, width_per_group=4),
        'ResNeXt', dict(depth=50, **X32x4d)),
    'ResNetV1d-50': ('mmdet.ResNetV1d', dict(type='mmpretrain.ResNetV1d',
                                             depth=50),
                     'ResNetV1d', dict(depth=50)),
    'ResNetV1c-50': ('mmseg.ResNetV1c', dict(type='mmpretrain.ResNetV1c',
                                             depth=50),
                     'ResNetV1c', dict(depth=50)),
}


@pytest.fixture(scope='module')
def stock(tmp_path_factory):
    """Per family: the plain pretrained backbone (random weights and BN
    statistics) and checkpoints of it in each stock layout."""
    root = tmp_path_factory.mktemp('stock')
    fc = {'fc.weight': torch.randn(1000, 2048), 'fc.bias': torch.zeros(1000)}
    out = {}
    for family, (upstream, pretrain, _, args) in FAMILIES.items():
        torch.manual_seed(0)
        plain = randomize(MODELS.build(dict(args, type=upstream)), seed=1)
        state = plain.state_dict()
        # mmpretrain's own backbone (its stem and shortcut layout), with
        # the same tensors
        theirs = MODELS.build(pretrain)
        # (the same modules in the same order, under other names)
        theirs_state = theirs.state_dict()
        assert [v.shape for v in theirs_state.values()] == \
            [v.shape for v in state.values()]
        theirs.load_state_dict(dict(zip(theirs_state, state.values())))
        layouts = {
            # torchvision (resnext50_32x4d) / open-mmlab://resnext50_32x4d,
            # resnet50_v1c: a bare state dict
            'torchvision': {**state, **fc},
            # an mmdet / mmseg model: the backbone under state_dict
            'open-mmlab': {'meta': {}, 'state_dict': {
                f'backbone.{k}': v for k, v in state.items()}},
            # an mmpretrain classifier of its own ResNeXt / ResNetV1c / V1d
            'mmpretrain': {'state_dict': {
                **{f'backbone.{k}': v
                   for k, v in theirs.state_dict().items()},
                'head.fc.weight': fc['fc.weight'],
                'head.fc.bias': fc['fc.bias']}},
        }
        paths = {}
        for name, ckpt in layouts.items():
            paths[name] = str(root / f'{family}_{name}.pth')
            torch.save(ckpt, paths[name])
        theirs.eval()  # (upstream's train() returns None)
        out[family] = (plain, theirs, paths)
    return out


# SB in every layout; GE and PSI (whose start does not depend on the
# layout) in mmpretrain's, the one mmctx renames
LOADS = [(family, module, layout) for family in FAMILIES
         for module in MODULES
         for layout in ('torchvision', 'open-mmlab', 'mmpretrain')
         if module == 'SB' or layout == 'mmpretrain']


@pytest.mark.parametrize('family,module,layout', LOADS)
def test_starts_as_the_pretrained_backbone(family, module, layout, stock):
    plain, theirs, paths = stock[family]
    _, _, suffix, args = FAMILIES[family]
    model = MODELS.build(dict(
        args, type=f'{module}{suffix}', **MODULES[module],
        init_cfg=dict(type='Pretrained', checkpoint=paths[layout])))
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, ref = model(x), plain(x)
        # (mmpretrain's own network computes the same)
        assert torch.allclose(theirs(x)[-1], ref[-1], atol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------- context in frozen stages
@pytest.mark.parametrize('backbone', ['SBResNeXt', 'GEResNeXt', 'PSIResNeXt',
                                      'SBResNetV1d', 'SBResNetV1c'])
def test_context_trains_in_frozen_stages(backbone):
    """frozen_stages=1 with norm_eval (the detection configs): stage 1's
    pretrained tensors stay, its context parameters (SB's branch and its
    conv3 / bn2 entries, the GE / PSI modules) change in a training step."""
    module = backbone[:backbone.index('Res')]
    args = dict(depth=50, base_channels=16, frozen_stages=1, norm_eval=True,
                **MODULES[module])
    if 'ResNeXt' in backbone:
        args.update(groups=4, base_width=8)
    if module != 'SB':
        args['reference_input_size'] = 64
    # (random weights: zero-initialised layers would stop the gradient of
    # the layers before them in the first step)
    model = randomize(MODELS.build(dict(type=backbone, **args)), seed=2)
    model.train()
    before = {k: v.clone() for k, v in model.layer1.state_dict().items()}
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    optimizer.step()
    after = model.layer1.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    context = {k for k in before
               if any(n in k for n in ('spatial_bias', 'gather_excite',
                                       'patch_spatial_interaction'))
               and not k.endswith(('running_mean', 'running_var',
                                   'num_batches_tracked'))}
    assert context and context <= changed, sorted(context - changed)
    pretrained = {k for k in before if k not in context and not any(
        n in k for n in ('spatial_bias', 'gather_excite',
                         'patch_spatial_interaction'))}
    if module == 'SB':
        # conv3 / bn2 change only in their bias-map entries
        for i, block in enumerate(model.layer1):
            for name in ('conv3.weight', 'bn2.weight', 'bn2.bias'):
                key = f'{i}.{name}'
                assert key in changed
                dim = 1 if 'conv3' in key else 0
                assert torch.equal(before[key].narrow(dim, 0, block.width),
                                   after[key].narrow(dim, 0, block.width))
                pretrained.discard(key)
    assert not pretrained & changed, sorted(pretrained & changed)


# -------------------------------------------------------------- any input size
@pytest.mark.parametrize('backbone', [
    'ContextResNeXt', 'SBResNeXt', 'GEResNeXt', 'PSIResNeXt', 'SBResNetV1c',
    'GEResNetV1c', 'PSIResNetV1c', 'SBResNetV1d', 'GEResNetV1d',
    'PSIResNetV1d'])
def test_any_input_size(backbone):
    module = backbone[:backbone.index('Res')]
    args = dict(depth=50, base_channels=16, **MODULES.get(module, {}))
    if 'ResNeXt' in backbone:
        args.update(groups=4, base_width=8)
    model = MODELS.build(dict(type=backbone, **args))
    model.train()
    for shape in ((1, 3, 37, 53), (2, 3, 224, 160)):
        x = torch.randn(*shape, requires_grad=True)
        outs = model(x)
        sum(o.sum() for o in outs).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert [o.shape[-2:] for o in outs][-1] == \
            (-(-shape[2] // 32), -(-shape[3] // 32))


@pytest.mark.parametrize('cfg,message', [
    (dict(type='SBResNetV1d', avg_down=False),
     r'^avg_down must be True in SBResNetV1d'),
    (dict(type='GEResNetV1c', deep_stem=False),
     r'^deep_stem must be True in GEResNetV1c'),
    (dict(type='SBResNeXt', groups=0), r'^groups must be a positive int'),
    (dict(type='PSIResNeXt', base_width='4'),
     r'^base_width must be a positive int'),
    (dict(type='SBResNet', groups=32),
     r"^SBResNet got unknown arguments \['groups'\]"),
    (dict(type='SBResNeXt', groups=32, base_width=4,
          norm_cfg=dict(type='GN', num_groups=48)),
     r'^norm_cfg: GroupNorm num_groups must divide'),
])
def test_family_arguments_are_checked_by_name(cfg, message):
    with pytest.raises(ValueError, match=message):
        MODELS.build(dict(cfg, depth=50))
