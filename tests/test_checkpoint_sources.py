"""Checkpoint sources as upstream accepts them, and weights read only when
training starts.

Downloads are tested against a loopback HTTP server started here, serving
stock-layout ResNet-50 checkpoints written here (torchvision layout, and
open-mmlab's ``state_dict`` form of a V1c ResNet-50); the names
``torchvision://resnet50`` and ``open-mmlab://resnet50_v1c`` are pointed at
it, and torch's hub cache at a temporary folder. Nothing touches the
internet.
"""
import functools
import http.server
import threading

import pytest
import torch

import mmctx  # noqa: F401
from mmctx.compat import CheckpointError, torchvision_model_urls
from mmengine.registry import MODELS


class _Server:
    """A loopback HTTP server for the files in ``root``; counts requests."""

    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ('127.0.0.1', 0),
            functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       daemon=True)
        self.thread.start()

    def url(self, name):
        return f'http://127.0.0.1:{self.httpd.server_address[1]}/{name}'

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _plain(deep_stem=False):
    torch.manual_seed(0)
    net = MODELS.build(dict(type='ContextResNet', depth=50,
                            deep_stem=deep_stem))
    net.init_weights()
    # give BN non-trivial statistics, so loading them is visible
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith('running_mean'):
                buf.uniform_(-0.1, 0.1)
            elif name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """Serve a torchvision-layout ResNet-50 and an open-mmlab ResNet-50 V1c,
    with their plain networks."""
    root = tmp_path_factory.mktemp('served')
    r50, v1c = _plain(), _plain(deep_stem=True)
    state = dict(r50.state_dict())
    state['fc.weight'] = torch.zeros(1000, 2048)  # torchvision's classifier
    state['fc.bias'] = torch.zeros(1000)
    torch.save(state, root / 'resnet50-0676ba61.pth')
    torch.save({'state_dict': v1c.state_dict()},
               root / 'resnet50_v1c-2cccc1ad.pth')
    server = _Server(root)
    yield server, r50, v1c
    server.close()


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    """torch's hub cache in tmp_path; the two names resolve to the server."""
    import mmengine.runner.checkpoint as mmengine_checkpoint

    import mmctx.compat.checkpoint as mmctx_checkpoint
    server = served[0]
    previous = torch.hub._hub_dir
    torch.hub.set_dir(str(tmp_path / 'hub'))
    monkeypatch.setattr(mmctx_checkpoint, 'torchvision_model_urls',
                        lambda: {'resnet50':
                                 server.url('resnet50-0676ba61.pth')})
    monkeypatch.setattr(mmengine_checkpoint, 'get_external_models',
                        lambda: {'resnet50_v1c':
                                 server.url('resnet50_v1c-2cccc1ad.pth')})
    server.requests.clear()
    yield tmp_path / 'hub' / 'checkpoints'
    torch.hub._hub_dir = previous


def _features(net, x):
    with torch.no_grad():
        return net.eval()(x)


