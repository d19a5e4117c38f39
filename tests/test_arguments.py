"""No silent acceptance of arguments (docs/arguments.md, one test per row).

Every public argument of every module and backbone: a bad value or type
raises ValueError at construction, naming the argument and what it accepts,
both when the class is called directly and when MODELS.build builds a config
dict; each accepted boundary value builds; a module placed where it cannot
work fails at build time, naming the argument and what to use instead.
Models are kept tiny (few channels, ResNet-14) and never run forward, so the
file takes seconds.
"""
import re

import pytest
from mmcv.cnn import build_plugin_layer
from mmdet.models.backbones import ResNet
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.models import SBBottleneck

# Small backbones: ResNet-14 (one bottleneck per stage) with few channels.
TINY = dict(depth=14, base_channels=8, stem_channels=8)
TINY_CIFAR = dict(depth=11)


def build_both(type_, cfg):
    """Build ``type_`` with ``cfg`` directly and through MODELS.build."""
    cls = MODELS.get(type_)
    cls(**cfg)
    MODELS.build(dict(type=type_, **cfg))


def assert_both_raise(type_, cfg, *fragments):
    """Both ways of building raise ValueError whose message contains every
    fragment (argument names, accepted values, advice)."""
    cls = MODELS.get(type_)
    for build in (lambda: cls(**cfg),
                  lambda: MODELS.build(dict(type=type_, **cfg))):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, (fragment, message)


# ---------------------------------------------------------------- modules
# (type, base cfg, argument, bad value, fragments of the message besides
# the argument's name: the accepted values)
SB = ('SpatialBias', dict(in_channels=8))
GE = ('GatherExcite', dict(in_channels=8))
GE_GLOBAL = ('GatherExcite',
             dict(in_channels=8, variant='depthwise', feature_size=7))
PSI = ('PatchSpatialInteraction', dict(in_channels=8, feature_size=16))

POSITIVE_INT = 'a positive int'
MODULE_BAD = [
    # SpatialBias
    (*SB, 'in_channels', 0, POSITIVE_INT),
    (*SB, 'in_channels', 8.0, POSITIVE_INT),
    (*SB, 'in_channels', True, POSITIVE_INT),
    (*SB, 'num_bias', 0, POSITIVE_INT),
    (*SB, 'num_bias', 3.0, POSITIVE_INT),
    (*SB, 'num_bias', True, POSITIVE_INT),
    (*SB, 'num_bias', 8, 'smaller than in_channels (8)'),
    (*SB, 'pool_size', 0, POSITIVE_INT),
    (*SB, 'pool_size', 10.0, POSITIVE_INT),
    (*SB, 'pool_size', '10', POSITIVE_INT),
    (*SB, 'pool_type', 'median', "'avg', 'max'"),
    (*SB, 'pool_type', None, "'avg', 'max'"),
    (*SB, 'fusion', 'mul', "'concat', 'add'"),
    (*SB, 'conv_cfg', 'Conv2d', 'None or a dict with a "type" key'),
    (*SB, 'norm_cfg', None, 'a dict with a "type" key'),
    (*SB, 'norm_cfg', dict(requires_grad=True), 'a dict with a "type" key'),
    (*SB, 'init_cfg', 'kaiming', 'None, a dict or a list of dicts'),
    # GatherExcite
    (*GE, 'in_channels', -1, POSITIVE_INT),
    (*GE, 'variant', 'theta', "'parameter_free', 'depthwise', "
     "'depthwise_excite'"),
    (*GE, 'extent', 3, "2, 4, 8, 'global'"),
    (*GE, 'extent', 16, "2, 4, 8, 'global'"),
    (*GE, 'extent', 2.0, "2, 4, 8, 'global'"),
    (*GE, 'extent', True, "2, 4, 8, 'global'"),
    (*GE, 'extent', '2', "2, 4, 8, 'global'"),
    (*GE, 'extent', 'Global', "2, 4, 8, 'global'"),
    (*GE, 'feature_size', 0, 'a positive int or a pair (H, W)'),
    (*GE, 'feature_size', 7.0, 'a positive int or a pair (H, W)'),
    (*GE, 'feature_size', (7, 7, 7), 'a positive int or a pair (H, W)'),
    (*GE, 'feature_size', '7', 'a positive int or a pair (H, W)'),
    (*GE, 'reduction', 0, POSITIVE_INT),
    (*GE, 'reduction', 16.0, POSITIVE_INT),
    (*GE, 'norm_cfg', 'BN', 'a dict with a "type" key'),
    (*GE, 'init_cfg', 3, 'None, a dict or a list of dicts'),
    (*GE_GLOBAL, 'feature_size', None, 'GEResNet'),
    ('GatherExcite', dict(in_channels=8, variant='depthwise_excite',
                          extent=2), 'reduction', 16, 'at most in_channels'),
    # PatchSpatialInteraction
    (*PSI, 'in_channels', 0, POSITIVE_INT),
    (*PSI, 'feature_size', None, 'PSIResNet'),
    (*PSI, 'feature_size', 0, 'a positive int or a pair (H, W)'),
    (*PSI, 'feature_size', 16.0, 'a positive int or a pair (H, W)'),
    (*PSI, 'feature_size', [16], 'a positive int or a pair (H, W)'),
    (*PSI, 'grid_size', 0, POSITIVE_INT),
    (*PSI, 'grid_size', 16.0, POSITIVE_INT),
    (*PSI, 'hidden_ratio', 0, 'a number in (0, 1]'),
    (*PSI, 'hidden_ratio', 1.01, 'a number in (0, 1]'),
    (*PSI, 'hidden_ratio', -0.5, 'a number in (0, 1]'),
    (*PSI, 'hidden_ratio', float('nan'), 'a number in (0, 1]'),
    (*PSI, 'hidden_ratio', True, 'a number in (0, 1]'),
    (*PSI, 'hidden_ratio', '0.5', 'a number in (0, 1]'),
    (*PSI, 'init_cfg', 'x', 'None, a dict or a list of dicts'),
]


