#!/usr/bin/env python
"""A/B timings of two fast paths against the plain code they replace, in
one process, alternating the two (``mmctx.benchmark.time_two_paths``):

- resampling to the reference grid: ``F.adaptive_avg_pool2d`` vs the banded
  GEMMs of ``mmctx.models.utils.adaptive_avg_pool2d_banded``, on the maps
  GE-θ resamples in each ResNet-50 stage at ``--shape`` (eval, and forward
  + backward);
- the gate and the residual add in one pass (``GatedBottleneck``) vs the
  upstream block (gate, then ``out += identity``), on one stage-1 block of
  GE-θ⁻ / GE-θ⁺ / PSI-ResNet-50 at ``--block-shape`` (train: forward +
  backward; eval: no_grad forward).

    python tools/analysis/fast_path_ab.py
    python tools/analysis/fast_path_ab.py --shape 800x1216 --repeats 45
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers the mmctx backbones)
from mmctx.benchmark import BACKBONES, time_two_paths  # noqa: E402
from mmctx.models.backbones.gated_bottleneck import (  # noqa: E402
    GatedBottleneck)
from mmctx.models.utils import adaptive_avg_pool2d_banded  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--shape', default='800x1216',
                   help='input HxW whose stage maps are resampled (800x1216)')
    p.add_argument('--block-shape', default='224x224',
                   help='input HxW of the block comparison (224x224)')
    p.add_argument('--batch', type=int, default=8,
                   help='batch of the block comparison (8)')
    p.add_argument('--repeats', type=int, default=45)
    p.add_argument('--threads', type=int, help='intra-op threads')
    return p.parse_args()


def size(text):
    return tuple(int(v) for v in text.lower().split('x'))


def pooling_rows(shape, repeats):
    height, width = (math.ceil(side / 4) for side in shape)
    for stage in range(4):
        channels, grid = 256 * 2**stage, 56 // 2**stage
        x = torch.randn(1, channels, height, width)
        grad_x = x.clone().requires_grad_()

        def step(pool):
            out = pool(grad_x, (grid, grid))
            out.backward(torch.ones_like(out))

        with torch.no_grad():
            _, fast, plain = time_two_paths(
                lambda: adaptive_avg_pool2d_banded(x, (grid, grid)),
                lambda: F.adaptive_avg_pool2d(x, (grid, grid)), repeats)
        _, fast_train, plain_train = time_two_paths(
            lambda: step(adaptive_avg_pool2d_banded),
            lambda: step(F.adaptive_avg_pool2d), repeats)
        yield (f'| {stage + 1} | 1x{channels}x{height}x{width} → {grid} '
               f'| {plain:.1f} → {fast:.1f} '
               f'| {plain_train:.1f} → {fast_train:.1f} |')
        height, width = math.ceil(height / 2), math.ceil(width / 2)


def block_rows(shape, batch, repeats):
    upstream = GatedBottleneck.residual_gate
    for name in ('GE-θ⁻-R50', 'GE-θ⁺-R50', 'PSI-R50'):
        net = MODELS.build(BACKBONES[name])
        net.init_weights()
        block = net.layer1[1]
        x = torch.randn(batch, 256, shape[0] // 4, shape[1] // 4,
                        requires_grad=True)

        def run(fused, train):
            GatedBottleneck.residual_gate = upstream if fused else (
                lambda self, x: None)
            block.train(train)
            if train:
                block(x).sum().backward()
            else:
                with torch.no_grad():
                    block(x)

        try:
            train, _, _ = time_two_paths(lambda: run(True, True),
                                         lambda: run(False, True), repeats)
            infer, _, _ = time_two_paths(lambda: run(True, False),
                                         lambda: run(False, False), repeats)
        finally:
            GatedBottleneck.residual_gate = upstream
        yield f'| {name} | {train:.3f} | {infer:.3f} |'


def main():
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    MMLogger.get_instance('fast_path_ab', log_level='WARNING')
    print(f'{torch.get_num_threads()} threads, medians over {args.repeats} '
          'alternating pairs\n')
    print(f'## Resampling GE-θ\'s stage maps at {args.shape}, ms, '
          '`F.adaptive_avg_pool2d` → banded GEMMs\n')
    print('| stage | map → grid | eval | forward + backward |\n'
          '|---|---|---:|---:|')
    for row in pooling_rows(size(args.shape), args.repeats):
        print(row)
    print(f'\n## One stage-1 block at {args.block_shape} batch {args.batch}: '
          'gate + residual add in one pass / upstream (median ratio)\n')
    print('| model | train | eval |\n|---|---:|---:|')
    for row in block_rows(size(args.block_shape), args.batch, args.repeats):
        print(row)


if __name__ == '__main__':
    main()
