#!/usr/bin/env python
"""Test (evaluate) a checkpoint with any mmctx / mmdet / mmseg / mmpretrain
config; the registry scope comes from the config's ``default_scope``.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]
        [--show] [--show-dir DIR] [--wait-time SECONDS]
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmctx  # noqa: E402,F401  (registers modules, applies mmctx.compat)
from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmctx.show_results import (NoDisplayError, check_display,  # noqa: E402
                                trigger_visualization_hook)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions to a pickle file (.pkl) for offline '
        'evaluation')
    parser.add_argument(
        '--show', action='store_true',
        help='show the drawn predictions in a window (needs a display)')
    parser.add_argument(
        '--show-dir',
        help='write the drawn predictions of every test image to this '
        'directory (relative to the current directory)')
    parser.add_argument(
        '--wait-time', type=float, default=2,
        help='with --show: seconds each image is shown (0: until a key)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if args.show:
        try:
            check_display()
        except NoDisplayError as e:
            parser.error(str(e))
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def dump_metric(scope, out_file):
    """The evaluator that dumps raw predictions for ``scope``."""
    if scope == 'mmdet':
        # converts DetDataSample -> dicts of numpy arrays like mmdet's tool
        return ConfigDict(type='mmdet.DumpDetResults', out_file_path=out_file)
    return ConfigDict(type='mmengine.DumpResults', out_file_path=out_file)


def main():
    args = parse_args()

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        trigger_visualization_hook(cfg, args.show, args.show_dir,
                                   args.wait_time)

    if args.out is not None:
        assert args.out.endswith(('.pkl', '.pickle')), \
            'The dump file must be a pkl file.'
        metric = dump_metric(cfg.get('default_scope', None), args.out)
        if isinstance(cfg.test_evaluator, (list, tuple)):
            cfg.test_evaluator = list(cfg.test_evaluator) + [metric]
        else:
            cfg.test_evaluator = [cfg.test_evaluator, metric]

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.test()


if __name__ == '__main__':
    main()
