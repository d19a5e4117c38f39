"""The experiment configs in configs/: what they say, that every one builds
its model and data pipelines, and that every one actually trains and tests
(shrunk: a couple of iterations at small image sizes on the shared samples or
on generated data, from scratch, on CPU).

- detection / segmentation (and the demo configs): ``tools/train.py`` for two
  iterations with a validation at the end, then ``tools/test.py`` on the
  checkpoint it wrote; both must print the COCO box mAP / mIoU. The runs are
  started up front, two at a time (single-threaded each: on a 2-core machine
  that halves the import-dominated wall time), and each test waits for its
  own;
- classification: two iterations in-process through mmengine's Runner;
- ``tools/dist_train.sh CONFIG 2``: a detection and a segmentation config with
  two CPU (gloo) processes.
"""
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from config_overrides import (ALL_CONFIGS, CIFAR_CONFIGS, DEMO_DET_CONFIGS,
                              DEMO_SEG_CONFIGS, DET_CONFIGS,
                              DILATED_SEG_CONFIGS, IMAGENET_CONFIGS,
                              REPO_ROOT, SEG_CONFIGS, TINY_COCO,
                              UPSTREAM_DET_CONFIGS, UPSTREAM_SEG_CONFIGS,
                              cli_options,
                              cls_options, config_path, demo_det_options,
                              demo_seg_options, det_options, find_checkpoint,
                              iter_strings, load_config, make_cifar100,
                              make_imagenet, read_scalars, seg_options)

RUN_CONFIGS = DET_CONFIGS + UPSTREAM_DET_CONFIGS + SEG_CONFIGS + \
    DILATED_SEG_CONFIGS + UPSTREAM_SEG_CONFIGS + DEMO_DET_CONFIGS + \
    DEMO_SEG_CONFIGS
CLS_CONFIGS = IMAGENET_CONFIGS + CIFAR_CONFIGS

# parameter counts of the design brief (1000 classes), and of our CIFAR nets
PARAMS = {
    'imagenet_r50': 25_557_032,
    'imagenet_sb_r50': 25_986_620,
    'imagenet_ge_r50': 33_637_592,
    'cifar100_r38': 428_980,
    'cifar100_sb_r38': 463_764,
    'cifar100_r65': 707_188,
    'cifar100_sb_r65': 768_060,
    'cifar100_r110': 1_170_868,
    'cifar100_sb_r110': 1_275_220,
}


def _kind(name):
    for kind, names in (('det', DET_CONFIGS), ('seg', SEG_CONFIGS),
                        ('upstream_det', UPSTREAM_DET_CONFIGS),
                        ('dilated_seg', DILATED_SEG_CONFIGS),
                        ('upstream_seg', UPSTREAM_SEG_CONFIGS),
                        ('imagenet', IMAGENET_CONFIGS),
                        ('cifar', CIFAR_CONFIGS),
                        ('demo_det', DEMO_DET_CONFIGS),
                        ('demo_seg', DEMO_SEG_CONFIGS)):
        if name in names:
            return kind
    raise KeyError(name)


def test_every_experiment_has_a_config():
    expected = {
        'faster_rcnn_r50', 'faster_rcnn_sb_r50', 'faster_rcnn_ge_r50',
        'faster_rcnn_psi_r50', 'faster_rcnn_sb_gc_r50',
        'faster_rcnn_sb_nl_r50', 'cascade_rcnn_r50', 'cascade_rcnn_sb_r50',
        'cascade_rcnn_ge_r50', 'cascade_rcnn_psi_r50', 'fpn_r50_ade20k',
        'fpn_sb_r50_ade20k', 'fpn_ge_r50_ade20k', 'fpn_psi_r50_ade20k',
        'demo_faster_rcnn_sb_r50', 'demo_fpn_sb_r50', 'pspnet_r50_ade20k',
        'pspnet_sb_r50_ade20k',
        # each with its plain twin
        'faster_rcnn_x101_32x4d', 'faster_rcnn_sb_x101_32x4d',
        'mask_rcnn_r50', 'mask_rcnn_sb_r50', 'mask_rcnn_ge_r50',
        'mask_rcnn_psi_r50', 'retinanet_r50', 'retinanet_sb_r50',
        'upernet_r50_ade20k', 'upernet_sb_r50_ade20k'
    }
    expected |= {
        f'imagenet_{b}_{r}'
        for b in ('r50', 'sb_r50', 'ge_r50', 'psi_r50')
        for r in ('sgd', 'lamb')
    }
    expected |= {
        f'cifar100_{sb}r{d}'
        for d in (38, 65, 110) for sb in ('', 'sb_')
    }
    assert expected <= set(ALL_CONFIGS)


