#!/usr/bin/env python
"""Write ``configs/metafile.yml`` (OpenMMLab model-index format) for the
experiment configs in ``configs/`` (all but ``demo_*`` / ``probe_*``).

What is measured, per config (every model built through the registry from
the config, backbone checkpoint switched off: ``init_cfg=None``):

- ``Parameters``: every parameter of the whole model (backbone, neck, heads)
  as the config builds it (80 COCO / 150 ADE20K / 1000 ImageNet / 100
  CIFAR-100 classes);
- ``FLOPs``: the **backbone only**, one image, eval mode, at the config's
  input size -- detection 800x1333 (the ``Resize`` scale 1333x800), ADE20K
  512x512 (the crop), ImageNet 224x224 (the test crop of both recipes),
  CIFAR 32x32 -- counted with mmengine's ``FlopAnalyzer`` like
  ``tools/analysis/complexity.py`` (1 multiply-add = 1 FLOP, plus one FLOP
  per averaged element for the ``mean`` / ``avg_pool2d`` that mmengine leaves
  uncounted).

Everything else (paper, task, dataset, the paper's metrics, schedule) is the
table below. Weights stay null until checkpoints are published.

    python tools/analysis/make_metafile.py [--out configs/metafile.yml]
"""
import argparse
import importlib.util
import os
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)

SB_PAPER = dict(URL='https://arxiv.org/abs/2302.12505',
                Title='Spatial Bias for Attention-free Non-local Neural '
                'Networks')
GE_PAPER = dict(URL='https://arxiv.org/abs/1810.12348',
                Title='Gather-Excite: Exploiting Feature Context in '
                'Convolutional Neural Networks')
# a fast.ai forum post; no arXiv / proceedings version exists
PSI_PAPER = dict(URL='https://forums.fast.ai/t/'
                 'patch-spatial-interactions-for-long-range-dependencies-in-'
                 'cnns/94050',
                 Title='Patch Spatial Interactions for Long-Range '
                 'Dependencies in CNNs')

COLLECTIONS = [
    dict(Name='SpatialBias', paper=SB_PAPER,
         readme='docs/model_zoo/spatial_bias.md',
         code='mmctx/models/spatial_bias.py',
         architecture=['Spatial Bias', 'ResNet', 'Non-local Block',
                       'Global Context Block']),
    dict(Name='GatherExcite', paper=GE_PAPER,
         readme='docs/model_zoo/gather_excite.md',
         code='mmctx/models/gather_excite.py',
         architecture=['Gather-Excite', 'ResNet']),
    dict(Name='PatchSpatialInteraction', paper=PSI_PAPER,
         readme='docs/model_zoo/patch_spatial_interaction.md',
         code='mmctx/models/patch_spatial_interaction.py',
         architecture=['Patch Spatial Interaction', 'ResNet']),
]

KINDS = {
    # kind: task, dataset, metric, FLOPs input (H, W), architecture
    'faster': ('Object Detection', 'COCO', 'box AP', (800, 1333),
               ['Faster R-CNN', 'FPN', 'RPN']),
    'cascade': ('Object Detection', 'COCO', 'box AP', (800, 1333),
                ['Cascade R-CNN', 'FPN', 'RPN']),
    'fpn': ('Semantic Segmentation', 'ADE20K', 'mIoU', (512, 512),
            ['Semantic FPN']),
    'pspnet': ('Semantic Segmentation', 'ADE20K', 'mIoU', (512, 512),
               ['PSPNet', 'Dilated ResNet']),
    'mask': ('Object Detection', 'COCO', 'box AP', (800, 1333),
             ['Mask R-CNN', 'FPN', 'RPN']),
    'retinanet': ('Object Detection', 'COCO', 'box AP', (800, 1333),
                  ['RetinaNet', 'FPN', 'Focal Loss']),
    'upernet': ('Semantic Segmentation', 'ADE20K', 'mIoU', (512, 512),
                ['UPerNet']),
    'imagenet': ('Image Classification', 'ImageNet-1k', 'Top 1 Accuracy',
                 (224, 224), []),
    'cifar100': ('Image Classification', 'CIFAR-100', 'Top 1 Accuracy',
                 (32, 32), []),
}

