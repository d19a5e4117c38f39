"""Helpers for tests/test_configs.py: the experiment configs in configs/, and
the overrides that point them at small data and shrink them so that a run
takes seconds on a CPU.

Every override is a flat ``{'dotted.key': value}`` dict, usable both
in-process (``Config.merge_from_dict``) and on the command line of the tools
(:func:`cli_options` turns it into ``--cfg-options`` arguments that mmengine's
``DictAction`` parses back to the same values).
"""
import hashlib
import json
import os.path as osp
import pickle
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / 'configs'
SHARED_DATA = (REPO_ROOT / '..' / 'shared' / 'data').resolve()
TINY_COCO = SHARED_DATA / 'tiny_coco'
ADE20K_SAMPLE = SHARED_DATA / 'ade20k_sample'
COCO_ANN = 'annotations/instances_train2017.json'


def _names(pattern):
    return sorted(p.stem for p in CONFIG_DIR.glob(pattern))


# (configs/demo_faster_rcnn_r50.py belongs to the demo and is tested there)
DEMO_DET_CONFIGS = _names('demo_*rcnn_sb*.py')
DEMO_SEG_CONFIGS = _names('demo_fpn*.py')
# upstream mmdet's recipes unchanged, the backbone changed: Mask R-CNN,
# RetinaNet, Faster R-CNN ResNeXt
UPSTREAM_DET_CONFIGS = _names('mask_rcnn_*.py') + _names('retinanet_*.py') + \
    _names('faster_rcnn_*x101*.py')
# the paper's recipe (2 GPUs x 8 images): Faster / Cascade R-CNN R50
DET_CONFIGS = [n for n in _names('*_rcnn_*.py')
               if not n.startswith('demo_') and n not in UPSTREAM_DET_CONFIGS]
SEG_CONFIGS = _names('fpn_*_ade20k.py')
# dilated ResNet (mmseg's ResNetV1c settings, contract_dilation), upstream's
# own recipe
DILATED_SEG_CONFIGS = _names('pspnet_*_ade20k.py')
# UPerNet, upstream mmseg's recipe, ResNetV1c family
UPSTREAM_SEG_CONFIGS = _names('upernet_*_ade20k.py')
IMAGENET_CONFIGS = _names('imagenet_*.py')
CIFAR_CONFIGS = _names('cifar100_*.py')
ALL_CONFIGS = sorted(DET_CONFIGS + UPSTREAM_DET_CONFIGS + SEG_CONFIGS +
                     DILATED_SEG_CONFIGS + UPSTREAM_SEG_CONFIGS +
                     IMAGENET_CONFIGS +
                     CIFAR_CONFIGS + DEMO_DET_CONFIGS + DEMO_SEG_CONFIGS)

DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def config_path(name):
    return CONFIG_DIR / f'{name}.py'


_CONFIGS = {}


def load_config(name, options=None):
    """``configs/<name>.py`` (parsed once per session; every call returns a
    fresh copy), with ``options`` merged in."""
    import copy

    from mmengine.config import Config
    if name not in _CONFIGS:
        _CONFIGS[name] = Config.fromfile(str(config_path(name)))
    cfg = copy.deepcopy(_CONFIGS[name])
    if options:
        cfg.merge_from_dict(options)
    return cfg


