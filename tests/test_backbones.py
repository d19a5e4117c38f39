"""mmctx backbones: exact parameter counts (SPEC §2), any input size,
tracing, upstream plugins, stock checkpoints, and argument checks."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.models import (GatherExcite, GEResNet, PatchSpatialInteraction,
                          SBResNet, SpatialBias)

from test_modules import randomize


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def classifier_params(backbone, num_classes, feat_dim):
    """Backbone + global pooling + fc, as an mmpretrain ImageClassifier
    (built in mmpretrain's scope, whatever default scope earlier tests set)."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=backbone,
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead',
                    num_classes=num_classes,
                    in_channels=feat_dim)))
    return num_params(model)


GE_THETA = dict(variant='depthwise', extent='global')
GE_THETA_PLUS = dict(variant='depthwise_excite', extent='global')
ALL_STAGES = (True, True, True, True)


@pytest.mark.parametrize('backbone,expected', [
    (dict(type='ResNet', depth=50), 25_557_032),
    (dict(type='SBResNet', depth=50, sb=None), 25_557_032),
    (dict(type='SBResNet', depth=50), 25_986_620),
    (dict(type='GEResNet', depth=50), 25_557_032),
    (dict(type='GEResNet', depth=50, ge=GE_THETA), 31_106_600),
    (dict(type='GEResNet', depth=50, ge=GE_THETA_PLUS), 33_637_592),
])
def test_imagenet_parameter_counts(backbone, expected):
    assert classifier_params(backbone, 1000, 2048) == expected


def test_psi_resnet14_parameter_count():
    backbone = dict(type='PSIResNet', depth=14, reference_input_size=256)
    assert classifier_params(backbone, 101, 2048) == 8_434_057


CIFAR_SB = [None, (True, False, False), (True, True, False),
            (True, True, True)]


@pytest.mark.parametrize('depth,expected', [
    (38, (428_980, 445_828, 463_764, 483_876)),
    (65, (707_188, 736_672, 768_060, 803_256)),
])
def test_cifar_parameter_counts(depth, expected):
    counts = []
    for stages in CIFAR_SB:
        backbone = dict(type='CifarResNet', depth=depth)
        if stages is not None:
            backbone.update(sb=dict(num_bias=3, pool_size=6),
                            stage_with_sb=stages)
        counts.append(classifier_params(backbone, 100, 256))
    assert tuple(counts) == expected


def test_sb_block_matches_reference_formulation():
    block = randomize(SBResNet(50).layer2[0])  # stride-2 block with SB
    x = torch.randn(2, 256, 24, 40)
    from test_modules import bn, reference_spatial_bias
    a = F.relu(bn(block.conv1(x), block.norm1))
    conv2 = block.conv2._conv_forward(a, block.conv2.weight, None)
    sb = block.spatial_bias
    bias = reference_spatial_bias(sb, a, None)
    bias = F.interpolate(bias, size=conv2.shape[-2:], mode='bilinear',
                         align_corners=False)
    out = F.relu(bn(torch.cat([conv2, bias], 1), block.norm2))
    out = bn(block.conv3(out), block.norm3)
    expected = F.relu(out + block.downsample(x))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert block.norm2.num_features == 128 + 3
    assert block.conv3.in_channels == 128 + 3


# --------------------------------------------------------------- any size
BACKBONES = {
    'sb_r50': dict(type='SBResNet', depth=50),
    'ge_theta_minus_r50': dict(type='GEResNet', depth=50),
    'ge_theta_r50': dict(type='GEResNet', depth=50, ge=GE_THETA),
    'ge_theta_plus_e4_r50': dict(
        type='GEResNet', depth=50,
        ge=dict(variant='depthwise_excite', extent=4)),
    'psi_r50': dict(type='PSIResNet', depth=50),
    'psi_r14': dict(type='PSIResNet', depth=14),
    'ge_theta_plus_r101': dict(type='GEResNet', depth=101,
                               ge=GE_THETA_PLUS, out_indices=(3, ),
                               stage_with_ge=(False, False, True, True)),
}


