"""Where a context backbone's extra time goes: per-op self CPU time of a
training step (or an inference pass) against plain ResNet-50, from the
PyTorch profiler (medians over repeats), largest differences first.

    python tools/analysis/profile_overhead.py --models SB-R50 PSI-R50
    python tools/analysis/profile_overhead.py --setting segmentation \
        --shape 224x224 --batch 4
    python tools/analysis/profile_overhead.py --eval --shape 224x224 --batch 8
"""
import argparse
import os
import sys

import torch
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers the mmctx backbones)
from mmctx.benchmark import (BACKBONES, SETTINGS,  # noqa: E402
                             TrainingStep, backbone_cfg, op_self_times,
                             op_time_difference)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', choices=list(BACKBONES)[1:],
                   default=list(BACKBONES)[1:6],
                   help='models to compare with R50 (default: mmctx ones)')
    p.add_argument('--shape', default='800x1216', help='HxW (800x1216)')
    p.add_argument('--batch', type=int, default=1, help='batch size (1)')
    p.add_argument('--eval', action='store_true',
                   help='profile inference (eval, no_grad), not training')
    p.add_argument('--repeats', type=int, default=3,
                   help='profiled calls per model (median)')
    p.add_argument('--top', type=int, default=8, help='ops shown per model')
    p.add_argument('--threads', type=int, help='intra-op threads')
    p.add_argument('--setting', choices=list(SETTINGS), default='detection',
                   help='build the backbones as the detection configs '
                   '(norm_eval, frozen stage 1) or the segmentation / '
                   'classification configs (training BN) do')
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    MMLogger.get_instance('profile_overhead', log_level='WARNING')
    h, w = (int(s) for s in args.shape.lower().split('x'))
    x = torch.randn(args.batch, 3, h, w)
    mode = 'inference' if args.eval else 'training step'
    # denormals flushed, as complexity.py times (GPUs compute them at speed)
    torch.set_flush_denormal(True)
    print(f'# Self CPU time per op, {mode}, {h}x{w} batch {args.batch}, '
          f'{args.setting} setting, {torch.get_num_threads()} threads; '
          f'median of {args.repeats}; denormals flushed\n')
    times = {}
    for name in ['R50'] + args.models:
        model = MODELS.build(backbone_cfg(name, args.setting))
        model.init_weights()
        if args.eval:
            model.eval()
            call = torch.no_grad()(model)
        else:
            call = TrainingStep(model)
        times[name] = op_self_times(call, x, args.repeats)
        del model, call
    base = times['R50']
    for name in args.models:
        total, base_total = sum(times[name].values()), sum(base.values())
        print(f'## {name}: {total:.0f} ms vs R50 {base_total:.0f} ms '
              f'({total / base_total:.3f}x)\n')
        print('| op | ms | ms more than R50 |\n|---|---:|---:|')
        for op, ms, more in op_time_difference(times[name], base)[:args.top]:
            print(f'| `{op}` | {ms:.1f} | {more:+.1f} |')
        print()


if __name__ == '__main__':
    main()
