"""Params, FLOPs, inference latency, training-step time and training memory
of the mmctx context backbones and the mmcv references vs ResNet-50.

All numbers come from one process: every backbone is built through the
registry as the shipped configs build it (``--setting detection``:
``norm_eval=True``, ``frozen_stages=1``; ``segmentation``: every BN trains)
and initialised (``init_weights()``); ``--compile`` times the
``torch.compile`` of each. Inference: eval mode under ``torch.no_grad()``.
Training step (:class:`mmctx.benchmark.TrainingStep`): train mode, forward,
a loss that keeps the outputs alive (``target_loss``), backward, SGD step;
on the CPU, denormal floats are flushed to zero while timing
(``torch.set_flush_denormal``; ``--keep-denormals`` turns that off): GE's
and PSI's gates saturate within a few SGD steps of any loss, their
gradients underflow to denormals, which x86 CPUs compute many times slower
and GPUs at full speed. The report counts the denormal gradient values one
unflushed step leaves after the timed ones.
Times are medians of ``--repeats`` timed rounds after ``--warmup`` untimed
ones, the models interleaved (round-robin, rotating the start, R50 between
every two) so machine noise hits all of them alike; ratios compare each run
with the R50 runs just before and after it
(:func:`mmctx.benchmark.bracketed_ratio`). Training memory: see
:func:`mmctx.benchmark.training_memory_bytes`.

    python tools/analysis/complexity.py        # 224x224 b8 and 800x1216 b1
    python tools/analysis/complexity.py --setting segmentation --compile
    python tools/analysis/complexity.py --shape 64x64 --batch 1 --repeats 1
    python tools/analysis/complexity.py --device cuda --amp --channels-last
    python tools/analysis/complexity.py --out docs/complexity.md
"""
import argparse
import ctypes
import gc
import os
import resource
import shlex
import sys
from collections import defaultdict

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import elementwise_flop_counter
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers SBResNet, GEResNet, PSIResNet)
from mmctx.benchmark import (BACKBONES, CONTROLS, SETTINGS,  # noqa: E402
                             TrainingStep, backbone_cfg, bracketed_ratio,
                             cuda_training_memory_bytes, denormal_gradients,
                             median_interval, time_interleaved,
                             training_memory_bytes)

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
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                   help='where to run (default cpu)')
    p.add_argument('--amp', action='store_true',
                   help='autocast (bfloat16 on CPU, float16 on CUDA)')
    p.add_argument('--channels-last', action='store_true',
                   help='channels_last memory format for models and input')
    p.add_argument('--setting', default='detection', choices=list(SETTINGS),
                   help='build the backbones as the detection configs '
                   '(norm_eval, frozen stage 1) or the segmentation / '
                   'classification configs (training BN) do')
    p.add_argument('--compile', action='store_true',
                   help='time torch.compile of each backbone (inductor)')
    p.add_argument('--keep-denormals', action='store_true',
                   help='do not flush denormal floats to zero while timing '
                   'on the CPU')
    p.add_argument('--no-train', action='store_true',
                   help='skip the training-step time and memory columns')
    p.add_argument('--models', nargs='+',
                   choices=list(BACKBONES) + list(CONTROLS),
                   help='a subset of the models (R50 is always included); '
                   "'R50 (again)' adds a second R50, whose ratio is the "
                   'noise of the measurement')
    p.add_argument('--out', help='also write the Markdown report here')
    args = p.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available')
    if args.warmup < 0 or args.repeats < 1:
        p.error('--warmup must be >= 0 and --repeats >= 1')
    return args


def count_flops(model, x):
    analyzer = FlopAnalyzer(model, (x, ))
    for op, handle in EXTRA_FLOP_HANDLES.items():
        analyzer.set_op_handle(op, handle)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analyzer.total(), analyzer.unsupported_ops()


def release_memory():
    """Free what the last phase left: Python garbage, then the C heap's
    free pages (glibc keeps freed blocks mapped; without this the freed
    activations of eight backbones at 800x1216 add up to an out-of-memory
    kill on a 24 GB machine)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def cpu_model():
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return 'unknown'


def interval(rounds, name):
    """The 95% interval of a bracketed ratio's median, as a table cell."""
    if name not in rounds:
        return '—'  # the base itself
    low, high = median_interval(rounds[name])
    return f'{low:.3f}–{high:.3f}'