# --------------------------------------------------------------------------
# what the configs say
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_config_recipe(name):
    text = config_path(name).read_text()
    cfg = load_config(name)
    kind = _kind(name)
    # like upstream, detection starts from torchvision's ResNet-50 (ResNeXt:
    # open-mmlab's) and segmentation from open-mmlab's ResNet-50 V1c, by
    # name; no other URL
    urls = {s for s in iter_strings(cfg.model.to_dict()) if '://' in s}
    expected = {'det': {'torchvision://resnet50'},
                'upstream_det': {'torchvision://resnet50'},
                'seg': {'open-mmlab://resnet50_v1c'},
                'dilated_seg': {'open-mmlab://resnet50_v1c'},
                'upstream_seg': {'open-mmlab://resnet50_v1c'}}.get(kind, set())
    if 'x101_32x4d' in name:
        expected = {'open-mmlab://resnext101_32x4d'}
    assert urls == expected, (name, urls)  # demos train from scratch
    if expected:
        assert cfg.model.backbone.init_cfg == dict(type='Pretrained',
                                                   checkpoint=min(expected))
    others = {s for s in iter_strings(cfg.to_dict()) if '://' in s}
    assert others <= {'torchvision://resnet50', 'open-mmlab://resnet50_v1c',
                      'open-mmlab://resnext101_32x4d'}
    if not name.startswith('demo_'):
        assert cfg.custom_imports == dict(
            imports=['mmctx'], allow_failed_imports=False)
        # the family's recipe config inherits upstream; siblings inherit it
        assert re.search(r"^_base_ = .(mm(det|seg|pretrain)::|\./\w+\.py')",
                         text, re.M)
        assert cfg.get('data_root')
    assert 'mmctx' in cfg.custom_imports['imports']
    assert cfg.auto_scale_lr.enable is False
    backbone = cfg.model.backbone
    assert backbone.type in ('ContextResNet', 'SBResNet', 'GEResNet',
                             'PSIResNet', 'CifarResNet', 'ContextResNeXt',
                             'SBResNeXt', 'ContextResNetV1c', 'SBResNetV1c')
    if kind in ('det', 'seg', 'dilated_seg', 'upstream_det', 'upstream_seg'):
        # the checkpoint is one top-level variable, used by the backbone
        assert backbone.init_cfg == dict(
            type='Pretrained', checkpoint=cfg.pretrained)
        assert not os.path.isabs(cfg.pretrained)
    if kind == 'det':
        assert cfg.train_dataloader.batch_size == 8
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.optim_wrapper.optimizer.lr == 0.02
        assert cfg.optim_wrapper.optimizer.momentum == 0.9
        assert cfg.optim_wrapper.optimizer.weight_decay == 1e-4
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.train_dataloader.dataset.data_root == cfg.data_root
        assert cfg.val_evaluator.ann_file.startswith(cfg.data_root)
        assert backbone.norm_eval and backbone.frozen_stages == 1
    elif kind == 'seg':
        assert cfg.train_dataloader.batch_size == 14
        assert cfg.auto_scale_lr.base_batch_size == 28
        assert cfg.optim_wrapper.optimizer.type == 'AdamW'
        assert [s.type for s in cfg.param_scheduler] == ['PolyLR']
        assert cfg.param_scheduler[0].end == 40000
        assert cfg.train_cfg.max_iters == 40000
        assert cfg.model.pretrained is None
        assert backbone.deep_stem and backbone.norm_cfg.type == 'SyncBN'
        assert not backbone.norm_eval
        assert cfg.train_dataloader.dataset.data_root == cfg.data_root
    elif kind == 'upstream_det':
        # upstream mmdet's recipe: 8 GPUs x 2 images, frozen stage 1 and BN
        upstream = {'mask': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                    'retinanet': 'mmdet::retinanet/retinanet_r50_fpn_1x_coco',
                    'faster': 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn'}
        family = name.split('_')[0]
        if not re.search(r"^_base_ = '\./", text, re.M):
            assert upstream[family] in text, name
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.optim_wrapper.optimizer.lr == \
            (0.01 if family == 'retinanet' else 0.02)
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.train_dataloader.dataset.data_root == cfg.data_root
        assert cfg.val_evaluator.ann_file.startswith(cfg.data_root)
        assert backbone.get('norm_eval', True) and backbone.frozen_stages == 1
        if family == 'mask':
            assert cfg.val_evaluator.metric == ['bbox', 'segm']
        if 'x101' in name:
            assert (backbone.depth, backbone.groups, backbone.base_width) == \
                (101, 32, 4)
    elif kind == 'upstream_seg':
        # upstream mmseg's UPerNet recipe, ResNetV1c family
        assert cfg.train_dataloader.batch_size == 4
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.optim_wrapper.optimizer.type == 'SGD'
        assert cfg.train_cfg.max_iters == 80000
        assert cfg.model.pretrained is None
        assert backbone.type.endswith('ResNetV1c')
        assert cfg.model.decode_head.type == 'UPerHead'
        assert cfg.train_dataloader.dataset.data_root == cfg.data_root
    elif kind == 'dilated_seg':
        # upstream mmseg's PSPNet recipe and ResNetV1c-d8 backbone
        assert cfg.train_dataloader.batch_size == 4
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.optim_wrapper.optimizer.type == 'SGD'
        assert cfg.train_cfg.max_iters == 80000
        assert cfg.model.pretrained is None
        assert backbone.deep_stem and backbone.contract_dilation
        assert tuple(backbone.strides) == (1, 2, 1, 1)
        assert tuple(backbone.dilations) == (1, 1, 2, 4)
        assert cfg.train_dataloader.dataset.data_root == cfg.data_root
    elif kind == 'imagenet':
        assert not backbone.norm_eval and backbone.init_cfg is None
        assert cfg.model.head.num_classes == 1000
        if name.endswith('_sgd'):
            assert cfg.train_dataloader.batch_size == 32  # x 8 GPUs
            assert cfg.auto_scale_lr.base_batch_size == 256
            assert cfg.optim_wrapper.optimizer.type == 'SGD'
            assert cfg.optim_wrapper.optimizer.lr == 0.1
            assert cfg.param_scheduler.milestones == [30, 60, 80]
            assert cfg.param_scheduler.gamma == 0.1
            assert cfg.train_cfg.max_epochs == 90
        else:
            assert cfg.train_dataloader.batch_size == 64  # x 8 GPUs
            assert cfg.auto_scale_lr.base_batch_size == 512
            assert cfg.optim_wrapper.optimizer.type == 'Lamb'
            assert cfg.optim_wrapper.optimizer.lr == 8e-3
            assert cfg.param_scheduler[-1].type == 'CosineAnnealingLR'
            assert cfg.train_cfg.max_epochs == 100
    elif kind == 'cifar':
        # CifarResNet's norm_eval defaults to False
        assert not backbone.get('norm_eval') and backbone.init_cfg is None
        assert cfg.model.head.num_classes == 100
        assert cfg.model.head.in_channels == 256
        assert cfg.train_dataloader.batch_size == 64
        assert cfg.auto_scale_lr.base_batch_size == 64
        assert cfg.optim_wrapper.optimizer.lr == 0.25
        assert cfg.param_scheduler.milestones == [75, 150, 225]
        assert cfg.train_cfg.max_epochs == 300
        assert cfg.train_dataloader.dataset.download is False
        if '_sb_' in name:
            assert backbone.sb == dict(num_bias=3, pool_size=6)
            assert tuple(backbone.stage_with_sb) == (True, True, False)
        else:
            assert backbone.sb is None
    if '_sb_' in name and kind != 'cifar':
        assert backbone.sb == dict(num_bias=3, pool_size=10)
        assert tuple(backbone.stage_with_sb) == (True, True, True, False)


@pytest.mark.parametrize('name', ['faster_rcnn_sb_gc_r50',
                                  'faster_rcnn_sb_nl_r50'])
def test_context_plugin_configs(name):
    plugins = load_config(name).model.backbone.plugins
    assert len(plugins) == 1
    if 'gc' in name:
        assert plugins[0].cfg == dict(type='ContextBlock', ratio=1. / 16)
        assert tuple(plugins[0].stages) == (False, True, True, True)
    else:
        assert plugins[0].cfg.type == 'NonLocal2d'
        assert tuple(plugins[0].stages) == (False, False, True, False)
    assert plugins[0].position == 'after_conv3'


def test_checkpoint_override_reaches_the_backbone(tmp_path):
    """The documented override: --cfg-options
    model.backbone.init_cfg.checkpoint=PATH (a missing file does not stop
    building the model; it fails when training starts, naming the file)."""
    import mmctx  # noqa: F401
    from mmctx.compat import CheckpointError
    from mmengine.registry import MODELS, init_default_scope
    cfg = load_config('faster_rcnn_sb_r50',
                      {'model.backbone.init_cfg.checkpoint': '/x/r50.pth'})
    assert cfg.model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint='/x/r50.pth')
    init_default_scope('mmdet')
    backbone = MODELS.build(cfg.model.backbone)
    with pytest.raises(CheckpointError, match='/x/r50.pth'):
        backbone.init_weights()