def _assert_same(net, plain, size=(1, 3, 64, 96)):
    x = torch.randn(*size, generator=torch.Generator().manual_seed(1))
    for got, want in zip(_features(net, x), _features(plain, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torchvision_names_resolve_without_torchvision():
    import sys
    urls = torchvision_model_urls()
    assert urls['resnet50'] == \
        'https://download.pytorch.org/models/resnet50-0676ba61.pth'
    assert 'torchvision' not in sys.modules


@pytest.mark.parametrize('backbone', [
    dict(type='SBResNet', depth=50),
    dict(type='GEResNet', depth=50, ge=dict(variant='depthwise_excite')),
    dict(type='PSIResNet', depth=50),
    dict(type='ContextResNet', depth=50),
])
def test_torchvision_name_downloads_once_and_starts_as_plain(
        backbone, served, hub):
    server, r50, _ = served
    cfg = dict(backbone, init_cfg=dict(type='Pretrained',
                                       checkpoint='torchvision://resnet50'))
    net = MODELS.build(cfg)
    assert server.requests == []  # building reads nothing
    net.init_weights()
    assert server.requests == ['/resnet50-0676ba61.pth']
    assert (hub / 'resnet50-0676ba61.pth').is_file()
    _assert_same(net, r50)
    # a second model reads the cached file, no new download
    MODELS.build(cfg).init_weights()
    assert len(server.requests) == 1


def test_open_mmlab_name_and_list_init_cfg_and_pretrained(served, hub):
    server, _, v1c = served
    for cfg in (
            dict(init_cfg=dict(type='Pretrained',
                               checkpoint='open-mmlab://resnet50_v1c')),
            dict(init_cfg=[
                dict(type='Kaiming', layer='Conv2d'),
                dict(type='Pretrained',
                     checkpoint='open-mmlab://resnet50_v1c')
            ]),
            dict(pretrained='open-mmlab://resnet50_v1c'),
    ):
        net = MODELS.build(dict(type='SBResNet', depth=50, deep_stem=True,
                                **cfg))
        net.init_weights()
        _assert_same(net, v1c)
    assert server.requests == ['/resnet50_v1c-2cccc1ad.pth']


def test_url_and_home_relative_paths(served, hub, tmp_path, monkeypatch):
    server, r50, _ = served
    url = server.url('resnet50-0676ba61.pth')
    net = MODELS.build(dict(type='GEResNet', depth=50, pretrained=url))
    net.init_weights()
    _assert_same(net, r50)
    assert (hub / 'resnet50-0676ba61.pth').is_file()
    # ~ is the user's home, as upstream's loaders read it
    monkeypatch.setenv('HOME', str(tmp_path))
    torch.save(r50.state_dict(), tmp_path / 'r50.pth')
    net = MODELS.build(dict(type='SBResNet', depth=50, init_cfg=dict(
        type='Pretrained', checkpoint='~/r50.pth')))
    net.init_weights()
    _assert_same(net, r50)


def test_offline_error_names_the_url_and_the_local_alternative(hub):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/resnet50-0676ba61.pth'
    net = MODELS.build(dict(type='SBResNet', depth=50, init_cfg=dict(
        type='Pretrained', checkpoint=url)))
    with pytest.raises(CheckpointError) as err:
        net.init_weights()
    message = str(err.value)
    assert url in message
    assert 'model.backbone.init_cfg.checkpoint' in message
    assert "init_cfg=dict(type='Pretrained', checkpoint=" in message


@pytest.mark.parametrize('name', ['faster_rcnn_sb_r50', 'cascade_rcnn_ge_r50',
                                  'faster_rcnn_sb_nl_r50', 'fpn_psi_r50_ade20k',
                                  'fpn_r50_ade20k'])
def test_shipped_configs_build_without_their_weights(name, tmp_path,
                                                     monkeypatch):
    """Every shipped detection / segmentation model builds offline, from
    another working directory, without its ImageNet file."""
    from config_overrides import load_config
    from mmengine.registry import init_default_scope
    monkeypatch.chdir(tmp_path)
    cfg = load_config(name)
    assert '://' in cfg.model.backbone.init_cfg['checkpoint']
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 25_000_000


# --------------------------------------------------------------------------
# a trained checkpoint alone tests and infers with the shipped configs
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """For one detection and one segmentation config: an mmengine-form
    checkpoint of the built model (what training writes), made without the
    config's ImageNet weights."""
    from config_overrides import load_config
    from mmengine.registry import init_default_scope
    root = tmp_path_factory.mktemp('trained')
    out = {}
    for name in ('faster_rcnn_sb_r50', 'fpn_sb_r50_ade20k'):
        cfg = load_config(name)
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        path = root / f'{name}.pth'
        torch.save({'meta': {'iter': 1}, 'state_dict': model.state_dict()},
                   path)
        out[name] = path
    return out


@pytest.mark.parametrize('tool', ['ours', 'stock'])
@pytest.mark.parametrize('name', ['faster_rcnn_sb_r50', 'fpn_sb_r50_ade20k'])
def test_tools_test_from_another_directory(name, tool, trained, repo_root,
                                           tmp_path):
    """tools/test.py -- ours, and the stock one shipped inside mmdet / mmseg
    (``.mim/tools``) -- with the shipped config (its init_cfg still names the
    ImageNet weights, offline) and a trained checkpoint, run from another
    working directory, reports the metric."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mmdet
    import mmseg

    from config_overrides import (cli_options, det_options, load_config,
                                  seg_options)
    cfg = load_config(name)
    options = (det_options(cfg, test_images=1) if 'rcnn' in name else
               seg_options(cfg, test_images=1))
    del options['model.backbone.init_cfg']  # keep the config's URL
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    script = repo_root / 'tools' / 'test.py'
    env = dict(os.environ)
    if tool == 'stock':
        package = mmdet if 'rcnn' in name else mmseg
        script = Path(package.__file__).parent / '.mim' / 'tools' / 'test.py'
        # the stock tool imports mmctx through the config's custom_imports
        env['PYTHONPATH'] = os.pathsep.join(
            [str(repo_root)] + [p for p in [env.get('PYTHONPATH')] if p])
    proc = subprocess.run(
        [sys.executable, str(script),
         str(repo_root / 'configs' / f'{name}.py'), str(trained[name]),
         '--work-dir', str(tmp_path / 'work'), *cli_options(options)],
        cwd=str(elsewhere), env=env, capture_output=True, text=True,
        timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    metric = 'coco/bbox_mAP' if 'rcnn' in name else 'mIoU'
    assert metric in out, out[-3000:]
    assert 'download' not in out.lower()


def test_inferencer_apis_with_a_trained_checkpoint(trained, repo_root,
                                                   shared_data, tmp_path,
                                                   monkeypatch):
    from mmdet.apis import DetInferencer
    from mmseg.apis import MMSegInferencer
    monkeypatch.chdir(tmp_path)
    image = str(next((shared_data / 'tiny_coco' / 'train2017').glob('*.jpg')))
    det = DetInferencer(
        model=str(repo_root / 'configs' / 'faster_rcnn_sb_r50.py'),
        weights=str(trained['faster_rcnn_sb_r50']), device='cpu')
    result = det(image, return_vis=False, no_save_pred=True)
    pred = result['predictions'][0]  # untrained weights: maybe no boxes
    assert set(pred) >= {'labels', 'scores', 'bboxes'}
    assert len(pred['bboxes']) == len(pred['scores']) == len(pred['labels'])
    seg_image = str(next((shared_data / 'ade20k_sample' / 'images' /
                          'validation').glob('*.jpg')))
    seg = MMSegInferencer(
        model=str(repo_root / 'configs' / 'fpn_sb_r50_ade20k.py'),
        weights=str(trained['fpn_sb_r50_ade20k']), device='cpu')
    import cv2
    height, width = cv2.imread(seg_image).shape[:2]
    pred = seg(seg_image, return_datasamples=True)
    assert tuple(pred.pred_sem_seg.data.shape[-2:]) == (height, width)