def table(shape, batch, params, flops, latency, cpu, uncounted, train=None,
          memory=None, latency_rounds=None, train_rounds=None):
    h, w = shape
    p0, f0 = params['R50'], flops['R50']
    head = ('| model | params (M) | Δparams vs R50 | GFLOPs | Δ% FLOPs '
            '| latency ms | latency ratio | CPU-time ratio |')
    rule = '|---|---:|---:|---:|---:|---:|---:|---:|'
    if train:
        head += ' train step ms | train-step ratio | train memory MiB ' \
            '| memory ratio |'
        rule += '---:|---:|---:|---:|'
    head += ' latency ratio 95% CI |'
    rule += ':---:|'
    if train:
        head += ' train-step ratio 95% CI |'
        rule += ':---:|'
    lines = [f'## {h}x{w}, batch {batch}', '', head, rule]
    for name in params:
        line = (f'| {name} | {params[name] / 1e6:.3f} '
                f'| {params[name] - p0:+,} | {flops[name] / 1e9:.2f} '
                f'| {100 * (flops[name] / f0 - 1):+.2f}% '
                f'| {latency[name]:.1f} '
                f'| {bracketed_ratio(latency_rounds, name):.3f} '
                f'| {cpu[name] / cpu["R50"]:.3f} |')
        if train:
            line += (f' {train[name]:.1f} '
                     f'| {bracketed_ratio(train_rounds, name):.3f} '
                     f'| {memory[name] / 2**20:.1f} '
                     f'| {memory[name] / memory["R50"]:.3f} |')
        line += f' {interval(latency_rounds, name)} |'
        if train:
            line += f' {interval(train_rounds, name)} |'
        lines.append(line)
    lines += ['', 'Ratios are against R50 in the same run. Latency and '
              'train-step ratios: R50 runs between every two models, and '
              'each ratio is the median over the rounds of a model\'s time '
              'over the mean of the R50 runs just before and after it '
              '(`mmctx.benchmark.bracketed_ratio`); the CPU-time ratio is '
              'the ratio of the medians. 95% CI: distribution-free '
              'confidence interval of that median from the per-round '
              'ratios (order statistics, `mmctx.benchmark.median_interval`;'
              ' (min, max) below 6 rounds).']
    ops = ', '.join(
        f'`{op}` ({"all" if len(by) == len(params) else ", ".join(by)})'
        for op, by in sorted(uncounted.items())) or 'none'
    lines += ['', f'Ops present but not counted in GFLOPs: {ops}.', '']
    return lines


# glibc's malloc returns a freed block above its mmap threshold to the OS
# and faults fresh pages in for the next one: at 800x1216 every activation
# of a training step is such a block, and the heap fragments besides (14 GB
# resident for 5 GB of live tensors). Timings then depend on what the
# previously timed model left behind, by up to 30% in one run. With the
# thresholds at their maximum the heap keeps and reuses freed blocks, the
# steady state of a long training job (or of jemalloc / tcmalloc).
MALLOC_TUNABLES = ('glibc.malloc.mmap_threshold=4294967295:'
                   'glibc.malloc.trim_threshold=4294967295')


