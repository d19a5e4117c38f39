#!/usr/bin/env python
"""Long-range-context probe: train the same small ResNet-14 without context
and with SB, GE-θ⁺ and PSI on a synthetic task whose cue lies outside the
plain model's receptive field (see mmctx/probe.py), with the same schedule
and seed, through mmengine's Runner, and print one table.

    python tools/analysis/context_probe.py                 # all four
    python tools/analysis/context_probe.py --models plain SB --iters 200
    python tools/analysis/context_probe.py --visualize \
        --work-dir work_dirs/demo     # + predictions and context maps

--visualize also draws the validation predictions of every model and the
context maps (SB bias maps, GE gates, PSI patch weights) of one validation
image per stage, from the checkpoints the runs wrote, and prints the paths.
"""
import argparse
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--models', nargs='+', default=None,
        help='models to train (default: plain SB GE-θ⁺ PSI; "GE" also '
        'names GE-θ⁺)')
    parser.add_argument('--iters', type=int, default=None,
                        help='training iterations (default: the configs\')')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-dir', default='work_dirs/context_probe')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads (default 2)')
    parser.add_argument('--margin', type=float, default=25.0,
                        help='mIoU points a context model must gain over '
                        'the plain one to pass (default 25)')
    parser.add_argument('--visualize', action='store_true',
                        help='draw predictions and context maps')
    parser.add_argument('--out', default=None,
                        help='also write the table (Markdown) to this file')
    parser.add_argument('--log-level', default='WARNING',
                        help='log level of the runs (default WARNING)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides applied to every probe config')
    return parser.parse_args()


def main():
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    import mmctx  # noqa: F401
    from mmctx import probe

    models = args.models or list(probe.PROBE_MODELS)
    models = [probe.model_key(m) for m in models]
    options = dict(args.cfg_options or {})
    options.setdefault('log_level', args.log_level)
    start = time.perf_counter()
    rows, runners = probe.run_probe(
        models, iters=args.iters, work_dir=args.work_dir, seed=args.seed,
        cfg_options=options, keep_runners=args.visualize)
    wall = time.perf_counter() - start
    table = probe.format_table(rows)
    command = 'python ' + ' '.join(
        [osp.relpath(__file__)] + [a if ' ' not in a else repr(a)
                                   for a in sys.argv[1:]])
    print()
    print(f'Context probe ({rows[0]["iters"]} iterations per model, seed '
          f'{args.seed}, {torch.get_num_threads()} threads; '
          f'{wall:.0f} s in all):')
    print(table)
    verdicts = probe.verdicts(rows, args.margin)
    for line in verdicts:
        print(line)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(f'`{command}`\n\n{table}\n\n' + '\n'.join(verdicts) +
                    '\n')
        print(f'table written to {args.out}')
    if args.visualize:
        paths = probe.draw_demo_pictures(runners, args.work_dir)
        print('\nPictures:')
        for path in paths:
            print(f'  {path}')


if __name__ == '__main__':
    main()
