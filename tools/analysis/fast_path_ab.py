#!/usr/bin/env python
"""A/B timings of the fast paths against the plain code they replace, in
one process, alternating the two (``mmctx.benchmark.time_two_paths``):

- resampling to the reference grid: ``F.adaptive_avg_pool2d`` vs the banded
  GEMMs of ``mmctx.models.utils.adaptive_avg_pool2d_banded``, on the maps
  GE-θ resamples in each ResNet-50 stage at ``--shape`` (eval, and forward
  + backward);
- the gates' per-channel reductions as batched dot products
  (``mmctx.models.gating``: the gate gradient's sum over H, W of
  ``grad * x``, GE-θ's global gather and its kernel gradient) vs the plain
  product and sum / einsum, and ``shift + x * scale`` per image and channel
  (``channel_scale_shift``) vs ``addcmul``, on each ResNet-50 stage's map
  at 224x224 batch 8 and at ``--shape`` batch 1; and whole GE-ResNet-50s
  (training step, inference) with those against the previous release's
  code, patched in, and PSI-ResNet-50 with its gate's hand-written backward
  (``pixel_gate_add``) against ``addcmul``'s autograd (its inference row
  runs the same code twice: a control);
- PSI's gate and residual add (``pixel_gate_add``) vs ``addcmul``'s
  autograd on each stage's map at ``--block-shape`` (forward + backward);
- the gate and the residual add in one pass (``GatedBottleneck``) vs the
  upstream block (gate, then ``out += identity``), on one stage-1 block of
  GE-θ⁻ / GE-θ⁺ / PSI-ResNet-50 at ``--block-shape`` (train: forward +
  backward; eval: no_grad forward);
- GE's and PSI's block tails in training (bn3, gate, residual add, ReLU)
  as one function over C++ loops (``mmctx.models.norm_gate``,
  ``mmctx.models.norm_pixel_gate``) vs the plain ops, next to ResNet-50's
  own tail (bn3, add, ReLU), on each stage's map at ``--block-shape`` batch
  ``--batch`` and at ``--shape`` batch 1 (forward + backward), and whole
  GE- and PSI-ResNet-50 training steps with and without them;
- few-map 1x1 convs (SB's and PSI's squeezes) as C++ loops
  (``few_maps_product``) vs the GEMM and oneDNN's conv, on each stage's
  map (eval, and forward + backward); SB's bn1 + ReLU + squeeze in one
  pass vs the three ops; GE-θ's pooling and kernel dot product in one read
  (``norm_gate.pooled_dot``) vs the banded GEMMs and the dot product;
- PSI's patches from its offset maps off the reference size (every map
  resampled + einsum / each offset's pixels pooled by two GEMMs / by C++
  loops, ``offset_patches``) and GE's gather dot products at the
  reference size (batched GEMV / C++ loops, ``channel_dots``), each
  stage's map (eval);
- the inference paths as whole networks: SB-ResNet-50 with / without
  ``SBBottleneck.forward_inference`` and with / without its branch in C++
  (``SpatialBias.inference_bias``), GE- and PSI-ResNet-50 with / without
  the fused inference tails (without: GE's norm3 fold, PSI's gate with the
  add), GE-θ/θ⁺ with / without ``pooled_dot`` and the gather's C++ dot
  products, PSI with / without the per-offset pooling and its C++ loops,
  and GE and PSI with the inference tails writing over conv3's output /
  into a new map;
- SB's blocks without the concatenation (``SBBottleneck.forward_train``,
  its tail over C++ loops, ``mmctx.models.norm_rank``; and
  ``forward_inference``) vs the upstream block, on the second block of
  stages 1-3 at ``--block-shape`` batch ``--batch`` and at ``--shape``
  batch 1 (train: forward + backward, BN statistics updating; eval), the
  whole SB-ResNet-50 training step with / without it, and SB-ResNet-50
  inference with the branch's bias maps computed / kept from the first
  call (what the branch's small ops cost in the network);
- SB's bn1, ReLU and squeeze in training as one function over C++ loops
  (``mmctx.models.norm_squeeze``) vs the plain ops, on the second block of
  each stage (forward + backward) and the whole SB-ResNet-50 training
  step;
- GE-θ's kernel gradient off its reference size in training (the (C, H,
  W) gradient of the resampling's adjoint pooled to the kernel's grid):
  the banded GEMMs vs C++ loops (``adaptive_avg_pool``) on each stage's
  map at ``--shape``, and the whole GE-θ / θ⁺-ResNet-50 training steps at
  ``--shape`` batch 1 with either;
- GE's and PSI's inference tails writing their output into a new map or
  over conv3's output (``GatedBottleneck._tail_may_overwrite``), on the
  second block of each stage at ``--block-shape`` batch ``--batch`` and at
  ``--shape`` batch 1 (eval);
- an eval BatchNorm's scale and shift (``utils.eval_affine``) as one C++
  call vs the previous release's tensor ops, per call;
- GE-θ / θ⁺'s gate folded with bn3 in inference as one C++ call
  (``GatherExcite._folded_gate_loops``) vs the tensor ops, whole networks
  at ``--block-shape`` batch ``--batch`` and ``--shape`` batch 1
  (``--network-repeats`` pairs);
- SB's branch after its squeeze, with bn2 and the ReLU on its maps, in
  training as one function over C++ loops (``mmctx.models.bias_maps``) vs
  the plain ops, alone on the squeezed maps of the second block of stages
  1-3 and on that block (forward + backward), and the whole SB-ResNet-50
  training step.

    python tools/analysis/fast_path_ab.py
    python tools/analysis/fast_path_ab.py --tables norm-gate
    python tools/analysis/fast_path_ab.py --shape 800x1216 --repeats 45
    python tools/analysis/fast_path_ab.py --network-models PSI-R50
    python tools/analysis/fast_path_ab.py --tables few-maps inference
    python tools/analysis/fast_path_ab.py --tables sb-tail
    python tools/analysis/fast_path_ab.py --tables offset-dot inference
    python tools/analysis/fast_path_ab.py --tables sb-head kernel-grad
    python tools/analysis/fast_path_ab.py --tables tail-write eval-affine
    python tools/analysis/fast_path_ab.py --tables gate-loops
    python tools/analysis/fast_path_ab.py --tables sb-branch
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.registry import MODELS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import mmctx  # noqa: E402,F401  (registers the mmctx backbones)
from mmctx.benchmark import (BACKBONES, TrainingStep,  # noqa: E402
                             time_two_paths)
from mmctx.models.backbones.gated_bottleneck import (  # noqa: E402
    GatedBottleneck)
from mmctx.models import (bias_maps, gather_excite, gating,  # noqa: E402
                          norm_gate, norm_pixel_gate, norm_squeeze,
                          patch_spatial_interaction)
from mmctx.models.gating import (_channel_dots, _dot_hw,  # noqa: E402
                                 _kernel_grad)
from mmctx.models import SpatialBias  # noqa: E402
from mmctx.models.backbones.sb_resnet import SBBottleneck  # noqa: E402
from mmctx.models.gating import channel_dot  # noqa: E402
from mmctx.models.utils import (adaptive_avg_pool2d_banded,  # noqa: E402
                                eval_affine, few_maps_product, norm_affine,
                                pointwise_product, resample_to)


# rows of the whole-network table
NETWORKS = ['GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50']
# tables, each printed by <name>_table
TABLES = ['pooling', 'reduction', 'network', 'pixel-gate', 'block',
          'norm-gate', 'few-maps', 'offset-dot', 'inference', 'sb-tail',
          'sb-head', 'kernel-grad', 'tail-write', 'eval-affine',
          'gate-loops', 'sb-branch']


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--shape', default='800x1216',
                   help='input HxW of the batch-1 setting: the maps GE-θ '
                   'resamples, reductions, networks (800x1216)')
    p.add_argument('--block-shape', default='224x224',
                   help='input HxW of the batched setting: the block '
                   'comparison, reductions, networks (224x224)')
    p.add_argument('--batch', type=int, default=8,
                   help='batch of the batched setting (8)')
    p.add_argument('--repeats', type=int, default=45)
    p.add_argument('--network-repeats', type=int, default=9,
                   help='pairs of whole-network runs (9)')
    p.add_argument('--network-models', nargs='+', choices=NETWORKS,
                   default=NETWORKS, help='rows of the whole-network '
                   'table (all four)')
    p.add_argument('--tables', nargs='+', choices=TABLES, default=TABLES,
                   help='tables to print (all)')
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


def reduction_rows(shape, block_shape, batch, repeats):
    """Per stage: Σ_HW grad·x, the global gather's dot products and its
    kernel gradient (GE-θ), batched dot products vs plain ops, ms."""
    settings = ((batch, tuple(math.ceil(s / 4) for s in block_shape)),
                (1, tuple(math.ceil(s / 4) for s in shape)))
    for batch, (height, width) in settings:
        for stage in range(4):
            channels = 256 * 2**stage
            grad, x = (torch.randn(batch, channels, height, width)
                       for _ in range(2))
            # GE-θ's gather reads its map resampled to the reference grid
            grid = 56 // 2**stage
            maps = torch.randn(batch, channels, grid, grid)
            kernel = torch.randn(channels, grid, grid)
            context_grad = torch.randn(batch, channels)
            rows = batch * channels
            _, _, column = time_two_paths(  # an (N, 1) column view
                lambda: _dot_hw(grad, x), lambda: torch.bmm(
                    grad.view(rows, 1, -1), x.view(rows, -1, 1)), repeats)
            fast = [time_two_paths(f, g, repeats)[1:] for f, g in (
                (lambda: _dot_hw(grad, x),
                 lambda: (grad * x).sum((2, 3), keepdim=True)),
                (lambda: _channel_dots(maps, kernel),
                 lambda: torch.einsum('bchw,chw->bc', maps, kernel)),
                (lambda: _kernel_grad(context_grad, maps),
                 lambda: torch.einsum('bc,bchw->chw', context_grad, maps)))]
            scale, shift = (torch.rand(batch, channels, 1, 1)
                            for _ in range(2))
            fast.append(time_two_paths(
                lambda: gating.channel_scale_shift(x, scale, shift),
                lambda: torch.addcmul(shift, x, scale), repeats)[1:])
            cells = ' | '.join(f'{plain:.2f} → {new:.2f}'
                               for new, plain in fast)
            cells = f'{column:.2f} / {cells}'
            yield (f'| {stage + 1} | {batch}x{channels}x{height}x{width} '
                   f'({grid}x{grid}) | {cells} |')
            height, width = math.ceil(height / 2), math.ceil(width / 2)


def previous_dot_hw(a, b):
    """The previous release's reduction: a product and a sum up to 32 MiB,
    else a GEMM with an (N, 1) column view."""
    if a.numel() * a.element_size() <= 32 << 20:
        return (a * b).sum((2, 3), keepdim=True)
    rows = a.shape[0] * a.shape[1]
    return torch.bmm(a.view(rows, 1, -1), b.view(rows, -1, 1)).view(
        *a.shape[:2], 1, 1)


def previous_channel_dots(x, weight):
    if x.numel() * x.element_size() <= 32 << 20:
        return (x * weight).sum((2, 3))
    return torch.einsum('bchw,chw->bc', x, weight)


def previous_eval_affine(norm, dtype=None):
    """The previous release's ``utils.eval_affine``: the tensor ops."""
    weight, bias, mean, var = (
        t.to(dtype or norm.weight.dtype)
        for t in (norm.weight, norm.bias, norm.running_mean,
                  norm.running_var))
    return norm_affine(mean, var, weight, bias, norm.eps)[1:]


