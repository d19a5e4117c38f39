"""Throughput (images/s) of the context backbones vs ResNet-50: training and
inference, float32 and AMP, eager and ``torch.compile``, each row one
interleaved run of every model (the SB paper's Table 9: 224x224, batch 64).

Every backbone is built as the shipped configs build it: at 224x224 as the
ImageNet configs (every BN trains), at the detection size as the detection
configs (``norm_eval=True``, ``frozen_stages=1``). Inference: eval mode,
``torch.no_grad()``; training: :class:`mmctx.benchmark.TrainingStep`
(forward, a loss that keeps the outputs alive, backward, SGD step). Images/s
is the batch over the median time of ``--repeats`` timed calls; the ratio
is the throughput ratio to R50 (below 1: slower), the inverse of
:func:`mmctx.benchmark.bracketed_ratio` against the R50 calls around each.
Compiled rows come after the eager ones, AMP first, and stop when
``--budget`` seconds have passed (the report says which were left out).

    python tools/analysis/throughput.py --device cuda --out throughput.md
    # CPU mode (what CI runs): tiny size, dynamo without a code generator
    python tools/analysis/throughput.py --device cpu --size 64x64x2 \\
        --repeats 1 --compile-backend eager
"""
import argparse
import os
import shlex
import sys
import time

import torch
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers SBResNet, GEResNet, PSIResNet)
from mmctx.benchmark import (BACKBONES, TrainingStep,  # noqa: E402
                             backbone_cfg, bracketed_ratio, time_interleaved)

# The SB paper's Table 9 (224x224, batch 64, one V100-class GPU), img/s.
PAPER_224 = {'R50': 2042, 'SB-R50': 1836, 'GC-R50 (r16, c3-c5)': 1719,
             'NL-R50 (c4)': 1353}
# (H, W, batch, setting): Table 9's size, and mmdet's 1333x800 resize of a
# 4:3 COCO image padded to a multiple of 32, as Faster R-CNN trains.
GPU_SIZES = [(224, 224, 64, 'segmentation'), (800, 1088, 2, 'detection')]
SETTING_NAMES = {'segmentation': 'classification setting: training BN',
                 'detection': 'detection setting: norm_eval, frozen stage 1'}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--size', action='append', metavar='HxWxB[:SETTING]',
                   help='input size and batch, e.g. 224x224x64:segmentation '
                   '(repeatable; default: 224x224x64 classification and '
                   '800x1088x2 detection)')
    p.add_argument('--models', nargs='+', choices=list(BACKBONES),
                   default=list(BACKBONES))
    p.add_argument('--modes', nargs='+', choices=['eager', 'compiled'],
                   default=['eager', 'compiled'])
    p.add_argument('--precisions', nargs='+', choices=['fp32', 'amp'],
                   default=['fp32', 'amp'])
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile backend ('eager': dynamo only)")
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--budget', type=float, default=float('inf'),
                   help='seconds after which no further compiled row starts')
    p.add_argument('--out', help='also write the Markdown report here')
    args = p.parse_args()
    sizes = []
    for spec in args.size or []:
        shape, _, setting = spec.partition(':')
        try:
            h, w, b = (int(v) for v in shape.lower().split('x'))
        except ValueError:
            p.error(f'--size {spec!r}: expected HxWxB[:SETTING]')
        if setting not in ('', 'segmentation', 'detection'):
            p.error(f'--size {spec!r}: SETTING must be segmentation or '
                    'detection')
        sizes.append((h, w, b, setting or 'segmentation'))
    args.sizes = sizes or GPU_SIZES
    if args.warmup < 1 or args.repeats < 1:
        p.error('--warmup and --repeats must be >= 1 (the first call '
                'compiles)')
    return args


def measure(models, x, training, amp, compiled, args, sync):
    """(img/s, ratio to R50) of each model for one row of the table."""
    dtype = torch.float16 if x.device.type == 'cuda' else torch.bfloat16
    calls = {}
    for name, model in models.items():
        forward = torch.compile(model, backend=args.compile_backend) \
            if compiled else model
        if training:
            calls[name] = TrainingStep(model, autocast=amp, forward=forward)
        else:
            model.eval()

            def infer(x, forward=forward):
                with torch.no_grad(), torch.autocast(
                        x.device.type, dtype=dtype, enabled=amp):
                    return forward(x)
            calls[name] = infer
    rounds = {}
    times, _ = time_interleaved(calls, x, args.warmup, args.repeats, sync,
                                'R50', rounds)
    # throughput ratio: R50's time over the model's (the paper's 0.90x)
    return {n: (x.shape[0] * 1e3 / t, 1 / bracketed_ratio(rounds, n))
            for n, t in times.items()}