@pytest.mark.parametrize('backbone', ['r50', 'sb_r50', 'ge_r50', 'psi_r50'])
def test_imagenet_checkpoint_initialises_det_and_seg_backbones(
        backbone, tmp_path):
    """The README's path to a pretrained backbone: a checkpoint written by
    configs/imagenet_<backbone>_*.py (mmpretrain layout) is what
    `model.backbone.init_cfg.checkpoint` of the detection / segmentation
    configs takes; every backbone tensor is loaded as is."""
    import mmctx  # noqa: F401
    from mmengine.registry import MODELS, init_default_scope
    cfg = load_config(f'imagenet_{backbone}_sgd')
    init_default_scope(cfg.default_scope)
    classifier = MODELS.build(cfg.model)
    classifier.init_weights()
    ckpt = tmp_path / 'epoch_90.pth'
    torch.save({'meta': {}, 'state_dict': classifier.state_dict()}, ckpt)
    expected = classifier.backbone.state_dict()
    # segmentation: standard (not deep) stem, like the ImageNet configs
    for name, extra in ((f'faster_rcnn_{backbone}', {}),
                        (f'fpn_{backbone}_ade20k',
                         {'model.backbone.deep_stem': False})):
        det = load_config(name, dict(extra, **{
            'model.backbone.init_cfg.checkpoint': str(ckpt)}))
        init_default_scope(det.default_scope)
        net = MODELS.build(det.model.backbone)
        net.init_weights()
        state = net.state_dict()
        assert state.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(state[key], value), (name, key)


