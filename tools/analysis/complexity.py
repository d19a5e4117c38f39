"""Params, FLOPs and CPU latency of the mmctx context backbones vs ResNet-50.

All numbers come from one process: every backbone is built through the
registry, initialised (``init_weights()``), put in eval mode and run under
``torch.no_grad()``. Latency is the median of ``--repeats`` timed forward
passes of the whole batch after ``--warmup`` untimed ones; the models are
timed interleaved (round-robin, rotating the start) so machine noise hits
all of them alike.

    python tools/analysis/complexity.py        # 224x224 b8 and 800x1216 b1
    python tools/analysis/complexity.py --shape 64x64 --batch 1 --repeats 1
    python tools/analysis/complexity.py --out docs/complexity.md
"""
import argparse
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import elementwise_flop_counter
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers SBResNet, GEResNet, PSIResNet)
from mmctx.models.utils import size_generic  # noqa: E402

R50 = dict(type='mmdet.ResNet', depth=50)
# mmdet 3.3.0 ships no NonLocal config; NL sits like GCNet's ContextBlock,
# after conv3 (on the residual branch) of every block of the chosen stages.
NL = dict(type='NonLocal2d', reduction=4, use_scale=True,
          mode='embedded_gaussian')
GC = dict(type='ContextBlock', ratio=1. / 16)  # mmdet configs/gcnet, r16
BACKBONES = {
    'R50': R50,
    'SB-R50': dict(type='SBResNet', depth=50),
    'GE-θ⁻-R50': dict(type='GEResNet', depth=50,
                      ge=dict(variant='parameter_free', extent='global')),
    'GE-θ-R50': dict(type='GEResNet', depth=50,
                     ge=dict(variant='depthwise', extent='global')),
    'GE-θ⁺-R50': dict(type='GEResNet', depth=50,
                      ge=dict(variant='depthwise_excite', extent='global')),
    'PSI-R50': dict(type='PSIResNet', depth=50),
    'NL-R50 (c4)': dict(R50, plugins=[dict(
        cfg=NL, stages=(False, False, True, False), position='after_conv3')]),
    'GC-R50 (r16, c3-c5)': dict(R50, plugins=[dict(
        cfg=GC, stages=(False, True, True, True), position='after_conv3')]),
}
# Averages mmengine leaves uncounted (GE-θ⁻'s gather): one add per input
# element, like mmengine's own adaptive_avg_pool2d handle.
EXTRA_FLOP_HANDLES = {
    op: elementwise_flop_counter(1, 0)
    for op in ('aten::mean', 'aten::avg_pool2d')
}
DEFAULT_SETTINGS = [((224, 224), 8), ((800, 1216), 1)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', help='HxW (default: 224x224 and 800x1216)')
    p.add_argument('--batch', type=int, help='batch size (default: 8 at '
                   '224x224, 1 at 800x1216; 1 with --shape)')
    p.add_argument('--warmup', type=int, default=1, help='untimed rounds')
    p.add_argument('--repeats', type=int, default=7, help='timed rounds')
    p.add_argument('--threads', type=int,
                   help='torch intra-op threads (default: all usable cores)')
    p.add_argument('--out', help='also write the Markdown report here')
    return p.parse_args()


def count_flops(model, x):
    analyzer = FlopAnalyzer(model, (x, ))
    for op, handle in EXTRA_FLOP_HANDLES.items():
        analyzer.set_op_handle(op, handle)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # FlopAnalyzer traces the model: count what eager code computes (its
    # fast paths), not the size-generic graph that export would produce.
    with size_generic(False):
        return analyzer.total(), analyzer.unsupported_ops()


def time_round_robin(models, x, warmup, repeats):
    """Median wall-clock ms and median process CPU ms (all threads)."""
    wall, cpu = defaultdict(list), defaultdict(list)
    names = list(models)
    for rnd in range(warmup + repeats):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            models[name](x)
            if rnd >= warmup:
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return ({n: statistics.median(wall[n]) for n in names},
            {n: statistics.median(cpu[n]) for n in names})


def cpu_model():
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return 'unknown'


def table(shape, batch, params, flops, latency, cpu, uncounted):
    h, w = shape
    p0, f0, t0 = params['R50'], flops['R50'], latency['R50']
    lines = [
        f'## {h}x{w}, batch {batch}', '',
        '| model | params (M) | Δparams vs R50 | GFLOPs | Δ% FLOPs '
        '| latency ms | latency ratio vs R50 | CPU-time ratio vs R50 |',
        '|---|---:|---:|---:|---:|---:|---:|---:|'
    ]
    for name in params:
        lines.append(
            f'| {name} | {params[name] / 1e6:.3f} | {params[name] - p0:+,} '
            f'| {flops[name] / 1e9:.2f} '
            f'| {100 * (flops[name] / f0 - 1):+.2f}% '
            f'| {latency[name]:.1f} | {latency[name] / t0:.2f} '
            f'| {cpu[name] / cpu["R50"]:.2f} |')
    ops = ', '.join(
        f'`{op}` ({"all" if len(by) == len(params) else ", ".join(by)})'
        for op, by in sorted(uncounted.items())) or 'none'
    lines += ['', f'Ops present but not counted in GFLOPs: {ops}.', '']
    return lines


def main():
    args = parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    if args.shape:
        h, w = (int(s) for s in args.shape.lower().split('x'))
        settings = [((h, w), args.batch or 1)]
    else:
        settings = [(s, args.batch or b) for s, b in DEFAULT_SETTINGS]

    # The current logger decides what init_weights() prints: warnings only.
    MMLogger.get_instance('complexity', log_level='WARNING')
    models = {}
    for name, cfg in BACKBONES.items():
        model = MODELS.build(cfg)
        model.init_weights()
        model.eval()  # mmdet's ResNet.train() returns None
        models[name] = model
    params = {n: sum(p.numel() for p in m.parameters())
              for n, m in models.items()}

    command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
    lines = [
        '# Backbone complexity: context modules vs ResNet-50', '',
        f'Command: `{command}`', '',
        f'- torch {torch.__version__}, {torch.get_num_threads()} intra-op '
        f'threads ({cores} usable cores), CPU: {cpu_model()}',
        '- backbones only (4 stage outputs, no neck/classifier), float32, '
        'NCHW, eval mode after `init_weights()`, `torch.no_grad()`',
        '- params: all trainable parameters (BN running stats excluded); '
        'Δparams is exact',
        '- GFLOPs: mmengine `FlopAnalyzer` per image, 1 multiply-add = 1 '
        'FLOP (convs, Linear, matmul/bmm, eval BN = 2/element, bilinear '
        'upsampling = 4/output, nearest = 1/output, adaptive avg pooling = '
        '1/input); this tool adds 1/input for `mean` and `avg_pool2d`; '
        'ReLU, cat and views are ignored by mmengine by design',
        f'- latency: median of {args.repeats} timed forward passes of the '
        f'whole batch after {args.warmup} warm-up passes, models interleaved '
        'round-robin in one process (rotating the start each round); the '
        'CPU-time ratio compares median process CPU time (all threads): '
        'time spent descheduled by other load is left out, but with >1 '
        'thread spin-waiting at barriers is not', ''
    ]
    with torch.no_grad():
        for shape, batch in settings:
            x = torch.randn(batch, 3, *shape)
            flops, uncounted = {}, defaultdict(list)
            for name, model in models.items():  # FLOPs per image
                flops[name], unsupported = count_flops(model, x[:1])
                for op in unsupported:
                    uncounted[op].append(name)
            load = os.getloadavg()[0]
            latency, cpu = time_round_robin(models, x, args.warmup,
                                            args.repeats)
            lines += table(shape, batch, params, flops, latency, cpu,
                           uncounted)
            lines += [f'1-min load average before / after timing: {load:.2f}'
                      f' / {os.getloadavg()[0]:.2f} (on {cores} cores)', '']
    report = '\n'.join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(report + '\n')


if __name__ == '__main__':
    main()