def _id(row):
    return f'{row[0]}-{row[2]}={row[3]!r}'


@pytest.mark.parametrize('type_,cfg,arg,value,accepted', MODULE_BAD,
                         ids=map(_id, MODULE_BAD))
def test_module_bad_argument(type_, cfg, arg, value, accepted):
    assert_both_raise(type_, dict(cfg, **{arg: value}), arg, accepted)


# (type, cfg) at the accepted boundaries
MODULE_GOOD = [
    ('SpatialBias', dict(in_channels=2, num_bias=1, pool_size=1)),
    ('SpatialBias', dict(in_channels=8, num_bias=7, pool_type='max',
                         fusion='add', conv_cfg=dict(type='Conv2d'),
                         norm_cfg=dict(type='GN', num_groups=1),
                         init_cfg=[dict(type='Kaiming', layer='Conv2d')])),
    ('GatherExcite', dict(in_channels=1)),
    ('GatherExcite', dict(in_channels=8, extent=8, variant='depthwise')),
    ('GatherExcite', dict(in_channels=8, extent=2, feature_size=(3, 5))),
    ('GatherExcite', dict(in_channels=16, variant='depthwise_excite',
                          extent=4, reduction=16)),
    ('GatherExcite', dict(in_channels=8, variant='depthwise_excite',
                          feature_size=(1, 9), reduction=1)),
    ('PatchSpatialInteraction', dict(in_channels=1, feature_size=1,
                                     grid_size=1, hidden_ratio=1)),
    ('PatchSpatialInteraction', dict(in_channels=8, feature_size=(6, 10),
                                     hidden_ratio=1e-3)),
    ('PatchSpatialInteraction', dict(in_channels=8, feature_size=[32, 64],
                                     grid_size=16, hidden_ratio=1.0)),
]


@pytest.mark.parametrize('type_,cfg', MODULE_GOOD,
                         ids=[f'{t}-{i}' for i, (t, _) in
                              enumerate(MODULE_GOOD)])
def test_module_accepted_boundaries(type_, cfg):
    build_both(type_, cfg)


def test_module_unknown_argument_names_it():
    # Python's own TypeError for an unknown keyword argument names it.
    for type_, cfg in (SB, GE, PSI):
        with pytest.raises(TypeError, match='colour'):
            MODELS.build(dict(type=type_, colour='red', **cfg))


def test_numpy_integers_are_integers():
    np = pytest.importorskip('numpy')
    module = MODELS.build(dict(type='GatherExcite', in_channels=np.int64(8),
                               extent=np.int64(4)))
    assert module.extent == 4 and type(module.extent) is int