def iter_strings(obj):
    """Every string anywhere inside a (nested) config value."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_strings(key)
            yield from iter_strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_strings(value)


def _pipeline_index(cfg, loader, transform):
    """Index of the first ``transform`` in ``cfg[loader].dataset.pipeline``."""
    pipeline = cfg[loader]['dataset']['pipeline']
    for i, t in enumerate(pipeline):
        if t['type'] == transform:
            return i
    raise KeyError(f'no {transform} in {loader}.dataset.pipeline')


def _loader_options(loader, batch_size):
    return {
        f'{loader}.batch_size': batch_size,
        f'{loader}.num_workers': 0,
        f'{loader}.persistent_workers': False,
    }


# --------------------------------------------------------------------------
# detection (mmdet): tiny_coco (16 COCO images) used as train, val and test
# --------------------------------------------------------------------------
def det_options(cfg, data_root=TINY_COCO, ann_file=COCO_ANN,
                img_prefix='train2017/', scale=(320, 320), train_images=2,
                val_images=1, test_images=2):
    """Train ``train_images`` iterations (batch 1, one epoch), validate on
    ``val_images`` and test on ``test_images`` images at ``scale``, from
    scratch (no backbone checkpoint). Proposals are kept whatever their score
    so that the COCO metric has boxes to evaluate after two iterations."""
    data_root = str(data_root) + '/'
    opts = {'model.backbone.init_cfg': None}
    sizes = dict(train_dataloader=train_images, val_dataloader=val_images,
                 test_dataloader=test_images)
    for loader in DATALOADERS:
        opts.update(_loader_options(loader, 1))
        opts[f'{loader}.dataset.data_root'] = data_root
        opts[f'{loader}.dataset.ann_file'] = ann_file
        opts[f'{loader}.dataset.data_prefix.img'] = img_prefix
        opts[f'{loader}.dataset.indices'] = sizes[loader]
        idx = _pipeline_index(cfg, loader, 'Resize')
        opts[f'{loader}.dataset.pipeline.{idx}.scale'] = tuple(scale)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        opts[f'{evaluator}.ann_file'] = data_root + ann_file
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        opts['train_cfg.max_iters'] = train_images
        opts['train_cfg.val_interval'] = train_images
        opts['default_hooks.checkpoint.interval'] = train_images
    else:
        opts['train_cfg.max_epochs'] = 1
        opts['train_cfg.val_interval'] = 1
        opts['default_hooks.checkpoint.interval'] = 1
    if 'rcnn' in cfg.model.test_cfg:
        opts['model.test_cfg.rcnn.score_thr'] = 0.0
        # fewer proposals: faster on CPU, same code paths
        opts['model.train_cfg.rpn_proposal.max_per_img'] = 256
        opts['model.test_cfg.rpn.max_per_img'] = 100
    else:  # one-stage (RetinaNet)
        opts['model.test_cfg.score_thr'] = 0.0
        opts['model.test_cfg.nms_pre'] = 100
    opts['default_hooks.logger.interval'] = 1
    return opts


def demo_det_options(cfg, demo_coco_root, **kwargs):
    """:func:`det_options` for the demo configs on a generated shapes set."""
    kwargs.setdefault('ann_file', 'annotations/instances_train.json')
    kwargs.setdefault('img_prefix', 'train/')
    return det_options(cfg, data_root=demo_coco_root, **kwargs)


# --------------------------------------------------------------------------
# segmentation (mmseg): ade20k_sample (3 ADE20K val images) as train/val/test
# --------------------------------------------------------------------------
def seg_options(cfg, data_root=ADE20K_SAMPLE, split='validation', crop=128,
                scale=(256, 128), train_batch=2, iters=2, val_images=1,
                test_images=2):
    """Train ``iters`` iterations of ``train_batch`` ``crop``x``crop`` crops,
    validate on ``val_images`` and test on ``test_images`` whole images
    resized to fit ``scale``, from scratch."""
    opts = {
        'model.backbone.init_cfg': None,
        'model.data_preprocessor.size': (crop, crop),
    }
    sizes = dict(train_dataloader=None, val_dataloader=val_images,
                 test_dataloader=test_images)
    for loader in DATALOADERS:
        batch = train_batch if loader == 'train_dataloader' else 1
        opts.update(_loader_options(loader, batch))
        opts[f'{loader}.dataset.data_root'] = str(data_root)
        opts[f'{loader}.dataset.data_prefix.img_path'] = f'images/{split}'
        opts[f'{loader}.dataset.data_prefix.seg_map_path'] = \
            f'annotations/{split}'
        if sizes[loader]:
            opts[f'{loader}.dataset.indices'] = sizes[loader]
    idx = _pipeline_index(cfg, 'train_dataloader', 'RandomResize')
    opts[f'train_dataloader.dataset.pipeline.{idx}.scale'] = tuple(scale)
    idx = _pipeline_index(cfg, 'train_dataloader', 'RandomCrop')
    opts[f'train_dataloader.dataset.pipeline.{idx}.crop_size'] = (crop, crop)
    for loader in ('val_dataloader', 'test_dataloader'):
        idx = _pipeline_index(cfg, loader, 'Resize')
        opts[f'{loader}.dataset.pipeline.{idx}.scale'] = tuple(scale)
    opts['train_cfg.max_iters'] = iters
    opts['train_cfg.val_interval'] = iters
    opts['default_hooks.checkpoint.interval'] = iters
    opts['default_hooks.logger.interval'] = 1
    return opts


def demo_seg_options(cfg, demo_ade_root, **kwargs):
    """:func:`seg_options` for the demo config on a generated shapes set."""
    kwargs.setdefault('split', 'training')
    return seg_options(cfg, data_root=demo_ade_root, **kwargs)


# --------------------------------------------------------------------------
# classification (mmpretrain): generated ImageNet / CIFAR-100 lookalikes
# --------------------------------------------------------------------------
def make_imagenet(root, num_classes=2, per_class=2, size=(40, 48), seed=0):
    """A tiny data set in mmpretrain's ImageNet layout (``train/``, ``val/``,
    ``meta/{train,val}.txt``) with random JPEGs; returns ``root``."""
    import cv2
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in ('train', 'val'):
        lines = []
        for label in range(num_classes):
            folder = root / split / f'n{label:08d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                name = f'n{label:08d}/{split}_{i}.JPEG'
                img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                cv2.imwrite(str(root / split / name), img)
                lines.append(f'{name} {label}')
        (root / 'meta').mkdir(exist_ok=True)
        (root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return root


def make_cifar100(root, num_train=4, num_test=2, seed=0):
    """CIFAR-100 python pickles (``cifar-100-python/{train,test,meta}``) with
    random images. Returns ``{'train': md5, 'test': md5}`` -- mmpretrain
    checks the files' md5 against the real data set's, so a test patches
    ``CIFAR100.train_list`` / ``test_list`` with these."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / 'cifar-100-python'
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for split, n in (('train', num_train), ('test', num_test)):
        entry = {
            'data': rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            'fine_labels': [int(v) for v in rng.integers(0, 100, size=n)],
            'coarse_labels': [0] * n,
        }
        path = folder / split
        path.write_bytes(pickle.dumps(entry))
        md5[split] = hashlib.md5(path.read_bytes()).hexdigest()
    (folder / 'meta').write_bytes(
        pickle.dumps({'fine_label_names': [f'c{i}' for i in range(100)]}))
    return md5