# The paper's numbers (Go & Ryu, arXiv 2302.12505). The ImageNet pair is
# given without saying which of the two recipes produced it: both configs
# carry it (as README.md's config table does).
PAPER_METRICS = {
    'faster_rcnn_r50': 39.0,
    'faster_rcnn_sb_r50': 40.0,
    'cascade_rcnn_r50': 41.9,
    'cascade_rcnn_sb_r50': 42.8,
    'imagenet_r50_sgd': 76.05,
    'imagenet_sb_r50_sgd': 76.86,
    'imagenet_r50_lamb': 76.05,
    'imagenet_sb_r50_lamb': 76.86,
}


def experiment_configs():
    names = []
    for fname in sorted(os.listdir(osp.join(ROOT, 'configs'))):
        if fname.endswith('.py') and not fname.startswith(('demo_', 'probe_')):
            names.append(fname[:-3])
    return names


def kind_of(name):
    for kind in KINDS:
        if name.startswith(kind):
            return kind
    raise KeyError(name)


def collection_of(name):
    if '_ge_' in name:
        return 'GatherExcite'
    if '_psi_' in name:
        return 'PatchSpatialInteraction'
    return 'SpatialBias'  # SB configs and the paper's ResNet baselines


def _complexity_module():
    spec = importlib.util.spec_from_file_location(
        'mmctx_complexity_tool',
        osp.join(ROOT, 'tools', 'analysis', 'complexity.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(name):
    """The model of ``configs/<name>.py``, built without any checkpoint."""
    import mmctx  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(osp.join(ROOT, 'configs', f'{name}.py'))
    cfg.model.backbone.init_cfg = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    init_default_scope(cfg.default_scope)
    return cfg, MODELS.build(cfg.model)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def measure(name, count_flops):
    import torch
    cfg, model = build_model(name)
    params = count_parameters(model)
    h, w = KINDS[kind_of(name)][3]
    # FLOPs of the same backbone unfrozen (frozen SB stages hold split
    # parameters that jit tracing cannot take as constants; same ops)
    from mmengine.registry import MODELS
    bb_cfg = cfg.model.backbone.copy()
    if 'frozen_stages' in bb_cfg:
        bb_cfg.frozen_stages = -1
    if bb_cfg.get('norm_cfg', {}).get('type') == 'SyncBN':
        bb_cfg.norm_cfg = dict(bb_cfg.norm_cfg, type='BN')
    backbone = MODELS.build(bb_cfg).eval()
    assert count_parameters(backbone) == count_parameters(model.backbone)
    with torch.no_grad():
        flops, uncounted = count_flops(backbone, torch.rand(1, 3, h, w))
    return cfg, params, int(flops), sorted(uncounted)


def schedule(cfg):
    loop = cfg.train_cfg
    if loop.get('type', '').startswith('IterBased') or 'max_iters' in loop:
        return {'Iterations': int(loop.max_iters)}
    return {'Epochs': int(loop.max_epochs)}


def techniques(cfg):
    opt = cfg.optim_wrapper.optimizer.type
    out = {'SGD': ['SGD with Momentum', 'Weight Decay'],
           'AdamW': ['AdamW', 'Weight Decay'],
           'Lamb': ['LAMB', 'Weight Decay']}.get(opt, [opt])
    return out


GPUS = {'faster': 2, 'cascade': 2, 'fpn': 2, 'pspnet': 4, 'imagenet': 8,
        'cifar100': 1, 'mask': 8, 'retinanet': 8, 'upernet': 4}


def gpus(name):
    # the paper's recipe: 2 GPUs for Faster / Cascade R-CNN R50; the
    # ResNeXt configs keep upstream's 8
    return 8 if 'x101' in name else GPUS[kind_of(name)]


def model_entry(name, cfg, params, flops):
    kind = kind_of(name)
    task, dataset, metric, (h, w), arch = KINDS[kind]
    meta = {
        'Training Data': dataset,
        'Training Techniques': techniques(cfg),
        'Training Resources':
        f'{gpus(name)}x GPU{"s" if gpus(name) > 1 else ""}',
        'Batch Size': gpus(name) * int(cfg.train_dataloader.batch_size),
        **schedule(cfg),
        'Parameters': params,
        'FLOPs': flops,
        'FLOPs input size': f'{h}x{w}',
        'Architecture': arch + [cfg.model.backbone.type],
    }
    return {
        'Name': name,
        'In Collection': collection_of(name),
        'Config': f'configs/{name}.py',
        'Metadata': meta,
        'Results': [{
            'Task': task,
            'Dataset': dataset,
            'Metrics': {metric: PAPER_METRICS.get(name)},
        }],
        'Weights': None,
    }


HEADER = """\
# Model index of the mmctx experiment configs (OpenMMLab model-index format,
# like mmdet's configs/gcnet/metafile.yml). Written by
# tools/analysis/make_metafile.py; checked by tests/test_metafile.py.
#
# - Results: the numbers the paper reports for that config's experiment
#   (Go & Ryu, arXiv 2302.12505: Faster R-CNN box AP 39.0 -> 40.0 with SB,
#   Cascade R-CNN 41.9 -> 42.8, ImageNet ResNet-50 top-1 76.05 -> 76.86 --
#   the paper does not say which ImageNet recipe, so both configs carry it);
#   null where no paper reports the experiment. Nothing here is ours yet.
# - Weights: null until checkpoints are published.
# - Parameters: the whole model as the config builds it (exact count).
# - FLOPs: the BACKBONE only, one image at 'FLOPs input size' (HxW), eval
#   mode, mmengine FlopAnalyzer (1 multiply-add = 1 FLOP, plus one FLOP per
#   averaged element for mean / avg_pool2d), as tools/analysis/complexity.py;
#   element-wise ops (ReLU, residual adds, GE / PSI gate sigmoid and
#   multiply) and max pooling are not counted (see docs/complexity.md).
#   Counted on the eager forward (the path training and inference run, not
#   the size-generic path of traced / exported graphs); torch 2.13 CPU.
# - Training Memory / inference time: not measured (no GPU runs yet).
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=osp.join(ROOT, 'configs',
                                                  'metafile.yml'))
    parser.add_argument('--configs', nargs='+',
                        help='measure only these, keep the other entries of '
                        '--out (default: measure every experiment config)')
    args = parser.parse_args()
    import yaml
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmengine', log_level='ERROR')
    count_flops = _complexity_module().count_flops
    names = args.configs or experiment_configs()
    kept = {}
    if args.configs and osp.isfile(args.out):
        with open(args.out, encoding='utf-8') as f:
            kept = {m['Name']: m for m in yaml.safe_load(f)['Models']}
    entries = {}
    for name in names:
        cfg, params, flops, uncounted = measure(name, count_flops)
        entries[name] = model_entry(name, cfg, params, flops)
        print(f'{name}: {params:,} params, {flops / 1e9:.2f} GFLOPs '
              f'(backbone){"; uncounted: " + ", ".join(uncounted) if uncounted else ""}',
              flush=True)
    models, techs = [], {c['Name']: set() for c in COLLECTIONS}
    data = {c['Name']: [] for c in COLLECTIONS}
    for name in experiment_configs():
        entry = entries.get(name) or kept.get(name)
        if entry is None:
            continue
        models.append(entry)
        coll = entry['In Collection']
        techs[coll].update(entry['Metadata']['Training Techniques'])
        if entry['Metadata']['Training Data'] not in data[coll]:
            data[coll].append(entry['Metadata']['Training Data'])
    collections = []
    for c in COLLECTIONS:
        collections.append({
            'Name': c['Name'],
            'Metadata': {
                'Training Data': data[c['Name']],
                'Training Techniques': sorted(techs[c['Name']]),
                'Training Resources': '1-8x GPUs (2 or 8 for COCO, 2 or 4 '
                'for ADE20K, 8 for ImageNet, 1 for CIFAR-100)',
                'Architecture': c['architecture'],
            },
            'Paper': c['paper'],
            'README': c['readme'],
            'Code': {'URL': c['code'], 'Version': 'v0.1.0'},
        })
    text = yaml.safe_dump({'Collections': collections, 'Models': models},
                          sort_keys=False, allow_unicode=True, width=79)
    with open(args.out, 'w', encoding='utf-8') as f:
        f.write(HEADER + '\n' + text)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
