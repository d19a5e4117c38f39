"""Every upstream ResNet option with every mmctx backbone, against upstream.

Each mmctx backbone (plain ContextResNet, SBResNet, GEResNet, PSIResNet, and
their ResNetV1c / ResNetV1d / ResNeXt versions: ContextResNeXt, SBResNeXt,
...) is built with one upstream option at a time and compared with the
upstream backbone of its family built with the same option (mmdet's; mmseg's
for ResNetV1c and for mmseg's own options ``contract_dilation`` and
``multi_grid``):

- structure: every upstream parameter and buffer exists under the same name
  with the same shape (SB's widened bn2 / conv3: ``num_bias`` more
  channels), the same ``requires_grad`` (frozen stages), the same layer
  types (DCN, GroupNorm, SyncBN), strides, dilations and paddings;
- forward: the same output shapes for a non-square input;
- with the context turned off (stage flags all False), loaded with the
  upstream network's weights, the same outputs.
"""
import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401

SMALL = dict(depth=50, base_channels=16)
INPUT = (2, 3, 80, 112)
SB = dict(sb=dict(num_bias=3, pool_size=4))
GE = dict(ge=dict(variant='depthwise_excite', extent='global', reduction=4),
          reference_input_size=(80, 112))
PSI = dict(psi=dict(grid_size=4), reference_input_size=(80, 112))
BACKBONES = {'ContextResNet': {}, 'SBResNet': SB, 'GEResNet': GE,
             'PSIResNet': PSI}
# family: upstream registry of its options ('mmdet' unless only mmseg has
# the family), the family's own arguments
FAMILIES = {
    'ResNet': (None, {}),
    # (mmseg's stem_channels default is 64 whatever base_channels is)
    'ResNetV1c': ('mmseg', dict(stem_channels=16)),
    'ResNetV1d': (None, {}),
    # groups x group width 4 x 8 = 32 channels in conv2 of 16 planes
    'ResNeXt': (None, dict(groups=4, base_width=8)),
}
OFF = {'ContextResNet': {}, 'SBResNet': dict(stage_with_sb=(False, ) * 4),
       'GEResNet': dict(stage_with_ge=(False, ) * 4),
       'PSIResNet': dict(stage_with_psi=(False, ) * 4)}
DILATED = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
THREE = dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
             out_indices=(0, 1, 2))