def cls_options(cfg, data_root, train_batch=2, val_batch=2, crop=64):
    """Train one epoch of the generated data set (4 images, batch 2: two
    iterations) and validate once; ImageNet crops shrunk to ``crop``."""
    opts = {'model.backbone.init_cfg': None}
    resizes = dict(RandomResizedCrop=('scale', crop),
                   ResizeEdge=('scale', crop * 8 // 7),
                   CenterCrop=('crop_size', crop))
    for loader in DATALOADERS:
        for i, t in enumerate(cfg[loader]['dataset']['pipeline']):
            if t['type'] in resizes:
                key, value = resizes[t['type']]
                opts[f'{loader}.dataset.pipeline.{i}.{key}'] = value
    for loader in DATALOADERS:
        opts.update(
            _loader_options(
                loader,
                train_batch if loader == 'train_dataloader' else val_batch))
        opts[f'{loader}.dataset.data_root'] = str(data_root)
    opts['train_cfg.max_epochs'] = 1
    opts['train_cfg.val_interval'] = 1
    opts['default_hooks.logger.interval'] = 1
    opts['default_hooks.checkpoint.interval'] = 1
    return opts


# --------------------------------------------------------------------------
def cli_options(options):
    """``--cfg-options`` arguments for ``options`` (values written so that
    mmengine's DictAction reads back the same Python values)."""
    args = []
    for key, value in options.items():
        if value is None:
            text = 'None'
        elif isinstance(value, bool):
            text = str(value)
        elif isinstance(value, (tuple, list)):
            inner = ','.join(str(v) for v in value)
            text = f'({inner})' if isinstance(value, tuple) else f'[{inner}]'
        else:
            text = str(value)
        args.append(f'{key}={text}')
    return ['--cfg-options', *args] if args else []


def read_scalars(work_dir):
    """Every ``scalars.json`` record under ``work_dir`` (mmengine's
    LocalVisBackend), as a list of dicts."""
    records = []
    for path in sorted(Path(work_dir).rglob('scalars.json')):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def find_checkpoint(work_dir):
    """The checkpoint named in ``work_dir/last_checkpoint``."""
    last = Path(work_dir) / 'last_checkpoint'
    assert last.is_file(), f'no last_checkpoint in {work_dir}'
    path = last.read_text().strip()
    assert osp.isfile(path), f'missing checkpoint {path}'
    return path