def previous_kernel_grad(grad, x):
    if x.shape[0] == 1:
        return grad.view(-1, 1, 1) * x[0]
    if x.numel() * x.element_size() <= 32 << 20:
        return (grad[..., None, None] * x).sum(0)
    return torch.einsum('bc,bchw->chw', grad, x)


def network_rows(shape, block_shape, batch, repeats, names=NETWORKS):
    """GE-R50 training steps and inference with this release's reductions
    and multiply-adds vs the previous release's (patched into
    mmctx.models.gating and gather_excite); PSI-R50 with ``pixel_gate_add``
    vs ``addcmul``."""
    current = {name: getattr(gating, name) for name in
               ('_dot_hw', '_channel_dots', '_kernel_grad',
                'channel_scale_shift', 'pixel_gate_add')}
    previous = dict(_dot_hw=previous_dot_hw,
                    _channel_dots=previous_channel_dots,
                    _kernel_grad=previous_kernel_grad,
                    channel_scale_shift=lambda x, scale, shift:
                    torch.addcmul(shift, x, scale),
                    pixel_gate_add=lambda x, weights, identity:
                    torch.addcmul(identity, x, weights))
    applies = norm_gate.applies, norm_pixel_gate.applies

    def unfused(*args):
        return False

    # inference took einsum (no autograd to bypass)
    previous_inference = dict(previous, _channel_dots=lambda x, w:
                              torch.einsum('bchw,chw->bc', x, w))
    for batch, size_ in ((batch, block_shape), (1, shape)):
        x = torch.randn(batch, 3, *size_)
        for name in names:
            net = MODELS.build(BACKBONES[name])
            net.init_weights()
            step = TrainingStep(net)

            def run(functions, train):
                # both sides on the gates' ops (not the fused tails)
                norm_gate.applies = norm_pixel_gate.applies = unfused
                for attr, fn in functions.items():
                    setattr(gating, attr, fn)
                gather_excite.channel_scale_shift = \
                    functions['channel_scale_shift']
                patch_spatial_interaction.pixel_gate_add = \
                    functions['pixel_gate_add']
                if train:
                    step(x)
                else:
                    net.eval()
                    with torch.no_grad():
                        net(x)
                    net.train()

            try:
                train, _, _ = time_two_paths(lambda: run(current, True),
                                             lambda: run(previous, True),
                                             repeats)
                infer, _, _ = time_two_paths(
                    lambda: run(current, False),
                    lambda: run(previous_inference, False), repeats)
            finally:
                norm_gate.applies, norm_pixel_gate.applies = applies
                for attr, fn in current.items():
                    setattr(gating, attr, fn)
                gather_excite.channel_scale_shift = \
                    current['channel_scale_shift']
                patch_spatial_interaction.pixel_gate_add = \
                    current['pixel_gate_add']
            yield (f'| {name} | {batch}x3x{size_[0]}x{size_[1]} '
                   f'| {train:.3f} | {infer:.3f} |')