def use_steady_heap():
    """Re-run this process with MALLOC_TUNABLES unless the caller chose
    GLIBC_TUNABLES (or MMCTX_NO_TUNABLES=1) itself."""
    if 'GLIBC_TUNABLES' in os.environ or os.environ.get('MMCTX_NO_TUNABLES'):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main():
    args = parse_args()
    use_steady_heap()
    flush = args.device == 'cpu' and not args.keep_denormals
    torch.set_flush_denormal(flush)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    if args.shape:
        h, w = (int(s) for s in args.shape.lower().split('x'))
        settings = [((h, w), args.batch or 1)]
    else:
        settings = [(s, args.batch or b) for s, b in DEFAULT_SETTINGS]

    # The current logger decides what init_weights() prints: warnings only.
    MMLogger.get_instance('complexity', log_level='WARNING')
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else \
        torch.contiguous_format
    chosen = ['R50'] + [n for n in (args.models or BACKBONES) if n != 'R50']
    models = {}
    for name in chosen:
        model = MODELS.build(backbone_cfg(name, args.setting))
        model.init_weights()
        model.to(device=device, memory_format=fmt)
        model.eval()  # mmdet's ResNet.train() returns None
        models[name] = model
    params = {n: sum(p.numel() for p in m.parameters())
              for n, m in models.items()}
    # what the timed calls run: the model, or its compiled version
    forwards = {n: torch.compile(m) if args.compile else m
                for n, m in models.items()}

    command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
    lines = [
        '# Backbone complexity: context modules vs ResNet-50', '',
        f'Command: `{command}`', '',
        f'- torch {torch.__version__}, {torch.get_num_threads()} intra-op '
        f'threads ({cores} usable cores), CPU: {cpu_model()}, '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "(unset)")}'
        + (f', GPU: {torch.cuda.get_device_name()}'
           if args.device == 'cuda' else ''),
        f'- setting: {args.setting} ({SETTINGS[args.setting]}); '
        f'{"torch.compile (inductor)" if args.compile else "eager"}',
        '- backbones only (4 stage outputs, no neck/classifier), '
        f'{"autocast " if args.amp else ""}float32, '
        f'{"channels_last" if args.channels_last else "NCHW"}; inference: '
        'eval mode after `init_weights()`, `torch.no_grad()`',
        '- training step: train mode, forward, loss = mean squared '
        'distance of each stage output to a fixed random target '
        '(`mmctx.benchmark.target_loss`), backward, SGD step (lr 0.01, '
        'momentum 0.9, wd 1e-4); train memory: '
        + ('`torch.cuda.max_memory_allocated` of a step'
           if args.device == 'cuda' else
           'parameters + gradients + momentum + the tensors autograd saves '
           'for backward (unique storages), i.e. what a step holds at the '
           'end of its forward pass (`mmctx.benchmark`)'),
        '- params: all trainable parameters (BN running stats excluded); '
        'Δparams is exact',
        '- GFLOPs: mmengine `FlopAnalyzer` per image, 1 multiply-add = 1 '
        'FLOP (convs, Linear, matmul/bmm, eval BN = 2/element, bilinear '
        'upsampling = 4/output, nearest = 1/output, adaptive avg pooling = '
        '1/input); this tool adds 1/input for `mean` and `avg_pool2d`; '
        'ReLU, cat and views are ignored by mmengine by design',
        f'- latency: median of {args.repeats} timed forward passes of the '
        f'whole batch after {args.warmup} warm-up passes, models interleaved '
        'round-robin in one process (rotating the start each round, R50 '
        'between every two models); the CPU-time ratio compares median process CPU time (all threads): '
        'time spent descheduled by other load is left out, but with >1 '
        'thread spin-waiting at barriers is not', ''
    ]
    sync = torch.cuda.synchronize if args.device == 'cuda' else None
    for shape, batch in settings:
        x = torch.randn(batch, 3, *shape, device=device).contiguous(
            memory_format=fmt)
        flops, uncounted = {}, defaultdict(list)
        with torch.no_grad():
            for name, model in models.items():  # FLOPs per image
                # (counted on the unfrozen twin: the tracer cannot follow
                # a frozen stage's split parameters, and freezing changes
                # no FLOP)
                twin = MODELS.build(backbone_cfg(name, 'segmentation'))
                twin.to(device=device, memory_format=fmt).eval()
                flops[name], unsupported = count_flops(twin, x[:1])
                del twin
                for op in unsupported:
                    uncounted[op].append(name)
                release_memory()
        train = memory = None
        if not args.no_train:
            # Memory first, on a clean heap (it counts tensors, not pages),
            # one model at a time, each step's optimizer freed after it.
            measure = cuda_training_memory_bytes \
                if args.device == 'cuda' else training_memory_bytes
            memory = {}
            for name, model in models.items():
                memory[name] = measure(model, x, autocast=args.amp)
                model.zero_grad(set_to_none=True)
                release_memory()
        load = os.getloadavg()[0]
        for model in models.values():
            model.eval()
        with torch.no_grad(), torch.autocast(
                args.device, enabled=args.amp,
                dtype=torch.bfloat16 if args.device == 'cpu'
                else torch.float16):
            latency_rounds = {}
            latency, cpu = time_interleaved(forwards, x, args.warmup,
                                            args.repeats, sync, 'R50',
                                            latency_rounds)
        train_rounds = None
        release_memory()
        if not args.no_train:
            steps = {n: TrainingStep(m, autocast=args.amp,
                                     forward=forwards[n])
                     for n, m in models.items()}
            train_rounds = {}
            train, _ = time_interleaved(steps, x, args.warmup, args.repeats,
                                        sync, 'R50', train_rounds)
            torch.set_flush_denormal(False)
            for step in steps.values():  # one step that keeps denormals
                step(x)
            torch.set_flush_denormal(flush)
            denormals = {n: denormal_gradients(m) for n, m in models.items()}
            del steps  # their optimizers' momentum buffers
            for model in models.values():
                model.zero_grad(set_to_none=True)
            release_memory()
        lines += table(shape, batch, params, flops, latency, cpu, uncounted,
                       train, memory, latency_rounds, train_rounds)
        if not args.no_train:
            lines += [('Denormals flushed to zero while timing. '
                       if flush else '') + 'Denormal gradient values after '
                      'one more, unflushed step: ' + ', '.join(
                          f'{n} {c}' for n, c in denormals.items()), '']
        lines += [f'1-min load average before / after timing: {load:.2f}'
                  f' / {os.getloadavg()[0]:.2f} (on {cores} cores)', '']
    if args.device == 'cpu':
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        lines += [f'Peak resident memory of this process: {peak:.1f} GiB.',
                  '']
    report = '\n'.join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(report + '\n')


if __name__ == '__main__':
    main()