# --------------------------------------------------------------- backbones
BACKBONE_TYPES = ('ContextResNet', 'SBResNet', 'GEResNet', 'PSIResNet')
ALL_DEPTHS = '[14, 18, 26, 34, 50, 101, 152]'
BOTTLENECK_DEPTHS = '[14, 26, 50, 101, 152]'
FLAGS4 = 'a tuple of 4 bools'

# Upstream ResNet arguments, checked by every backbone (ContextResNet base).
RESNET_BAD = [
    ('depth', 51, ALL_DEPTHS),
    ('depth', 50.0, ALL_DEPTHS),
    ('depth', '50', ALL_DEPTHS),
    ('depth', True, ALL_DEPTHS),
    ('in_channels', 0, POSITIVE_INT),
    ('in_channels', 3.0, POSITIVE_INT),
    ('stem_channels', 0, POSITIVE_INT),
    ('base_channels', 8.0, POSITIVE_INT),
    ('num_stages', 0, 'an int in [1, 4]'),
    ('num_stages', 5, 'an int in [1, 4]'),
    ('num_stages', 4.0, 'an int in [1, 4]'),
    ('strides', (1, 2, 2), 'a tuple of 4 positive ints'),
    ('strides', (1, 2, 2, 2.0), 'a tuple of 4 positive ints'),
    ('strides', (1, 2, 2, 0), 'a tuple of 4 positive ints'),
    ('dilations', (1, 1, 1), 'a tuple of 4 positive ints'),
    ('dilations', 1, 'a tuple of 4 positive ints'),
    ('out_indices', (0, 4), 'stage indices in [0, 3]'),
    ('out_indices', (-1, ), 'stage indices in [0, 3]'),
    ('out_indices', (), 'stage indices in [0, 3]'),
    ('out_indices', 3, 'stage indices in [0, 3]'),
    ('out_indices', (3.0, ), 'stage indices in [0, 3]'),
    ('style', 'tf', "'pytorch', 'caffe'"),
    ('deep_stem', 'yes', 'True or False'),
    ('deep_stem', 1, 'True or False'),
    ('avg_down', 0, 'True or False'),
    ('norm_eval', 'False', 'True or False'),
    ('with_cp', None, 'True or False'),
    ('zero_init_residual', 1, 'True or False'),
    ('frozen_stages', -2, 'an int in [-1, 4]'),
    ('frozen_stages', 5, 'an int in [-1, 4]'),
    ('frozen_stages', 1.0, 'an int in [-1, 4]'),
    ('frozen_stages', True, 'an int in [-1, 4]'),
    ('conv_cfg', 'Conv2d', 'None or a dict with a "type" key'),
    ('norm_cfg', dict(requires_grad=True), 'a dict with a "type" key'),
    ('norm_cfg', None, 'a dict with a "type" key'),
    ('dcn', 'DCNv2', 'None or a dict with a "type" key'),
    ('stage_with_dcn', (True, False, False, False), 'all False when dcn'),
    ('pretrained', 1, "init_cfg=dict(type='Pretrained'"),
    ('init_cfg', 'resnet50.pth', 'None, a dict or a list of dicts'),
    ('plugins', dict(cfg=dict(type='ContextBlock')), 'a list of dicts'),
    ('colour', 'red', 'accepted:'),
]


@pytest.mark.parametrize('type_', BACKBONE_TYPES)
@pytest.mark.parametrize('arg,value,accepted', RESNET_BAD,
                         ids=[f'{a}={v!r}' for a, v, _ in RESNET_BAD])
def test_resnet_bad_argument(type_, arg, value, accepted):
    if arg == 'depth' and type_ in ('GEResNet', 'PSIResNet', 'SBResNet'):
        accepted = BOTTLENECK_DEPTHS  # these need bottleneck blocks
    assert_both_raise(type_, dict(TINY, **{arg: value}), arg, accepted)


def test_stage_with_dcn_checked_with_dcn():
    dcn = dict(type='DCNv2', deform_groups=1, fallback_on_stride=False)
    for flags in ((True, False), (1, 0, 0, 0), ('no', ) * 4):
        assert_both_raise('ContextResNet',
                          dict(TINY, dcn=dcn, stage_with_dcn=flags),
                          'stage_with_dcn', FLAGS4)