def pixel_gate_rows(shape, batch, repeats):
    """PSI's gate with the residual add on each stage's map, forward +
    backward: ``addcmul``'s autograd vs ``pixel_gate_add``."""
    from mmctx.models import PatchSpatialInteraction
    for stage, channels in enumerate((256, 512, 1024, 2048)):
        stride = 4 << stage
        dims = (batch, channels, math.ceil(shape[0] / stride),
                math.ceil(shape[1] / stride))
        psi = PatchSpatialInteraction(channels, feature_size=64 >> stage)
        psi.init_weights()
        torch.nn.init.normal_(psi.mlp[-1].weight, std=0.1)  # real weights
        leaf = torch.randn(dims, requires_grad=True)
        identity, grad = torch.randn(dims), torch.randn(dims)

        def step(gate_add):
            patch_spatial_interaction.pixel_gate_add = gate_add
            # a non-leaf map, as in a block (its gradient is not copied
            # into .grad); the identity's gradient, the incoming one
            # itself on both paths, is left out
            psi.forward_residual(leaf.view_as(leaf), identity).backward(grad)
            leaf.grad = None

        current = patch_spatial_interaction.pixel_gate_add
        try:
            _, fast, plain = time_two_paths(
                lambda: step(current),
                lambda: step(lambda x, w, i: torch.addcmul(i, x, w)),
                repeats)
        finally:
            patch_spatial_interaction.pixel_gate_add = current
        yield (f'| {stage + 1} | {"x".join(map(str, dims))} '
               f'| {plain:.2f} → {fast:.2f} |')


def block_pass(block, x, train):
    """One block on ``x``: train mode forward + backward, or eval forward
    without autograd."""
    block.train(train)
    if train:
        block(x).sum().backward()
    else:
        with torch.no_grad():
            block(x)


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
            block_pass(block, x, train)

        try:
            train, _, _ = time_two_paths(lambda: run(True, True),
                                         lambda: run(False, True), repeats)
            infer, _, _ = time_two_paths(lambda: run(True, False),
                                         lambda: run(False, False), repeats)
        finally:
            GatedBottleneck.residual_gate = upstream
        yield f'| {name} | {train:.3f} | {infer:.3f} |'


GE_VARIANTS = (('GE-θ⁻', 'parameter_free'), ('GE-θ', 'depthwise'),
               ('GE-θ⁺', 'depthwise_excite'))


def tail_gates(channels, stage):
    """GE-R50's gates (their reference grids at 224) and PSI-R50's (at
    256), with real weights."""
    from mmctx.models import GatherExcite, PatchSpatialInteraction
    gates = [GatherExcite(channels, variant=variant,
                          feature_size=56 >> stage)
             for _, variant in GE_VARIANTS]
    gates.append(PatchSpatialInteraction(channels,
                                         feature_size=64 >> stage))
    for gate in gates:
        for p in gate.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return gates


def norm_gate_rows(shape, block_shape, batch, repeats):
    """GE's and PSI's training tails relu(identity + gate(bn3(z))) fused /
    plain, and ResNet-50's relu(bn3(z) + identity), forward + backward,
    ms."""

    def plain(z, identity, norm, gate):
        return F.relu(gate.forward_residual(norm(z), identity))

    def fused(z, identity, norm, gate):
        return gate.forward_tail(z, identity, norm)

    def resnet(z, identity, norm, gate):
        out = norm(z)
        out += identity
        return F.relu(out, inplace=True)

    for batch_, size_ in ((batch, block_shape), (1, shape)):
        for stage, channels in enumerate((256, 512, 1024, 2048)):
            stride = 4 << stage
            dims = (batch_, channels, math.ceil(size_[0] / stride),
                    math.ceil(size_[1] / stride))
            norm = torch.nn.BatchNorm2d(channels)
            z = torch.randn(dims, requires_grad=True)
            identity = torch.randn(dims, requires_grad=True)
            grad = torch.randn(dims)

            def step(tail, gate):
                # non-leaf inputs, as in a block
                tail(z.view_as(z), identity.view_as(identity), norm,
                     gate).backward(grad)
                z.grad = identity.grad = None
                gate.zero_grad(set_to_none=True)

            cells = []
            for gate in tail_gates(channels, stage):
                _, fast, slow = time_two_paths(
                    lambda: step(fused, gate), lambda: step(plain, gate),
                    repeats)
                cells.append(f'{slow:.2f} → {fast:.2f}')
            _, stock, _ = time_two_paths(lambda: step(resnet, gate),
                                         lambda: step(plain, gate), 5, 1)
            yield (f'| {stage + 1} | {"x".join(map(str, dims))} '
                   f'| {stock:.2f} | {" | ".join(cells)} |')