# --------------------------------------------------------------------------
# generated data
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def imagenet_root(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp('imagenet'))


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar100')
    return root, make_cifar100(root)


@pytest.fixture
def fake_cifar(cifar_root, monkeypatch):
    """Our generated CIFAR-100 pickles pass mmpretrain's md5 check."""
    from mmpretrain.datasets import CIFAR100
    root, md5 = cifar_root
    monkeypatch.setattr(CIFAR100, 'train_list', [['train', md5['train']]])
    monkeypatch.setattr(CIFAR100, 'test_list', [['test', md5['test']]])
    return root


@pytest.fixture(scope='module')
def demo_ade(tmp_path_factory):
    from mmctx.datasets import generate_demo_ade20k
    root = tmp_path_factory.mktemp('demo') / 'ade_shapes'
    generate_demo_ade20k(str(root), num_images=6, seed=0)
    return root


def _options(name, cfg, request):
    """The shrink-and-point-at-data overrides for config ``name``."""
    kind = _kind(name)
    if kind in ('det', 'upstream_det'):
        return det_options(cfg)
    if kind in ('seg', 'dilated_seg', 'upstream_seg'):
        return seg_options(cfg)
    if kind == 'demo_det':
        return demo_det_options(cfg, request.getfixturevalue('demo_coco'))
    if kind == 'demo_seg':
        return demo_seg_options(cfg, request.getfixturevalue('demo_ade'))
    if kind == 'imagenet':
        return cls_options(cfg, request.getfixturevalue('imagenet_root'))
    return cls_options(cfg, request.getfixturevalue('fake_cifar'))


# --------------------------------------------------------------------------
# every config builds its model and its train / val pipelines
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_config_builds_model_and_pipelines(name, request):
    import mmctx  # noqa: F401
    from mmengine.registry import DATASETS, MODELS, init_default_scope
    cfg = load_config(name)
    cfg.merge_from_dict(_options(name, cfg, request))
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    stem = name.rsplit('_', 1)[0] if name.startswith('imagenet') else name
    if stem in PARAMS:
        assert n_params == PARAMS[stem], (name, n_params)
    for loader in ('train_dataloader', 'val_dataloader'):
        dataset = DATASETS.build(cfg[loader].dataset)
        assert len(dataset) > 0
        sample = dataset[0]
        assert 'inputs' in sample and 'data_samples' in sample, loader
        assert sample['inputs'].ndim == 3