# Upstream plugin entries: checked structure and placement.
CONTEXT = dict(type='ContextBlock', ratio=1. / 4)
PLUGINS_BAD = [
    ([dict(cfg=CONTEXT)], "plugins[0] needs a 'position' key"),
    ([dict(position='after_conv3')], "plugins[0] needs a 'cfg' key"),
    ([dict(cfg=CONTEXT, position='after_conv4')],
     "plugins[0].position must be one of 'after_conv1', 'after_conv2', "
     "'after_conv3'"),
    ([dict(cfg=CONTEXT, position='after_conv3', stages=(True, False))],
     'plugins[0].stages must be a tuple of 4 bools'),
    ([dict(cfg=CONTEXT, position='after_conv3', stages=(1, 1, 1, 1))],
     'plugins[0].stages must be a tuple of 4 bools'),
    ([dict(cfg=CONTEXT, position='after_conv3', stage=(True, ) * 4)],
     "plugins[0] has unknown keys ['stage']"),
    ([dict(cfg=dict(ratio=0.25), position='after_conv3')],
     'plugins[0].cfg must be a dict with a "type" key'),
    ([dict(cfg=dict(type='NoSuchPlugin'), position='after_conv3')],
     "plugins[0].cfg.type 'NoSuchPlugin' is not a registered module"),
    # two plugins that would get the same attribute name in a block
    ([dict(cfg=CONTEXT, position='after_conv2'),
      dict(cfg=CONTEXT, position='after_conv3')],
     "plugins[1]: a second module named 'context_block'"),
]


@pytest.mark.parametrize('type_', BACKBONE_TYPES)
@pytest.mark.parametrize('plugins,message', PLUGINS_BAD,
                         ids=[m.split(' ')[0] + str(i) for i, (_, m) in
                              enumerate(PLUGINS_BAD)])
def test_bad_plugins(type_, plugins, message):
    assert_both_raise(type_, dict(TINY, plugins=plugins), message)


# Arguments of the mmctx backbones themselves.
SB_KEYS = "accepted keys: ['conv_cfg', 'fusion', 'init_cfg', 'norm_cfg', " \
    "'num_bias', 'pool_size', 'pool_type']"
GE_KEYS = "accepted keys: ['extent', 'init_cfg', 'norm_cfg', 'reduction', " \
    "'variant']"
