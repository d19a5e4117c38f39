#!/usr/bin/env python
"""Draw the context maps of an mmctx model for one image.

    python tools/analysis/visualize_context.py CONFIG CHECKPOINT IMAGE \
        --out-dir DIR [--cfg-options k=v ...] [--device cpu]

Works for any detection, segmentation or classification config whose model
contains SpatialBias, GatherExcite or PatchSpatialInteraction modules: the
maps (SB's upsampled bias maps, GE's gates, PSI's patch weights) are captured
by forward hooks while the image runs through the model at its own size, and
written per module as PNGs of the image's size, plus ``overview.png`` (the
last block of every stage) and the raw values in ``context_maps.npz``. A
Pretrained ``init_cfg`` in the config is ignored: the checkpoint supplies
every weight. See :mod:`mmctx.visualization`.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Draw the SB / GE / PSI context maps of a model for one '
        'image, at the image\'s own size')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='image file')
    parser.add_argument('--out-dir', required=True, help='output folder')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads (default 2)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides, key=value')
    return parser.parse_args()


def main():
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    import mmctx  # noqa: F401
    from mmctx.visualization import NoContextModulesError, visualize_context
    try:
        paths = visualize_context(args.config, args.checkpoint, args.image,
                                  args.out_dir, cfg_options=args.cfg_options,
                                  device=args.device)
    except (NoContextModulesError, FileNotFoundError) as err:
        sys.exit(f'error: {err}')
    print(f'{len(paths)} files written to {args.out_dir}:')
    for path in paths:
        print(f'  {path}')


if __name__ == '__main__':
    main()