def norm_gate_network_rows(shape, block_shape, batch, repeats):
    """GE-R50s' and PSI-R50's training steps with the fused tails / the
    plain ops."""
    checks = (norm_gate, norm_pixel_gate)
    applies = [module.applies for module in checks]
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        x = torch.randn(batch_, 3, *size_)
        for name in [name for name, _ in GE_VARIANTS] + ['PSI']:
            net = MODELS.build(BACKBONES[f'{name}-R50'])
            net.init_weights()
            step = TrainingStep(net)

            def run(fused):
                for module, check in zip(checks, applies):
                    module.applies = check if fused else (
                        lambda *args: False)
                step(x)

            try:
                ratio, fast, slow = time_two_paths(
                    lambda: run(True), lambda: run(False), repeats)
            finally:
                for module, check in zip(checks, applies):
                    module.applies = check
            yield (f'| {name}-R50 | {batch_}x3x{size_[0]}x{size_[1]} '
                   f'| {slow:.0f} → {fast:.0f} | {ratio:.3f} |')


def median_ms(call, repeats):
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def few_maps_rows(shape, block_shape, batch, repeats):
    """SB's squeeze (5 maps of conv1's output) and PSI's (16 / 4 / 1 / 1
    maps of conv3's) per stage: loops vs GEMM vs conv, eval and forward +
    backward, ms."""
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        height, width = (math.ceil(side / 4) for side in size_)
        for stage in range(4):
            for module, channels, outs in (
                    ('SB', 64 * 2**stage, 5),
                    ('PSI', 256 * 2**stage, (16, 4, 1, 1)[stage])):
                if module == 'SB' and stage == 3:
                    continue  # SB-ResNet leaves out stage 4
                x = torch.randn(batch_, channels, height, width)
                weight = torch.randn(outs, channels, 1, 1)
                products = dict(
                    loops=few_maps_product, gemm=pointwise_product,
                    conv=lambda w, t: F.conv2d(t, w))
                cells = []
                for train in (False, True):
                    times = {}
                    for name, product in products.items():
                        w_ = weight.clone().requires_grad_(train)
                        x_ = x.clone().requires_grad_(train)

                        def call(product=product, w_=w_, x_=x_):
                            with torch.set_grad_enabled(train):
                                out = product(w_, x_)
                                if train:
                                    out.backward(torch.ones_like(out))
                        times[name] = median_ms(call, repeats)
                    cells.append(' / '.join(
                        f'{times[name]:.2f}' for name in products))
                yield (f'| {module} | {batch_}x{channels}x{height}x{width} '
                       f'→ {outs} | {cells[0]} | {cells[1]} |')
            height, width = math.ceil(height / 2), math.ceil(width / 2)


def fused_squeeze_rows(shape, block_shape, batch, repeats):
    """SB's bn1 + ReLU + squeeze: the three ops / one pass, eval, ms."""
    kernels = norm_gate.kernels()
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        height, width = (math.ceil(side / 4) for side in size_)
        for stage in range(3):
            channels = 64 * 2**stage
            z = torch.randn(batch_, channels, height, width)
            scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
            weight = torch.randn(5, channels)
            mean, var = torch.zeros(channels), torch.ones(channels)

            def plain():
                out = F.relu(F.batch_norm(z, mean, var, scale, shift, False,
                                          0., 0.))
                return few_maps_product(weight[:, :, None, None], out)

            with torch.no_grad():
                _, fast, slow = time_two_paths(
                    lambda: kernels.scale_shift_relu_few_maps(
                        z, scale, shift, weight), plain, repeats)
            yield (f'| {batch_}x{channels}x{height}x{width} '
                   f'| {slow:.2f} → {fast:.2f} |')
            height, width = math.ceil(height / 2), math.ceil(width / 2)


def pooled_dot_rows(shape, repeats):
    """GE-θ's gather off its reference size: banded GEMMs + dot products /
    pooled_dot, eval, ms."""
    height, width = (math.ceil(side / 4) for side in shape)
    for stage in range(4):
        channels, grid = 256 * 2**stage, 56 // 2**stage
        x = torch.randn(1, channels, height, width)
        kernel = torch.randn(channels, grid, grid)
        with torch.no_grad():
            _, fast, slow = time_two_paths(
                lambda: norm_gate.pooled_dot(x, kernel),
                lambda: channel_dot(resample_to(x, (grid, grid)), kernel),
                repeats)
        yield (f'| {stage + 1} | 1x{channels}x{height}x{width} → {grid} '
               f'| {slow:.2f} → {fast:.2f} |')
        height, width = math.ceil(height / 2), math.ceil(width / 2)