def build(cfg, **kwargs):
    model = MODELS.build(dict(cfg, **kwargs))
    model.init_weights()
    return model


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_backbones_any_size(name):
    model = build(BACKBONES[name], norm_eval=False)
    for hw in [(33, 57), (97, 65)]:
        for batch in (1, 2):
            for training in (True, False):  # batch 1 and 2, train and eval
                model.train(training)
                x = torch.randn(batch, 3, *hw, requires_grad=training)
                outs = model(x)
                assert all(torch.isfinite(o).all() for o in outs)
                if training:
                    sum(o.mean() for o in outs).backward()
                    assert torch.isfinite(x.grad).all()
                    model.zero_grad()


def test_cifar_any_size():
    model = build(dict(type='CifarResNet', depth=38,
                       sb=dict(num_bias=3, pool_size=6)))
    for hw in [(1, 1), (3, 5), (7, 7), (32, 32), (33, 57)]:
        for batch in (1, 2):
            model.train(batch > 1 or hw != (1, 1))  # plain BN needs >1 value
            x = torch.randn(batch, 3, *hw, requires_grad=True)
            (out, ) = model(x)
            assert out.shape[:2] == (batch, 256)
            out.mean().backward()
            assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize('name', ['sb_r50', 'ge_theta_r50', 'psi_r50'])
def test_backbones_detection_size(name):
    """800x1216 (a padded COCO image): train step with batch 1, features
    of the expected strides."""
    model = build(BACKBONES[name])
    model.train()
    x = torch.randn(1, 3, 800, 1216)
    outs = model(x)
    sizes = [tuple(o.shape[-2:]) for o in outs]
    assert sizes == [(200, 304), (100, 152), (50, 76), (25, 38)]
    sum(o.mean() for o in outs).backward()
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('name', sorted(set(BACKBONES) - {'ge_theta_plus_r101'}))
def test_backbones_trace(name):
    model = build(BACKBONES[name]).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        for a, b in zip(traced(x), model(x)):
            torch.testing.assert_close(a, b)


def test_cifar_trace():
    model = build(dict(type='CifarResNet', depth=38,
                       sb=dict(num_bias=3, pool_size=6))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x)[0], model(x)[0])


# ----------------------------------------------------- upstream integration
def test_stock_plugins_in_mmdet_and_mmseg_resnet():
    from mmseg.models.backbones import ResNetV1c
    plugins = [
        dict(cfg=dict(type='GatherExcite', variant='depthwise', extent=4),
             stages=ALL_STAGES, position='after_conv3'),
        dict(cfg=dict(type='SpatialBias', num_bias=3, fusion='add'),
             stages=(True, True, True, False), position='after_conv2'),
    ] + GEResNet.per_stage_plugins(
        dict(type='PatchSpatialInteraction'), ALL_STAGES,
        GEResNet.stage_feature_sizes(256, (1, 2, 2, 2)), 'after_conv3')
    for model in (ResNet(50, plugins=plugins),
                  ResNetV1c(depth=50, plugins=plugins)):
        block = model.layer1[0]
        assert isinstance(block.gather_excite, GatherExcite)
        assert isinstance(block.spatial_bias, SpatialBias)
        assert isinstance(block.patch_spatial_interaction,
                          PatchSpatialInteraction)
        model.init_weights()
        outs = model(torch.randn(1, 3, 80, 112))
        assert outs[0].shape == (1, 256, 20, 28)


