"""Starting from a stock ImageNet ResNet-50 checkpoint (mmdet, mmpretrain and
torchvision key layouts), written here with random weights."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

import mmctx  # noqa: F401

from test_modules import randomize


@pytest.fixture(scope='module')
def resnet50():
    torch.manual_seed(0)
    model = ResNet(50)
    model.init_weights()
    return randomize(model, seed=1)


@pytest.fixture(scope='module')
def checkpoints(resnet50, tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    state = resnet50.state_dict()
    fc = {'fc.weight': torch.randn(1000, 2048), 'fc.bias': torch.zeros(1000)}
    layouts = {
        # torchvision: a bare state dict with the classifier
        'torchvision': {**state, **fc},
        # mmdet detector: backbone + neck under state_dict, with meta
        'mmdet': {
            'meta': {'epoch': 12, 'dataset_meta': {'classes': ('a', 'b')}},
            'state_dict': {
                **{f'backbone.{k}': v for k, v in state.items()},
                'neck.lateral_convs.0.conv.weight': torch.randn(256, 256, 1, 1)
            },
        },
        # mmpretrain classifier
        'mmpretrain': {'state_dict': {
            **{f'backbone.{k}': v for k, v in state.items()},
            'head.fc.weight': fc['fc.weight'], 'head.fc.bias': fc['fc.bias']
        }},
    }
    paths = {}
    for name, ckpt in layouts.items():
        paths[name] = str(root / f'{name}_resnet50.pth')
        torch.save(ckpt, paths[name])
    return paths


EXACT = {
    'SB-R50': dict(type='SBResNet', depth=50),
    'GE-theta-R50': dict(type='GEResNet', depth=50,
                         ge=dict(variant='depthwise', extent='global')),
    'GE-theta-plus-R50': dict(
        type='GEResNet', depth=50,
        ge=dict(variant='depthwise_excite', extent='global')),
    'GE-theta-plus-e8-R50': dict(
        type='GEResNet', depth=50, ge=dict(variant='depthwise_excite',
                                           extent=8)),
    'PSI-R50': dict(type='PSIResNet', depth=50),
}


def load(cfg, path):
    model = MODELS.build(
        dict(cfg, init_cfg=dict(type='Pretrained', checkpoint=path)))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('name,layout', [
    ('SB-R50', 'torchvision'), ('SB-R50', 'mmdet'), ('SB-R50', 'mmpretrain'),
    *((name, 'mmdet') for name in sorted(EXACT) if name != 'SB-R50')])
def test_starts_as_the_pretrained_resnet(name, layout, resnet50, checkpoints):
    model = load(EXACT[name], checkpoints[layout])
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for ours, ref in zip(model(x), resnet50(x)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # and every stock tensor arrived
    own = model.state_dict()
    for key, value in resnet50.state_dict().items():
        if 'norm3' in key or 'bn3' in key or 'conv3' in key or 'bn2' in key:
            continue  # adapted for the new design, checked through outputs
        assert torch.equal(own[key], value), key


def test_sb_resnet_features_equal_resnet_in_training_too(resnet50,
                                                         checkpoints):
    model = load(EXACT['SB-R50'], checkpoints['torchvision'])
    ref = ResNet(50)
    ref.load_state_dict(resnet50.state_dict())
    model.train()
    ref.train()
    x = torch.randn(2, 3, 64, 64)
    for ours, theirs in zip(model(x), ref(x)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_parameter_free_ge_loads_every_weight(resnet50, checkpoints):
    model = load(dict(type='GEResNet', depth=50), checkpoints['mmdet'])
    own = model.state_dict()
    for key, value in resnet50.state_dict().items():
        assert torch.equal(own[key], value), key


def test_reports_new_and_ignored_by_name(checkpoints, tmp_path):
    log_file = tmp_path / 'load.log'
    MMLogger.get_instance('test_pretrained_report', log_file=str(log_file))
    load(EXACT['SB-R50'], checkpoints['torchvision'])
    text = log_file.read_text()
    assert 'layer1.0.spatial_bias.mix.weight' in text
    assert "'fc.weight'" in text
    assert 'layer4.0.spatial_bias' not in text  # no SB in stage 4


def test_loading_a_trained_sb_checkpoint_keeps_it(tmp_path):
    """An SB-ResNet checkpoint (all keys present) is not touched by the
    plain-ResNet adaptations."""
    trained = randomize(MODELS.build(dict(type='SBResNet', depth=50)), 3)
    path = str(tmp_path / 'sb.pth')
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in trained.state_dict().items()}},
               path)
    model = load(dict(type='SBResNet', depth=50), path)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    trained_ge = randomize(MODELS.build(EXACT['GE-theta-R50']), 4)
    torch.save(trained_ge.state_dict(), path)
    model = load(EXACT['GE-theta-R50'], path)
    for key, value in trained_ge.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