def offset_dot_rows(shape, block_shape, batch, repeats):
    """PSI's patches from its offset maps (resampling + einsum / pooled per
    offset) and GE's gather dot products at the reference size (batched
    GEMV / C++ loops), each stage's map, eval, ms."""
    net = MODELS.build(BACKBONES['PSI-R50'])
    module = patch_spatial_interaction
    applies = module.offset_pooling_applies
    loops_apply = module.offset_patch_loops_apply
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        height, width = (math.ceil(side / 4) for side in size_)
        for stage in range(1, 5):
            block = getattr(net, f'layer{stage}')[0]
            psi = getattr(block, block.after_conv3_plugin_names[-1])
            (ph, pw) = psi.squeeze.kernel_size
            maps = torch.randn(batch_, ph * pw, height, width)

            def patches(pooled, loops=False):
                module.offset_pooling_applies = \
                    applies if pooled else (lambda *args: False)
                module.offset_patch_loops_apply = \
                    loops_apply if loops else (lambda *args: False)
                psi.patches_of_offset_maps(maps)

            what = (f'{"x".join(map(str, maps.shape))} → {psi.grid[0]}x'
                    f'{psi.grid[1]}')
            try:
                with torch.no_grad():
                    _, pooled, resampled = time_two_paths(
                        lambda: patches(True), lambda: patches(False),
                        repeats)
                    _, loops, gemms = time_two_paths(
                        lambda: patches(True, True), lambda: patches(True),
                        repeats)
            finally:
                module.offset_pooling_applies = applies
                module.offset_patch_loops_apply = loops_apply
            yield (f'| PSI patches, stage {stage} | {what} '
                   f'| {resampled:.3f} → {pooled:.3f} |')
            yield (f'| PSI patch loops, stage {stage} | {what} '
                   f'| {gemms:.3f} → {loops:.3f} |')
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    height = width = block_shape[0] // 4
    for stage in range(4):
        channels = 256 * 2**stage
        x = torch.randn(batch, channels, height, width)
        kernel = torch.randn(channels, height, width)
        with torch.no_grad():
            _, fast, slow = time_two_paths(
                lambda: channel_dot(x, kernel),
                lambda: gating._channel_dots(x, kernel), repeats)
        yield (f'| GE gather dots, stage {stage + 1} | '
               f'{"x".join(map(str, x.shape))} | {slow:.3f} → {fast:.3f} |')
        height, width = height // 2, width // 2


def inference_rows(shape, block_shape, batch, repeats, only=None):
    """Whole-network inference with each inference path / without it
    (``only``: the cases of these switches)."""
    switches = {
        'SB-R50': [(SBBottleneck, '_inference_applies',
                    lambda self, x: False)],
        'tail': [(GatedBottleneck, '_inference_tail_may_fuse',
                  lambda self, gate: False)],
        'pooled': [(norm_gate, 'pooled_dot_applies', lambda *args: False)],
        'dots': [(gating, 'dot_loops_apply', lambda *args: False)],
        'offsets': [(patch_spatial_interaction, 'offset_pooling_applies',
                     lambda *args: False),
                    (patch_spatial_interaction, 'offset_patch_loops_apply',
                     lambda *args: False)],
        'branch': [(SpatialBias, 'inference_bias_applies',
                    lambda *args: False)],
        'patch-loops': [(patch_spatial_interaction,
                         'offset_patch_loops_apply', lambda *args: False)],
        'overwrite': [(GatedBottleneck, '_tail_may_overwrite',
                       lambda self: False)],
        'gate-loops': [(gather_excite.GatherExcite, '_gate_loops_apply',
                        lambda self, x: False)],
    }
    cases = [('SB-R50', 'SB-R50', 'bn1 + ReLU + squeeze in one pass, '
              'no concatenation, bn3 + rank-k term + add + ReLU in one '
              'pass')]
    cases += [(name, 'tail', 'fused inference tail')
              for name in ('GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50')]
    cases += [(name, 'pooled', '`pooled_dot`')
              for name in ('GE-θ-R50', 'GE-θ⁺-R50')]
    cases += [(name, 'dots', 'gather dot products as C++ loops')
              for name in ('GE-θ-R50', 'GE-θ⁺-R50')]
    cases += [('PSI-R50', 'offsets', 'patches per offset, not resampled'),
              ('SB-R50', 'branch', 'branch after the squeeze in C++ '
               '(`inference_bias`)'),
              ('PSI-R50', 'patch-loops', 'patches as C++ loops '
               '(`offset_patches`)')]
    cases += [(name, 'overwrite', 'tail written over conv3\'s output')
              for name in ('GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50')]
    cases += [(name, 'gate-loops', 'gate folded with bn3 in one C++ call')
              for name in ('GE-θ-R50', 'GE-θ⁺-R50')]
    cases = [case for case in cases if only is None or case[1] in only]
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        x = torch.randn(batch_, 3, *size_)
        for name, switch, what in cases:
            net = MODELS.build(BACKBONES[name])
            net.init_weights()
            net.eval()
            saved = [(owner, attr, getattr(owner, attr))
                     for owner, attr, _ in switches[switch]]

            def run(fast):
                for (owner, attr, off), (_, _, on) in zip(switches[switch],
                                                          saved):
                    setattr(owner, attr, on if fast else off)
                with torch.no_grad():
                    net(x)

            try:
                ratio, fast, slow = time_two_paths(
                    lambda: run(True), lambda: run(False), repeats)
            finally:
                for owner, attr, on in saved:
                    setattr(owner, attr, on)
            yield (f'| {name} | {what} | {batch_}x3x{size_[0]}x{size_[1]} '
                   f'| {slow:.0f} → {fast:.0f} | {ratio:.3f} |')