# (id, options, upstream): upstream 'mmdet' or 'mmseg' (its options only)
OPTIONS = [
    ('defaults', {}, 'mmdet'),
    ('depth-101', dict(depth=101), 'mmdet'),
    ('depth-152', dict(depth=152), 'mmdet'),
    ('num_stages-3', THREE, 'mmdet'),
    ('strides-dilations', DILATED, 'mmdet'),
    ('out_indices', dict(out_indices=(1, 3)), 'mmdet'),
    ('style-caffe', dict(style='caffe'), 'mmdet'),
    ('deep_stem', dict(deep_stem=True), 'mmdet'),
    ('avg_down', dict(avg_down=True), 'mmdet'),
    ('frozen_stages-2', dict(frozen_stages=2), 'mmdet'),
    ('BN-frozen-norm_eval', dict(norm_cfg=dict(type='BN', requires_grad=False),
                                 norm_eval=True), 'mmdet'),
    ('SyncBN', dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
     'mmdet'),
    ('GN', dict(norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
     'mmdet'),
    ('norm_eval', dict(norm_eval=True), 'mmdet'),
    ('dcn', dict(dcn=dict(type='DCNv2', deform_groups=1,
                          fallback_on_stride=False),
                 stage_with_dcn=(False, True, True, True)), 'mmdet'),
    ('plugins', dict(plugins=[dict(
        cfg=dict(type='ContextBlock', ratio=1. / 4),
        stages=(False, True, True, True), position='after_conv3')]), 'mmdet'),
    ('with_cp', dict(with_cp=True), 'mmdet'),
    ('zero_init_residual-False', dict(zero_init_residual=False), 'mmdet'),
    ('stem_channels', dict(stem_channels=32), 'mmdet'),
    ('base_channels', dict(base_channels=32), 'mmdet'),
    # (mmseg's stem_channels default is 64 whatever base_channels is)
    ('contract_dilation', dict(DILATED, deep_stem=True, stem_channels=16,
                               contract_dilation=True), 'mmseg'),
    ('multi_grid', dict(DILATED, stem_channels=16, multi_grid=(1, 2, 4)),
     'mmseg'),
]


# the options the ResNetV1c / V1d / ResNeXt families are checked with (their
# blocks and stems are the ResNet's otherwise; deep_stem and avg_down are
# what V1c / V1d fix)
FAMILY_OPTIONS = ('defaults', 'style-caffe', 'frozen_stages-2', 'GN', 'dcn',
                  'plugins', 'with_cp', 'contract_dilation')
CASES = [(family, *option) for family in FAMILIES for option in OPTIONS
         if family == 'ResNet' or option[0] in FAMILY_OPTIONS]


def family_type(backbone, family):
    """'SBResNet' in family 'ResNeXt': 'SBResNeXt'."""
    return backbone.replace('ResNet', family)


def layer_signature(module):
    keys = ('stride', 'dilation', 'padding', 'kernel_size', 'groups',
            'num_groups')
    return (type(module).__name__,
            tuple(getattr(module, k, None) for k in keys))


def sb_widened(name, backbone, model):
    """SB's bn2 / conv3 of an SB block: upstream's + num_bias channels."""
    if not backbone.startswith('SB'):
        return False
    block = model.get_submodule(name.rsplit('.', 2)[0]) if name.count(
        '.') >= 2 else None
    return hasattr(block, 'spatial_bias') and \
        name.split('.')[2].startswith(('conv3', 'bn2', 'gn2', 'norm2'))


def run(model, x, train=False):
    model.train(train)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('backbone', list(BACKBONES))
@pytest.mark.parametrize('family,option,options,upstream', CASES,
                         ids=[f'{c[0]}-{c[1]}' for c in CASES])
def test_upstream_option(backbone, family, option, options, upstream):
    options = dict(options)
    small = dict(SMALL, **{k: options.pop(k) for k in ('depth', 'base_channels')
                           if k in options})
    small.update({k: v for k, v in FAMILIES[family][1].items()
                  if k not in options})
    if family in ('ResNetV1c', 'ResNetV1d'):
        options.pop('deep_stem', None)  # what the family sets
    upstream = FAMILIES[family][0] or upstream
    torch.manual_seed(0)
    ref = MODELS.build(dict(type=f'{upstream}.{family}', **small, **options))
    torch.manual_seed(0)
    extra = dict(BACKBONES[backbone])
    num_stages = options.get('num_stages', 4)
    kind, backbone = backbone, family_type(backbone, family)
    model = MODELS.build(dict(type=backbone, **small, **options, **extra))
    model.train()  # upstream's frozen_stages / norm_eval take effect
    ref.train()

    # structure: upstream's tensors, names, shapes and trainability
    ours = dict(model.named_parameters())
    ours_buffers = dict(model.named_buffers())
    for name, p in ref.named_parameters():
        if name not in ours:
            # SB's split pretrained slices (frozen stages) keep the name
            # with a suffix; SB's bn2 under GN is main + extra
            base, _, leaf = name.rpartition('.')
            assert f'{base}.{leaf}_pretrained' in ours or \
                f'{base}.main.{leaf}' in ours, (name, option)
            continue
        q = ours[name]
        if q.shape != p.shape:
            assert sb_widened(name, backbone, model), (name, q.shape, p.shape)
            assert q.shape[0 if 'conv3' not in name else 1] - \
                p.shape[0 if 'conv3' not in name else 1] == 3
        else:
            assert q.requires_grad == p.requires_grad, (name, option)
    for name, b in ref.named_buffers():
        if name in ours_buffers and not sb_widened(name, backbone, model):
            assert ours_buffers[name].shape == b.shape, name
    mods = dict(model.named_modules())
    for name, m in ref.named_modules():
        if name and (isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm)) or
                     'Norm' in type(m).__name__ or 'Conv' in type(m).__name__):
            if name not in mods:  # SB's GN bn2 is a ConcatNorm
                assert sb_widened(name, backbone, model), name
                continue
            mine = mods[name]
            if type(mine).__name__ == 'ConcatNorm':
                mine = mine.main
            if not sb_widened(name, backbone, model) or 'conv3' in name:
                assert layer_signature(mine)[1] == layer_signature(m)[1], \
                    (name, layer_signature(mine), layer_signature(m))
                assert type(mine).__name__ == type(m).__name__, name
    for attr in ('with_cp', 'style'):
        assert getattr(model.layer2[0], attr) == getattr(ref.layer2[0], attr)

    # forward: the same output shapes (eval: SyncBN needs no process group)
    x = torch.randn(*INPUT)
    outs, ref_outs = run(model, x), run(ref, x)
    assert [o.shape for o in outs] == [o.shape for o in ref_outs]
    assert len(outs) == len(options.get('out_indices', range(num_stages)))

    # context off, upstream's weights: upstream's outputs
    torch.manual_seed(0)
    extra_off = dict(extra, **{k: v[:num_stages]
                               for k, v in OFF[kind].items()})
    plain = MODELS.build(dict(type=backbone, **small, **options, **extra_off))
    missing, unexpected = plain.load_state_dict(ref.state_dict(),
                                                strict=False)
    assert not unexpected and not [k for k in missing if 'context' not in k]
    for a, b in zip(run(plain, x), ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backbone', ['SBResNet', 'GEResNet', 'PSIResNet'])
@pytest.mark.parametrize('depth', [18, 34])
def test_basic_block_depths_are_refused_by_name(backbone, depth):
    """The context modules sit in bottleneck blocks (README, backbones)."""
    with pytest.raises(ValueError, match=r'^depth must be one of'):
        MODELS.build(dict(type=backbone, depth=depth,
                          **BACKBONES[backbone]))


@pytest.mark.parametrize('num_stages', [1, 2, 3, 4])
@pytest.mark.parametrize('backbone', list(BACKBONES))
def test_stage_flags_follow_num_stages(backbone, num_stages):
    options = dict(num_stages=num_stages, strides=(1, 2, 2, 2)[:num_stages],
                   dilations=(1, ) * num_stages,
                   out_indices=tuple(range(num_stages)))
    model = MODELS.build(dict(type=backbone, **SMALL, **options,
                              **BACKBONES[backbone]))
    outs = run(model, torch.randn(*INPUT))
    assert len(outs) == num_stages
    # the defaults: SB in every stage but a fourth; GE / PSI everywhere
    with_context = [
        any(n in dict(getattr(model, f'layer{i + 1}').named_modules())
            for n in ('0.spatial_bias', '0.gather_excite',
                      '0.patch_spatial_interaction'))
        for i in range(num_stages)
    ]
    if backbone == 'ContextResNet':
        assert not any(with_context)
    elif backbone == 'SBResNet':
        assert with_context == [i < 3 for i in range(num_stages)]
    else:
        assert all(with_context)


GN = dict(type='GN', num_groups=8, requires_grad=True)


def test_sb_under_groupnorm():
    """conv2's channels keep the backbone's GN, the bias maps get GN(1); a
    plain GN ResNet's weights give the plain network's output at start,
    as a BN one does; the parameter count is BN's."""
    from mmctx.models.utils import ConcatNorm
    model = MODELS.build(dict(type='SBResNet', **SMALL, **SB, norm_cfg=GN))
    block = model.layer1[0]
    assert isinstance(block.norm2, ConcatNorm)
    assert (block.norm2.main.num_groups, block.norm2.main.num_channels) == \
        (8, 16)
    assert (block.norm2.extra.num_groups, block.norm2.extra.num_channels) \
        == (1, 3)
    norm = block.spatial_bias.norm
    assert (norm.num_groups, norm.num_channels) == (1, 5)
    bn = MODELS.build(dict(type='SBResNet', **SMALL, **SB))
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in bn.parameters())
    torch.manual_seed(1)
    plain = MODELS.build(dict(type='mmdet.ResNet', **SMALL, norm_cfg=GN))
    for p in plain.parameters():  # no zero-initialised residual branches
        torch.nn.init.normal_(p, 0.0, 0.1)
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(*INPUT)
    for a, b in zip(run(model, x), run(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # frozen stages: the bias maps' norm keeps training
    frozen = MODELS.build(dict(type='SBResNet', **SMALL, **SB, norm_cfg=GN,
                               frozen_stages=1))
    frozen.train()
    trainable = {n for n, p in frozen.layer1.named_parameters()
                 if p.requires_grad}
    assert {'0.gn2.extra.weight', '0.gn2.extra.bias'} <= trainable
    assert '0.gn2.main.weight' not in trainable


@pytest.mark.parametrize('cfg,message', [
    (dict(norm_cfg=dict(type='LN')), r'^norm_cfg must be a per-channel'),
    (dict(norm_cfg=dict(type='GN', num_groups=3)),
     r'^norm_cfg: GroupNorm num_groups must divide'),
    (dict(norm_cfg=GN, sb=dict(norm_cfg=dict(type='GN', num_groups=2))),
     r'^sb: norm_cfg: GroupNorm num_groups must divide the 5 channels'),
])
def test_norms_sb_cannot_use_are_refused_by_name(cfg, message):
    with pytest.raises(ValueError, match=message):
        MODELS.build(dict(type='SBResNet', **SMALL, **cfg))


def test_sb_after_conv2_plugin_sees_conv2_output_with_the_bias_maps():
    """Upstream builds after_conv2 plugins for planes channels; in an SB
    block they come after the concatenation, so they take planes + k."""
    model = MODELS.build(dict(
        type='SBResNet', **SMALL, **SB, plugins=[dict(
            cfg=dict(type='ContextBlock', ratio=1. / 4),
            stages=(True, False, False, False), position='after_conv2')]))
    block = model.layer1[0]
    plugin = getattr(block, block.after_conv2_plugin_names[0])
    assert plugin.in_channels == 16 + 3
    seen = []
    plugin.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    run(model, torch.randn(*INPUT))
    assert seen and set(seen) == {19}