# --------------------------------------------------------------------------
# detection / segmentation: tools/train.py + tools/test.py
# --------------------------------------------------------------------------
def _tool_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO_ROOT)] +
        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['OMP_NUM_THREADS'] = '1'
    env['MKL_NUM_THREADS'] = '1'
    return env


def _run_tool(args, log_file, timeout=900):
    with open(log_file, 'w') as log:
        proc = subprocess.run([sys.executable, *map(str, args)],
                              cwd=str(REPO_ROOT), env=_tool_env(),
                              stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc.returncode, log_file.read_text()


def _train_then_test(name, options, work_dir):
    """tools/train.py, then tools/test.py on its checkpoint. Returns a dict
    with each step's return code and output."""
    result = {}
    tools = REPO_ROOT / 'tools'
    rc, out = _run_tool([tools / 'train.py', config_path(name), '--work-dir',
                         work_dir, *cli_options(options)],
                        work_dir.parent / f'{name}_train.log')
    result['train'] = (rc, out)
    if rc != 0:
        return result
    try:
        ckpt = find_checkpoint(work_dir)
    except AssertionError as e:
        result['test'] = (-1, str(e))
        return result
    result['test'] = _run_tool(
        [tools / 'test.py', config_path(name), ckpt, '--work-dir',
         work_dir / 'test', *cli_options(options)],
        work_dir.parent / f'{name}_test.log')
    return result


class _ToolRuns:
    """Starts the train+test runs of the selected configs, two at a time,
    in the order the tests will ask for them."""

    def __init__(self, names, options, base_dir, workers=2):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures = {}
        self.work_dirs = {}
        for name in names:
            work_dir = base_dir / name
            work_dir.mkdir(parents=True)
            self.work_dirs[name] = work_dir
            self._futures[name] = self._pool.submit(
                _train_then_test, name, options[name], work_dir)

    def result(self, name):
        return self._futures[name].result()

    def close(self):
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)


@pytest.fixture(scope='module')
def tool_runs(request, tmp_path_factory):
    """The train+test runs of the RUN_CONFIGS selected in this session."""
    selected = []
    for item in request.session.items:
        if getattr(item, 'originalname', None) == \
                'test_train_and_test_with_tools' and \
                item.module.__name__ == request.module.__name__:
            selected.append(item.callspec.params['name'])
    options = {}
    for name in selected:
        cfg = load_config(name)
        options[name] = _options(name, cfg, request)
    runs = _ToolRuns(selected, options, tmp_path_factory.mktemp('tools'))
    yield runs
    runs.close()


def _tail(text, n=4000):
    return text[-n:]


def _errors(text, n=6000):
    """The lines that look like errors, then the tail of ``text``."""
    lines = [
        line for line in text.splitlines()
        if re.search(r'Error|error:|Traceback|Abort|terminate', line)
    ]
    return '\n'.join(lines[-40:]) + '\n--- tail ---\n' + _tail(text, n)


@pytest.mark.parametrize('name', RUN_CONFIGS)
def test_train_and_test_with_tools(name, tool_runs):
    result = tool_runs.result(name)
    rc, out = result['train']
    assert rc == 0, f'tools/train.py {name} failed:\n{_errors(out)}'
    rc, test_out = result['test']
    assert rc == 0, f'tools/test.py {name} failed:\n{_errors(test_out)}'
    det = name in DET_CONFIGS + UPSTREAM_DET_CONFIGS + DEMO_DET_CONFIGS
    metric = 'coco/bbox_mAP' if det else 'mIoU'
    if name.startswith('mask_rcnn'):
        # box and mask AP
        assert re.search(r'\(test\).*coco/segm_mAP: ', test_out), \
            _tail(test_out)
    # trained the requested iterations, validated at the end ...
    assert re.search(r'(Epoch\(train\)\s*\[1\]|Iter\(train\)\s*)\[2/2\]',
                     out), _tail(out)
    assert re.search(r'(Epoch|Iter)\(val\).*' + re.escape(metric) + ': ',
                     out), _tail(out)
    # ... and the test pass on the checkpoint reports the metric
    assert re.search(r'(Epoch|Iter)\(test\).*' + re.escape(metric) + ': ',
                     test_out), _tail(test_out)
    records = read_scalars(tool_runs.work_dirs[name])
    assert any(metric in r for r in records)