PSI_KEYS = "accepted keys: ['grid_size', 'hidden_ratio', 'init_cfg']"
BACKBONE_BAD = [
    # SBResNet
    ('SBResNet', dict(sb='k3'), 'sb', 'a dict or None'),
    ('SBResNet', dict(sb=dict(bias=3)), "sb has unknown keys ['bias']",
     SB_KEYS),
    ('SBResNet', dict(sb=dict(in_channels=8)), 'sb must not set',
     'in_channels'),
    ('SBResNet', dict(sb=dict(num_bias=3.0)), 'sb: num_bias',
     POSITIVE_INT),
    ('SBResNet', dict(sb=dict(num_bias=8)), 'sb: num_bias',
     'smaller than in_channels (8)'),
    ('SBResNet', dict(sb=dict(pool_size=0)), 'sb: pool_size', POSITIVE_INT),
    ('SBResNet', dict(sb=dict(pool_type='min')), 'sb: pool_type',
     "'avg', 'max'"),
    ('SBResNet', dict(sb=dict(fusion='sum')), 'sb: fusion',
     "'concat', 'add'"),
    # checked even when no stage takes SB
    ('SBResNet', dict(sb=dict(num_bias=2.0), stage_with_sb=(False, ) * 4),
     'sb: num_bias', POSITIVE_INT),
    ('SBResNet', dict(stage_with_sb=(True, True)), 'stage_with_sb', FLAGS4),
    ('SBResNet', dict(stage_with_sb=(1, 1, 1, 0)), 'stage_with_sb', FLAGS4),
    ('SBResNet', dict(stage_with_sb=('yes', ) * 4), 'stage_with_sb',
     FLAGS4),
    ('SBResNet', dict(stage_with_sb='TTTF'), 'stage_with_sb', FLAGS4),
    ('SBResNet', dict(depth=18), 'depth', BOTTLENECK_DEPTHS),
    ('SBResNet', dict(depth=34, sb=dict(num_bias=3)), 'depth',
     'sb=None builds the plain ResNet'),
    # CifarResNet
    ('CifarResNet', dict(depth=40), 'depth', '9n + 2 with n >= 1'),
    ('CifarResNet', dict(depth=2), 'depth', '9n + 2 with n >= 1'),
    ('CifarResNet', dict(depth=38.0), 'depth', '9n + 2 with n >= 1'),
    ('CifarResNet', dict(depth=True), 'depth', '9n + 2 with n >= 1'),
    ('CifarResNet', dict(depth=38, sb=dict(num_bias=16)), 'sb: num_bias',
     'smaller than in_channels (16)'),
    ('CifarResNet', dict(depth=11, stage_with_sb=(True, ) * 4),
     'stage_with_sb', 'a tuple of 3 bools'),
    ('CifarResNet', dict(depth=11, deep_stem=True), 'deep_stem',
     'single 3x3 conv'),
    ('CifarResNet', dict(depth=11, deep_stem='no'), 'deep_stem',
     'True or False'),
    ('CifarResNet', dict(depth=11, num_stages=3.0), 'num_stages',
     'an int in [1, 4]'),
    ('CifarResNet', dict(depth=11, out_indices=(3, )), 'out_indices',
     '[0, 2]'),
    # GEResNet
    ('GEResNet', dict(ge=None), 'ge must be a dict', 'None'),
    ('GEResNet', dict(ge=dict(extent=5)), 'ge: extent', "2, 4, 8, 'global'"),
    ('GEResNet', dict(ge=dict(extent=4.0)), 'ge: extent',
     "2, 4, 8, 'global'"),
    ('GEResNet', dict(ge=dict(variant='plus')), 'ge: variant',
     "'depthwise_excite'"),
    ('GEResNet', dict(ge=dict(variant='depthwise_excite', reduction=64)),
     'ge: reduction', 'at most in_channels (32)'),
    ('GEResNet', dict(ge=dict(reduce=16)), "ge has unknown keys ['reduce']",
     GE_KEYS),
    ('GEResNet', dict(ge=dict(feature_size=7)), 'ge must not set '
     'feature_size', 'reference_input_size'),
    ('GEResNet', dict(ge=dict(in_channels=8)), 'ge must not set',
     'in_channels'),
    ('GEResNet', dict(stage_with_ge=(True, )), 'stage_with_ge', FLAGS4),
    ('GEResNet', dict(stage_with_ge=(1, 1, 1, 1)), 'stage_with_ge', FLAGS4),
    ('GEResNet', dict(reference_input_size=0), 'reference_input_size',
     'a positive int or a pair (H, W)'),
    ('GEResNet', dict(reference_input_size=224.0), 'reference_input_size',
     'a positive int or a pair (H, W)'),
    ('GEResNet', dict(depth=18), 'depth', BOTTLENECK_DEPTHS),
    # PSIResNet
    ('PSIResNet', dict(psi=None), 'psi must be a dict', 'None'),
    ('PSIResNet', dict(psi=dict(grid_size=-1)), 'psi: grid_size',
     POSITIVE_INT),
    ('PSIResNet', dict(psi=dict(grid_size=16.0)), 'psi: grid_size',
     POSITIVE_INT),
    ('PSIResNet', dict(psi=dict(hidden_ratio=2)), 'psi: hidden_ratio',
     'a number in (0, 1]'),
    ('PSIResNet', dict(psi=dict(ratio=0.5)), "psi has unknown keys ['ratio']",
     PSI_KEYS),
    ('PSIResNet', dict(psi=dict(feature_size=8)), 'psi must not set '
     'feature_size', 'reference_input_size'),
    ('PSIResNet', dict(stage_with_psi=(True, ) * 3), 'stage_with_psi',
     FLAGS4),
    ('PSIResNet', dict(stage_with_psi='all'), 'stage_with_psi', FLAGS4),
    ('PSIResNet', dict(reference_input_size=(256, 256, 3)),
     'reference_input_size', 'a positive int or a pair (H, W)'),
    ('PSIResNet', dict(depth=34), 'depth', BOTTLENECK_DEPTHS),
]


@pytest.mark.parametrize('type_,cfg,arg,accepted', BACKBONE_BAD,
                         ids=[f'{t}-{i}' for i, (t, *_) in
                              enumerate(BACKBONE_BAD)])
def test_backbone_bad_argument(type_, cfg, arg, accepted):
    base = TINY_CIFAR if type_ == 'CifarResNet' else TINY
    assert_both_raise(type_, dict(base, **cfg), arg, accepted)