def sb_tail_rows(shape, block_shape, batch, repeats, network_repeats):
    """SB's blocks and training step with / without the paths that skip
    the concatenation (``forward_train``, ``forward_inference``)."""
    upstream = (lambda self, x: False)
    switches = ('_training_applies', '_inference_applies')
    saved = {attr: getattr(SBBottleneck, attr) for attr in switches}

    def use(fast):
        for attr in switches:
            setattr(SBBottleneck, attr, saved[attr] if fast else upstream)

    net = MODELS.build(BACKBONES['SB-R50'])
    net.init_weights()
    try:
        for batch_, size_ in ((batch, block_shape), (1, shape)):
            for stage in (1, 2, 3):
                block = getattr(net, f'layer{stage}')[1]
                scale = 2**(stage + 1)
                x = torch.randn(batch_, 128 * 2**stage, size_[0] // scale,
                                size_[1] // scale).relu_().requires_grad_()

                def run(fast, train):
                    use(fast)
                    block_pass(block, x, train)

                times = [time_two_paths(lambda: run(True, train),
                                        lambda: run(False, train), repeats)
                         for train in (True, False)]
                cells = ' | '.join(f'{slow:.2f} → {fast:.2f} ({ratio:.3f})'
                                   for ratio, fast, slow in times)
                yield (f'| block, stage {stage} | '
                       f'{"x".join(map(str, x.shape))} | {cells} |')
        yield from sb_step_rows(net, use, ((batch, block_shape), (1, shape)),
                                network_repeats, ' |')
        # What the branch's small ops (norm, pooling, mix, upsampling) cost
        # in the network: inference with each block's bias maps computed /
        # taken from the first call
        net.eval()
        inputs = [torch.randn(batch_, 3, *size_)
                  for batch_, size_ in ((batch, block_shape), (1, shape))]
        real = {name: getattr(SpatialBias, name)
                for name in ('spatial_bias_of_squeezed', 'inference_bias')}
        kept = {}

        def keeping(name):
            def cached(branch, maps, *args):
                key = (name, id(branch), maps.shape)
                if key not in kept:
                    kept[key] = real[name](branch, maps, *args)
                return kept[key]
            return cached

        for x in inputs:

            def run_branch(compute):
                for name, method in real.items():
                    setattr(SpatialBias, name,
                            method if compute else keeping(name))
                with torch.no_grad():
                    net(x)

            try:
                ratio, with_branch, without = time_two_paths(
                    lambda: run_branch(True), lambda: run_branch(False),
                    network_repeats)
            finally:
                for name, method in real.items():
                    setattr(SpatialBias, name, method)
            yield (f'| SB-R50 inference, branch kept / computed | '
                   f'{"x".join(map(str, x.shape))} | | {without:.0f} → '
                   f'{with_branch:.0f} ({ratio:.3f}) |')
    finally:
        use(True)


def sb_switch_rows(module, stages, shape, block_shape, batch, repeats,
                   network_repeats):
    """An SB training path whose ``module.applies`` decides it / the plain
    ops: the second block of each of ``stages`` (forward + backward) and
    the whole training step."""
    applies = module.applies

    def use(fast):
        module.applies = applies if fast else (lambda *args: False)

    net = MODELS.build(BACKBONES['SB-R50'])
    net.init_weights()
    try:
        for batch_, size_ in ((batch, block_shape), (1, shape)):
            for stage in stages:
                block = getattr(net, f'layer{stage}')[1]
                scale = 2**(stage + 1)
                x = torch.randn(batch_, 128 * 2**stage, size_[0] // scale,
                                size_[1] // scale).relu_().requires_grad_()

                def run(fast):
                    use(fast)
                    block_pass(block, x, True)

                ratio, fast, slow = time_two_paths(
                    lambda: run(True), lambda: run(False), repeats)
                yield (f'| block, stage {stage} | '
                       f'{"x".join(map(str, x.shape))} | {slow:.2f} → '
                       f'{fast:.2f} ({ratio:.3f}) |')
        yield from sb_step_rows(net, use, ((batch, block_shape), (1, shape)),
                                network_repeats)
    finally:
        use(True)


def sb_head_rows(shape, block_shape, batch, repeats, network_repeats):
    """SB's bn1, ReLU and squeeze in training as one function
    (:mod:`mmctx.models.norm_squeeze`) / the plain ops."""
    yield from sb_switch_rows(norm_squeeze, (1, 2, 3, 4), shape, block_shape,
                              batch, repeats, network_repeats)


def sb_branch_rows(shape, block_shape, batch, repeats, network_repeats):
    """SB's branch after the squeeze with bn2 and the ReLU on its maps in
    training as one function (:mod:`mmctx.models.bias_maps`) / the plain
    ops: alone on the second block's squeezed maps of stages 1-3 (stage 4
    has no branch; forward + backward), then as :func:`sb_switch_rows`."""
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        for stage in (1, 2, 3):
            planes, scale = 32 * 2**stage, 2**(stage + 1)
            branch = SpatialBias(planes).train()
            bn2 = torch.nn.BatchNorm2d(planes + 3).train()
            maps = torch.randn(batch_, 5, size_[0] // scale,
                               size_[1] // scale, requires_grad=True)
            part, size2 = slice(planes, None), maps.shape[-2:]

            def fused():
                bias_maps.bias_maps(branch, maps, size2, bn2,
                                    part).sum().backward()

            def plain():
                F.relu(F.batch_norm(
                    branch.spatial_bias_of_squeezed(maps, size2),
                    bn2.running_mean[part], bn2.running_var[part],
                    bn2.weight[part], bn2.bias[part], True, 0.1,
                    bn2.eps)).sum().backward()

            ratio, fast, slow = time_two_paths(fused, plain, repeats)
            yield (f'| branch, stage {stage} | '
                   f'{"x".join(map(str, maps.shape))} | {slow:.3f} → '
                   f'{fast:.3f} ({ratio:.3f}) |')
    yield from sb_switch_rows(bias_maps, (1, 2, 3), shape, block_shape,
                              batch, repeats, network_repeats)


def sb_step_rows(net, use, settings, network_repeats, last_cells=''):
    """SB-ResNet-50's training step with / without a path (``use(fast)``
    switches it), per (batch, size) setting."""
    for batch_, size_ in settings:
        x = torch.randn(batch_, 3, *size_)
        step = TrainingStep(net)

        def run_step(fast):
            use(fast)
            step(x)

        ratio, fast, slow = time_two_paths(
            lambda: run_step(True), lambda: run_step(False), network_repeats)
        yield (f'| SB-R50 train step | {batch_}x3x{size_[0]}x{size_[1]} | '
               f'{slow:.0f} → {fast:.0f} ({ratio:.3f}) |{last_cells}')


def kernel_grad_rows(shape, repeats, network_repeats):
    """GE-θ's kernel gradient off the reference size: the (C, H, W)
    gradient pooled to the kernel's grid by the banded GEMMs / the C++
    loops; and the whole training steps with either."""
    ops = norm_gate.kernels()
    height, width = (math.ceil(side / 4) for side in shape)
    for stage in range(4):
        channels, grid = 256 * 2**stage, 56 // 2**stage
        grad = torch.randn(channels, height, width)
        _, fast, slow = time_two_paths(
            lambda: ops.adaptive_avg_pool(grad, grid, grid),
            lambda: adaptive_avg_pool2d_banded(grad, (grid, grid)), repeats)
        yield (f'| kernel gradient, stage {stage + 1} | {channels}x{height}'
               f'x{width} → {grid} | {slow:.2f} → {fast:.2f} |')
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    adjoint = norm_gate._PoolAdjoint
    loops = adjoint.backward

    def banded(ctx, grad):
        return adaptive_avg_pool2d_banded(grad, ctx.grid), None, None

    x = torch.randn(1, 3, *shape)
    for name in ('GE-θ-R50', 'GE-θ⁺-R50'):
        net = MODELS.build(BACKBONES[name])
        net.init_weights()
        step = TrainingStep(net)

        def run(fast):
            adjoint.backward = loops if fast else banded
            step(x)

        try:
            ratio, fast, slow = time_two_paths(
                lambda: run(True), lambda: run(False), network_repeats)
        finally:
            adjoint.backward = loops
        yield (f'| {name} train step | 1x3x{shape[0]}x{shape[1]} | '
               f'{slow:.0f} → {fast:.0f} ({ratio:.3f}) |')


def main():
    args = parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    MMLogger.get_instance('fast_path_ab', log_level='WARNING')
    print(f'{torch.get_num_threads()} threads, medians over {args.repeats} '
          'alternating pairs\n')
    for name in TABLES:  # in this order
        if name in args.tables:
            globals()[name.replace('-', '_') + '_table'](args)


def print_table(title, header, rows):
    print(title)
    print(header)
    for row in rows:
        print(row)


def pooling_table(args):
    print_table(
        f'## Resampling GE-θ\'s stage maps at {args.shape}, ms, '
        '`F.adaptive_avg_pool2d` → banded GEMMs\n',
        '| stage | map → grid | eval | forward + backward |\n'
        '|---|---|---:|---:|',
        pooling_rows(size(args.shape), args.repeats))


def reduction_table(args):
    print_table(
        '\n## GE\'s per-channel reductions, ms, plain ops → batched dot '
        'products\n\n'
        'Σ_HW grad·x: the gate gradient (the same GEMM with an (N, 1) '
        'column view / `(grad * x).sum` → dot products); gather: GE-θ\'s '
        'global gather on the map resampled to its grid (`einsum`); '
        'kernel gradient: the gather\'s (`einsum`); multiply-add: '
        '`shift + x * scale` per image and channel (GE\'s norm3 fold in '
        'inference, GE-θ⁻\'s gate gradient; `addcmul` → '
        f'`channel_scale_shift`). Batch {args.batch}: {args.block_shape}; '
        f'batch 1: {args.shape}.\n',
        '| stage | map (grid) | Σ_HW grad·x | gather | kernel gradient '
        '| multiply-add |\n|---|---|---:|---:|---:|---:|',
        reduction_rows(size(args.shape), size(args.block_shape), args.batch,
                       args.repeats))


def network_table(args):
    print_table(
        '\n## GE-ResNet-50 with the dot products and `channel_scale_shift` / '
        'with the previous release\'s reductions and `addcmul`; '
        'PSI-ResNet-50 with `pixel_gate_add` / `addcmul` (median '
        'ratio; training step and inference)\n',
        '| model | input | train step | inference |\n|---|---|---:|---:|',
        network_rows(size(args.shape), size(args.block_shape), args.batch,
                     args.network_repeats, args.network_models))


def pixel_gate_table(args):
    print_table(
        f'\n## PSI\'s gate and residual add at {args.block_shape} batch '
        f'{args.batch}, forward + backward, ms, `addcmul` → '
        '`pixel_gate_add`\n',
        '| stage | map | ms |\n|---|---|---:|',
        pixel_gate_rows(size(args.block_shape), args.batch, args.repeats))


def block_table(args):
    print_table(
        f'\n## One stage-1 block at {args.block_shape} batch {args.batch}: '
        'gate + residual add in one pass (training: bn3 to the ReLU as '
        'one function) / upstream (median ratio)\n',
        '| model | train | eval |\n|---|---:|---:|',
        block_rows(size(args.block_shape), args.batch, args.repeats))


def norm_gate_table(args):
    print_table(
        '\n## GE\'s and PSI\'s block tails in training (bn3, gate, '
        'residual add, ReLU), forward + backward, ms: ResNet-50\'s tail '
        '(bn3, add, ReLU) for reference; GE\'s and PSI\'s, plain ops → '
        'one function (`norm_gate`, `norm_pixel_gate`; GE-θ and GE-θ⁺ '
        'with GE-R50\'s kernels, built for 224; PSI with PSI-R50\'s '
        'patches, built for 256). Batch '
        f'{args.batch}: {args.block_shape}; batch 1: {args.shape}.\n',
        '| stage | map | ResNet-50 | GE-θ⁻ | GE-θ | GE-θ⁺ | PSI |\n'
        '|---|---|---:|---:|---:|---:|---:|',
        norm_gate_rows(size(args.shape), size(args.block_shape), args.batch,
                       args.repeats))
    print_table(
        '\n## GE- and PSI-ResNet-50 training steps, plain tails → fused '
        'tails '
        '(ms, median ratio)\n',
        '| model | input | ms | ratio |\n|---|---|---:|---:|',
        norm_gate_network_rows(size(args.shape), size(args.block_shape),
                               args.batch, args.network_repeats))


def few_maps_table(args):
    print_table(
        '\n## Few-map 1x1 convs (SB\'s and PSI\'s squeezes), ms: loops '
        '(`few_maps_product`) / GEMM (`pointwise_product`) / oneDNN conv. '
        f'Batch {args.batch}: {args.block_shape}; batch 1: {args.shape}.\n',
        '| module | map → maps | eval | forward + backward |\n'
        '|---|---|---:|---:|',
        few_maps_rows(size(args.shape), size(args.block_shape), args.batch,
                      args.repeats))
    print_table(
        '\n## SB\'s bn1 (eval) + ReLU + squeeze, ms: the three ops → one '
        'pass (`scale_shift_relu_few_maps`)\n',
        '| conv1 output | ms |\n|---|---:|',
        fused_squeeze_rows(size(args.shape), size(args.block_shape),
                           args.batch, args.repeats))
    print_table(
        f'\n## GE-θ\'s gather of each stage\'s map at {args.shape}, eval, '
        'ms: banded GEMMs + dot products → `pooled_dot`\n',
        '| stage | map → grid | ms |\n|---|---|---:|',
        pooled_dot_rows(size(args.shape), args.repeats))


def inference_table(args):
    print_table(
        '\n## Whole-network inference without / with each inference path '
        '(ms, median ratio)\n',
        '| model | path | input | ms | ratio |\n|---|---|---|---:|---:|',
        inference_rows(size(args.shape), size(args.block_shape), args.batch,
                       args.network_repeats))


def offset_dot_table(args):
    print_table(
        '\n## PSI\'s patches off the reference size (resample every offset '
        'map + einsum → each offset\'s pixels pooled by GEMMs; those GEMMs '
        '→ C++ loops, `offset_patches`) and GE\'s gather dot products at '
        'the reference size (batched GEMV → C++ loops), eval, ms\n',
        '| op | input | ms |\n|---|---|---:|',
        offset_dot_rows(size(args.shape), size(args.block_shape),
                        args.batch, args.repeats))


def sb_tail_table(args):
    print_table(
        '\n## SB without the concatenation (`forward_train` with its tail '
        'over C++ loops, `forward_inference`) / the upstream block: ms '
        '(median ratio)\n',
        '| module | input | train: forward + backward | eval |\n'
        '|---|---|---:|---:|',
        sb_tail_rows(size(args.shape), size(args.block_shape), args.batch,
                     args.repeats, args.network_repeats))


def sb_head_table(args):
    print_table(
        '\n## SB\'s bn1, ReLU and squeeze in training: the plain ops → one '
        'function over C++ loops (`norm_squeeze`), forward + backward, ms '
        '(median ratio)\n',
        '| module | input | train: forward + backward |\n|---|---|---:|',
        sb_head_rows(size(args.shape), size(args.block_shape), args.batch,
                     args.repeats, args.network_repeats))


def sb_branch_table(args):
    print_table(
        '\n## SB\'s branch after the squeeze, with bn2 and the ReLU on its '
        'maps, in training: the plain ops → one function over C++ loops '
        '(`bias_maps`), forward + backward, ms (median ratio)\n',
        '| module | input | train: forward + backward |\n|---|---|---:|',
        sb_branch_rows(size(args.shape), size(args.block_shape), args.batch,
                       args.repeats, args.network_repeats))


def kernel_grad_table(args):
    print_table(
        '\n## GE-θ\'s kernel gradient off the reference size: banded GEMMs '
        '→ C++ loops (`adaptive_avg_pool`), ms (median ratio)\n',
        '| op | input | ms |\n|---|---|---:|',
        kernel_grad_rows(size(args.shape), args.repeats,
                         args.network_repeats))


def tail_write_rows(shape, block_shape, batch, repeats):
    """GE's and PSI's inference tails writing into a new map / over
    conv3's output: the second block of each stage, eval, ms."""
    overwrite = GatedBottleneck._tail_may_overwrite
    for batch_, size_ in ((batch, block_shape), (1, shape)):
        for name in NETWORKS:
            net = MODELS.build(BACKBONES[name])
            net.init_weights()
            height, width = (math.ceil(side / 4) for side in size_)
            for stage in range(1, 5):
                block = getattr(net, f'layer{stage}')[1]
                x = torch.randn(batch_, block.conv1.in_channels, height,
                                width)

                def run(fast):
                    GatedBottleneck._tail_may_overwrite = overwrite if fast \
                        else (lambda self: False)
                    block_pass(block, x, False)

                try:
                    ratio, fast, slow = time_two_paths(
                        lambda: run(True), lambda: run(False), repeats)
                finally:
                    GatedBottleneck._tail_may_overwrite = overwrite
                yield (f'| {name}, stage {stage} | '
                       f'{"x".join(map(str, x.shape))} | {slow:.2f} → '
                       f'{fast:.2f} ({ratio:.3f}) |')
                height, width = math.ceil(height / 2), math.ceil(width / 2)


def tail_write_table(args):
    print_table(
        '\n## GE\'s and PSI\'s inference tails: into a new map → over '
        'conv3\'s output, one block (the second of each stage), eval, ms '
        '(median ratio)\n',
        '| block | input | ms |\n|---|---|---:|',
        tail_write_rows(size(args.shape), size(args.block_shape), args.batch,
                        args.repeats))


def eval_affine_rows(repeats):
    """An eval BatchNorm's scale and shift per call, as the fast paths ask
    for them at every forward: the tensor ops / one C++ call."""
    for channels in (64, 256, 1024, 2048):
        norm = torch.nn.BatchNorm2d(channels).eval()
        norm.running_var.uniform_(0.5, 2)
        for dtype in (torch.float32, torch.float64):
            calls = 100  # per timing: a call takes microseconds

            def run(function):
                def calls_of():
                    for _ in range(calls):
                        function(norm, dtype)
                return calls_of

            with torch.no_grad():
                _, fast, slow = time_two_paths(
                    run(eval_affine), run(previous_eval_affine), repeats)
            yield (f'| {channels} | {str(dtype).split(".")[1]} | '
                   f'{slow * 1e3 / calls:.1f} → {fast * 1e3 / calls:.1f} |')


def eval_affine_table(args):
    print_table(
        '\n## An eval BatchNorm as scale and shift (`eval_affine`): the '
        'tensor ops → one C++ call (`norm_scale_shift`), µs per call\n',
        '| channels | asked in | µs |\n|---|---|---:|',
        eval_affine_rows(args.repeats))


def gate_loops_table(args):
    print_table(
        '\n## GE-θ / θ⁺ inference: the gate folded with bn3 as tensor ops → '
        'one C++ call (`global_gate_scale_shift`), whole network, ms\n',
        '| model | path | input | ms | median ratio |\n'
        '|---|---|---|---:|---:|',
        inference_rows(size(args.shape), size(args.block_shape), args.batch,
                       args.network_repeats, only=('gate-loops', )))


if __name__ == '__main__':
    main()