# --------------------------------------------------------------------------
# classification: two iterations in-process
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', CLS_CONFIGS)
def test_classification_config_trains(name, request, tmp_path):
    import mmctx  # noqa: F401
    from mmengine.runner import Runner
    cfg = load_config(name)
    cfg.merge_from_dict(_options(name, cfg, request))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.experiment_name = f'{name}_{tmp_path.name}'
    cfg.launcher = 'none'
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    records = read_scalars(cfg.work_dir)
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any('accuracy/top1' in r for r in records)


# --------------------------------------------------------------------------
# tools/dist_train.sh with two CPU processes
# --------------------------------------------------------------------------
DIST_CASES = {
    'faster_rcnn_sb_r50':
    lambda cfg: det_options(cfg, train_images=4, val_images=2),
    'fpn_sb_r50_ade20k':
    lambda cfg: seg_options(cfg, train_batch=1, val_images=2),
}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='exercises the CPU (gloo) path')
@pytest.mark.parametrize('name', list(DIST_CASES))
def test_dist_train_two_processes(name, tmp_path, free_port):
    cfg = load_config(name)
    work_dir = tmp_path / 'work'
    env = _tool_env()
    env.update(PORT=str(free_port), PYTHON=sys.executable)
    log_file = tmp_path / 'dist_train.log'
    with open(log_file, 'w') as f:
        proc = subprocess.run(
            ['bash', REPO_ROOT / 'tools' / 'dist_train.sh',
             config_path(name), '2', '--work-dir', work_dir,
             *cli_options(DIST_CASES[name](cfg))],
            cwd=str(REPO_ROOT), env=env, stdout=f, stderr=subprocess.STDOUT,
            timeout=900)
    log = log_file.read_text()
    assert proc.returncode == 0, (
        f'dist_train.sh {name} 2 failed ({proc.returncode}); full log: '
        f'{log_file}\n' + _errors(log))
    assert 'Distributed training: True' in log
    assert re.search(r'(Epoch|Iter)\(train\).*\[2/2\]', log), _tail(log)
    metric = 'coco/bbox_mAP' if 'rcnn' in name else 'mIoU'
    assert re.search(r'\(val\).*' + re.escape(metric) + ': ', log), \
        _tail(log)
    find_checkpoint(work_dir)


def test_shared_data_present():
    assert (TINY_COCO / 'annotations' / 'instances_train2017.json').is_file()


# --------------------------------------------------------------------------
# mmengine's compile=True: the Runner compiles train_step (torch.compile,
# inductor); a shipped detection and segmentation config train with it
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['faster_rcnn_sb_r50', 'fpn_sb_r50_ade20k'])
def test_train_with_mmengine_compile(name, request, tmp_path):
    """Two iterations of one input size (a new size would compile again:
    inductor needs about 5 minutes for Faster R-CNN on 2 CPU cores). The
    segmentor's second iteration compiles again (6 more minutes with
    inductor, measured): there ``compile`` takes the same capture without
    inductor's code generation (``backend='aot_eager'``)."""
    from config_overrides import _pipeline_index
    cfg = load_config(name)
    options = _options(name, cfg, request)
    if name.startswith('faster'):
        options['compile'] = True
        idx = _pipeline_index(cfg, 'train_dataloader', 'Resize')
        options[f'train_dataloader.dataset.pipeline.{idx}.keep_ratio'] = \
            False
    else:
        options['compile.backend'] = 'aot_eager'
    work_dir = tmp_path / name
    rc, out = _run_tool([REPO_ROOT / 'tools' / 'train.py',
                         config_path(name), '--work-dir', work_dir,
                         *cli_options(options)], tmp_path / 'train.log',
                        timeout=1500)
    assert rc == 0, f'tools/train.py {name} compile=True failed:\n' \
        f'{_errors(out)}'
    assert 'Model has been "compiled"' in out
    assert re.search(r'(Epoch\(train\)\s*\[1\]|Iter\(train\)\s*)\[2/2\]',
                     out), _tail(out)
    losses = [r['loss'] for r in read_scalars(work_dir) if 'loss' in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