BACKBONE_GOOD = [
    ('ContextResNet', dict(TINY, num_stages=1, strides=(2, ),
                           dilations=(1, ), out_indices=(0, ),
                           frozen_stages=1, stem_channels=None)),
    ('ContextResNet', dict(TINY, frozen_stages=-1, out_indices=[0, 3],
                           init_cfg=[dict(type='Kaiming', layer='Conv2d')])),
    ('ContextResNet', dict(TINY, depth=18, frozen_stages=4, style='caffe',
                           deep_stem=True, avg_down=True, with_cp=True,
                           norm_eval=False, zero_init_residual=False)),
    ('SBResNet', dict(TINY, sb=dict(num_bias=7, pool_size=1,
                                    pool_type='max'))),
    ('SBResNet', dict(TINY, depth=18, sb=None)),
    ('SBResNet', dict(TINY, sb=dict(fusion='add'), stage_with_sb=[False] * 4)),
    ('CifarResNet', dict(depth=11, sb=dict(num_bias=15, pool_size=6))),
    ('CifarResNet', dict(depth=20, num_stages=2, strides=(1, 2),
                         dilations=(1, 1), out_indices=(1, ),
                         stage_with_sb=(True, True), sb=dict())),
    ('GEResNet', dict(TINY, ge=dict(variant='depthwise_excite', extent=8,
                                    reduction=32))),
    ('GEResNet', dict(TINY, ge=dict(variant='depthwise'),
                      reference_input_size=(1, 3))),
    ('GEResNet', dict(TINY, stage_with_ge=(False, ) * 4)),
    ('PSIResNet', dict(TINY, psi=dict(grid_size=1, hidden_ratio=1),
                       reference_input_size=32)),
    ('PSIResNet', dict(TINY, psi=dict(), reference_input_size=(64, 96))),
]


@pytest.mark.parametrize('type_,cfg', BACKBONE_GOOD,
                         ids=[f'{t}-{i}' for i, (t, _) in
                              enumerate(BACKBONE_GOOD)])
def test_backbone_accepted_boundaries(type_, cfg):
    build_both(type_, cfg)


def test_sb_bottleneck_arguments():
    SBBottleneck(16, 4, sb=dict(num_bias=3))
    for kwargs, fragments in [
        (dict(sb=None), ('sb must be a dict', )),
        (dict(sb=dict(k=3)), ("sb has unknown keys ['k']", SB_KEYS)),
        (dict(sb=dict(num_bias=4)), ('num_bias', 'smaller than in_channels')),
        (dict(sb=dict(), planes=4.0), ('planes', POSITIVE_INT)),
        (dict(sb=dict(), inplanes=0), ('inplanes', POSITIVE_INT)),
        (dict(sb=dict(), style='tf'), ('style', "'pytorch', 'caffe'")),
        (dict(sb=dict(), plugins=[dict(cfg=dict(type='SpatialBias',
                                                fusion='add'),
                                       position='after_conv3')]),
         ("a second module named 'spatial_bias'", 'postfix')),
    ]:
        kwargs = dict(dict(inplanes=16, planes=4), **kwargs)
        with pytest.raises(ValueError) as info:
            SBBottleneck(**kwargs)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


# ------------------------------------------------------ misplaced modules
CONCAT_ADVICE = ("fusion='concat'", "fusion='add'", 'SBResNet')


@pytest.mark.parametrize('position',
                         ['after_conv1', 'after_conv2', 'after_conv3'])
@pytest.mark.parametrize('sb_cfg', [
    dict(type='SpatialBias'),
    dict(type='SpatialBias', num_bias=3, fusion='concat'),
])
def test_concat_spatial_bias_is_no_stock_plugin(position, sb_cfg):
    plugins = [dict(cfg=sb_cfg, stages=(True, False, False, False),
                    position=position)]
    tiny = dict(depth=50, base_channels=8, stem_channels=8, plugins=plugins)
    # the stock mmdet ResNet, directly and through the registry
    for build in (lambda: ResNet(**tiny),
                  lambda: MODELS.build(dict(type='mmdet.ResNet', **tiny)),
                  lambda: MODELS.build(dict(type='ContextResNet', **tiny)),
                  lambda: MODELS.build(dict(type='GEResNet', **tiny))):
        with pytest.raises(ValueError) as info:
            build()
        for fragment in CONCAT_ADVICE:
            assert fragment in str(info.value)
    # the mmseg ResNet too (any caller of mmcv's build_plugin_layer)
    from mmseg.models.backbones import ResNetV1c
    with pytest.raises(ValueError, match='fusion'):
        ResNetV1c(**tiny)
    with pytest.raises(ValueError, match='fusion'):
        build_plugin_layer(sb_cfg, in_channels=8)