def section(h, w, batch, setting, results, names, device):
    """The Markdown table of one input size."""
    lines = [f'## {h}x{w}, batch {batch} ({SETTING_NAMES[setting]})', '',
             'Images/s (ratio to R50):', '']
    keys = list(results)
    paper = (h, w) == (224, 224) and device.type == 'cuda'
    lines += ['| model | ' + ' | '.join(' '.join(k) for k in keys)
              + (' | paper (img/s, ratio) |' if paper else ' |'),
              '|---|' + '---:|' * (len(keys) + paper)]
    for name in names:
        cells = [f'{results[k][name][0]:.0f} ({results[k][name][1]:.2f})'
                 for k in keys]
        if paper:
            ref = PAPER_224.get(name)
            cells.append(f'{ref} ({ref / PAPER_224["R50"]:.2f})'
                         if ref else '—')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def main():
    args = parse_args()
    # the current logger decides what init_weights() prints: warnings only
    MMLogger.get_instance('throughput', log_level='WARNING')
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as mmengine's default env
    start = time.perf_counter()
    names = ['R50'] + [n for n in args.models if n != 'R50']
    rows = [(mode, prec, training) for mode in args.modes
            for prec in (args.precisions if mode == 'eager'
                         else sorted(args.precisions))  # amp first
            for training in (False, True)]
    command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
    head = ['# Throughput: context backbones vs ResNet-50', '',
            f'Command: `{command}`', '',
            f'- torch {torch.__version__}, device: '
            + (torch.cuda.get_device_name() if device.type == 'cuda'
               else f'CPU, {torch.get_num_threads()} threads')
            + '; AMP: autocast '
            f'{"float16" if device.type == "cuda" else "bfloat16"}; '
            f'compiled: torch.compile(backend={args.compile_backend!r})',
            f'- images/s = batch / median of {args.repeats} timed calls '
            f'after {args.warmup} untimed ones (the first compiles); ratio '
            '= throughput ratio to R50: the mean time of the R50 calls just '
            'before and after the model\'s over the model\'s, median over '
            'the rounds', '']
    done, left_out = [], []

    def report(current=()):
        """The report so far, written after every row: a run stopped by a
        time limit keeps what it measured."""
        tail = ([f'Left out (over the {args.budget:.0f} s budget): '
                 + '; '.join(left_out) + '.', ''] if left_out else [])
        text = '\n'.join(head + done + list(current) + tail + [
            f'Total time: {time.perf_counter() - start:.0f} s.'])
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)),
                        exist_ok=True)
            with open(args.out, 'w') as f:
                f.write(text + '\n')
        return text

    for h, w, batch, setting in args.sizes:
        models = {}
        for name in names:
            model = MODELS.build(backbone_cfg(name, setting))
            model.init_weights()
            models[name] = model.to(device)
        x = torch.randn(batch, 3, h, w, device=device)
        results = {}
        for mode, prec, training in rows:
            key = (mode, prec, 'train' if training else 'infer')
            if mode == 'compiled' and time.perf_counter() - start > \
                    args.budget:
                left_out.append(f'{h}x{w} {" ".join(key)}')
                continue
            t0 = time.perf_counter()
            torch._dynamo.reset()
            results[key] = measure(models, x, training, prec == 'amp',
                                   mode == 'compiled', args, sync)
            print(f'[{time.perf_counter() - start:.0f} s] {h}x{w} b{batch} '
                  f'{" ".join(key)}: ' + ', '.join(
                      f'{n} {v[0]:.0f} img/s ({v[1]:.3f}x)'
                      for n, v in results[key].items())
                  + f' [{time.perf_counter() - t0:.0f} s]', flush=True)
            report(section(h, w, batch, setting, results, names, device))
        done += section(h, w, batch, setting, results, names, device)
        del models, x
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    print(report())


if __name__ == '__main__':
    main()