@pytest.mark.parametrize('plugin', [
    dict(type='ContextBlock', ratio=1. / 16),
    dict(type='NonLocal2d', reduction=4),
    dict(type='GatherExcite', variant='parameter_free', extent=8),
])
def test_sb_combines_with_plugins(plugin):
    position = 'after_conv3' if plugin['type'] != 'NonLocal2d' \
        else 'after_conv2'
    model = build(dict(type='SBResNet', depth=50, plugins=[
        dict(cfg=plugin, stages=(False, False, True, True),
             position=position)
    ]))
    outs = model(torch.randn(2, 3, 64, 64))
    assert outs[3].shape == (2, 2048, 2, 2)
    # after_conv2 plugins of SB blocks see conv2 + bias channels
    if position == 'after_conv2':
        block = model.layer3[0]
        (name, ) = block.after_conv2_plugin_names
        assert getattr(block, name).in_channels == 256 + 3


def test_upstream_options_pass_through():
    model = build(dict(type='SBResNet', depth=50, deep_stem=True,
                       avg_down=True, frozen_stages=1, out_indices=(1, 3),
                       strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                       norm_cfg=dict(type='BN', requires_grad=True)))
    model.train()
    # frozen: stage 1's pretrained tensors; its SB context keeps training
    # (tests/test_frozen_stages.py)
    trainable = [name for name, p in model.layer1.named_parameters()
                 if p.requires_grad]
    assert trainable and all('.spatial_bias.' in name or
                             name.endswith('_context') for name in trainable)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 512, 8, 8), (1, 2048, 8, 8)]


def test_stage_feature_sizes():
    assert GEResNet.stage_feature_sizes(224, (1, 2, 2, 2)) == \
        [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert GEResNet.stage_feature_sizes((512, 1024), (1, 2, 1, 1)) == \
        [(128, 256), (64, 128), (64, 128), (64, 128)]
    model = GEResNet(50, ge=GE_THETA, reference_input_size=(512, 1024),
                     strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    assert model.layer4[0].gather_excite.gather.kernel_size == (64, 128)


# -------------------------------------------------------- bad arguments
@pytest.mark.parametrize('cfg,arg', [
    (dict(type='SBResNet', depth=50, stage_with_sb=(True, True)),
     'stage_with_sb'),
    (dict(type='SBResNet', depth=50, sb=dict(num_bias=64)), 'num_bias'),
    (dict(type='SBResNet', depth=50, sb=dict(pool_size=0)), 'pool_size'),
    (dict(type='SBResNet', depth=18), 'depth'),
    (dict(type='SBResNet', depth=51), 'depth'),
    (dict(type='GEResNet', depth=50, ge=dict(extent=5)), 'extent'),
    (dict(type='GEResNet', depth=50, stage_with_ge=(True, )), 'stage_with_ge'),
    (dict(type='GEResNet', depth=50, ge=dict(variant='depthwise'),
          reference_input_size=0), 'reference_input_size'),
    (dict(type='GEResNet', depth=50, ge=dict(feature_size=7)), 'ge'),
    (dict(type='PSIResNet', depth=14, psi=dict(grid_size=-1)), 'grid_size'),
    (dict(type='PSIResNet', depth=14, stage_with_psi=(True, ) * 3),
     'stage_with_psi'),
    (dict(type='CifarResNet', depth=40), 'depth'),
    (dict(type='CifarResNet', depth=38, sb=dict(num_bias=16)), 'num_bias'),
])
def test_bad_backbone_arguments(cfg, arg):
    with pytest.raises(ValueError, match=arg):
        MODELS.build(cfg)


def test_missing_checkpoint_is_a_clear_error_when_training_starts(tmp_path):
    """Building never reads the checkpoint; init_weights (the start of
    training) fails naming the file and the config key to change."""
    from mmctx.compat import CheckpointError
    path = str(tmp_path / 'nope.pth')
    net = MODELS.build(dict(type='SBResNet', depth=50,
                            init_cfg=dict(type='Pretrained', checkpoint=path)))
    with pytest.raises(CheckpointError, match='nope.pth') as err:
        net.init_weights()
    assert 'model.backbone.init_cfg.checkpoint' in str(err.value)