def test_concat_spatial_bias_in_sb_resnet_plugins():
    plugins = [dict(cfg=dict(type='SpatialBias', postfix='_2'),
                    position='after_conv2')]
    with pytest.raises(ValueError, match="fusion='add'"):
        MODELS.build(dict(type='SBResNet', plugins=plugins, **TINY))


def test_add_spatial_bias_and_concat_direct_are_fine():
    # add mode: a stock plugin at every position, in every stage
    plugins = [dict(cfg=dict(type='SpatialBias', fusion='add', num_bias=3,
                             postfix=p[-1]), position=p)
               for p in ('after_conv1', 'after_conv2', 'after_conv3')]
    ResNet(depth=50, base_channels=8, stem_channels=8, plugins=plugins)
    MODELS.build(dict(type='ContextResNet', plugins=plugins, **TINY))
    # in an SB stage the block's own SB takes the name: use a postfix
    MODELS.build(dict(type='SBResNet', plugins=plugins, **TINY))
    # concatenation is fine outside a plugin: direct, registry, SBResNet
    MODELS.build(dict(type='SpatialBias', in_channels=8))
    MODELS.build(dict(type='SBResNet', **TINY))


def test_add_spatial_bias_plugin_needs_postfix_in_sb_stages():
    plugins = [dict(cfg=dict(type='SpatialBias', fusion='add'),
                    stages=(False, True, False, False),
                    position='after_conv2')]
    assert_both_raise('SBResNet', dict(TINY, plugins=plugins),
                      "a second module named 'spatial_bias' in stage 2",
                      "postfix='_2'")
    # fine where the block has no SB of its own
    build_both('SBResNet', dict(TINY, plugins=plugins,
                                stage_with_sb=(True, False, True, False)))


@pytest.mark.parametrize('cfg,accepted', [
    (dict(type='GatherExcite', variant='depthwise'), 'GEResNet'),
    (dict(type='GatherExcite', variant='depthwise_excite'), 'GEResNet'),
    (dict(type='PatchSpatialInteraction'), 'PSIResNet'),
])
def test_size_bound_plugin_without_feature_size(cfg, accepted):
    plugins = [dict(cfg=cfg, position='after_conv3')]
    for build in (lambda: ResNet(depth=50, base_channels=8, stem_channels=8,
                                 plugins=plugins),
                  lambda: MODELS.build(dict(type='ContextResNet',
                                            plugins=plugins, **TINY))):
        with pytest.raises(ValueError) as info:
            build()
        assert 'feature_size' in str(info.value)
        assert accepted in str(info.value)


def test_size_bound_plugins_at_every_position_with_feature_size():
    # GE / PSI keep their input's shape: any position works once they know
    # the reference size.
    for position in ('after_conv1', 'after_conv2', 'after_conv3'):
        plugins = [
            dict(cfg=dict(type='GatherExcite', variant='depthwise',
                          feature_size=8), position=position),
            dict(cfg=dict(type='PatchSpatialInteraction', feature_size=16),
                 position=position)]
        MODELS.build(dict(type='ContextResNet', plugins=plugins, **TINY))


def test_plugins_on_basic_blocks_name_depth():
    plugins = [dict(cfg=dict(type='GatherExcite'), position='after_conv3')]
    assert_both_raise('ContextResNet', dict(TINY, depth=18, plugins=plugins),
                      'depth', BOTTLENECK_DEPTHS, 'plugins need bottleneck')
    assert_both_raise('GEResNet', dict(TINY, depth=34), 'depth',
                      BOTTLENECK_DEPTHS, 'GatherExcite needs bottleneck')


def test_second_ge_plugin_in_ge_resnet_needs_postfix():
    extra = dict(cfg=dict(type='GatherExcite', extent=2),
                 position='after_conv3')
    assert_both_raise('GEResNet', dict(TINY, plugins=[extra]),
                      "a second module named 'gather_excite'", 'postfix')
    extra['cfg']['postfix'] = '_local'
    build_both('GEResNet', dict(TINY, plugins=[extra]))


def test_messages_start_with_the_argument():
    # the argument's name leads the message, the value closes it
    with pytest.raises(ValueError) as info:
        MODELS.build(dict(type='GatherExcite', in_channels=8, extent=2.0))
    assert re.search(r"extent must be one of 2, 4, 8, 'global', got 2\.0$",
                     str(info.value))
