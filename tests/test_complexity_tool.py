"""tools/analysis/complexity.py end to end on a tiny input (CPU, ~30 s idle)."""
import sys

import pytest
import torch

NAMES = ['R50', 'SB-R50', 'GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50',
         'PSI-R50', 'NL-R50 (c4)', 'GC-R50 (r16, c3-c5)']


def test_complexity_tool_tiny_run(run, repo_root, tmp_path):
    out = tmp_path / 'complexity.md'
    stdout = run([
        sys.executable, repo_root / 'tools' / 'analysis' / 'complexity.py',
        '--shape', '64x64', '--batch', '1', '--repeats', '1', '--warmup', '0',
        '--out', out
    ], timeout=300)
    report = out.read_text()
    assert report.splitlines()[0] in stdout  # printed as well
    assert '## 64x64, batch 1' in report
    assert f'torch {torch.__version__}' in report
    assert 'Peak resident memory of this process: ' in report

    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if line.startswith('| ') and cells[0] in NAMES:
            rows[cells[0]] = cells
    assert list(rows) == NAMES  # all 8 backbones, in order
    # model | params (M) | Δparams | GFLOPs | Δ% FLOPs | ms | ratio | CPU
    # | train ms | train ratio | train MiB | memory ratio | latency ratio
    # 95% CI | train-step ratio 95% CI
    r50 = rows['R50']
    assert r50[2] == '+0' and r50[4] == '+0.00%'
    assert r50[6] == r50[7] == r50[9] == r50[11] == '1.000'
    assert r50[12] == r50[13] == '—'  # the base has no interval
    # SPEC §2: SB-ResNet-50 25,986,620 vs ResNet-50 25,557,032 (same fc).
    assert rows['SB-R50'][2] == '+429,588'
    assert rows['GE-θ⁻-R50'][2] == '+0'
    # SPEC §2 GE-θ / GE-θ⁺ (classifier 2,049,000 = fc, in both counts).
    assert rows['GE-θ-R50'][2] == f'{31_106_600 - 25_557_032:+,}'
    assert rows['GE-θ⁺-R50'][2] == f'{33_637_592 - 25_557_032:+,}'
    for cells in rows.values():
        assert float(cells[1]) > 23 and float(cells[3]) > 0
        assert len(cells) == 14
        assert all(float(v) > 0 for v in cells[5:12])
    for name in NAMES[1:]:
        # one round: the interval is that round's ratio, the median itself
        for ratio, ci in ((6, 12), (9, 13)):
            low, high = rows[name][ci].split('–')
            assert low == high == rows[name][ratio], rows[name]
    # every context module with weights holds more than the plain network
    # in training (its parameters and the activations it saves); GE-θ⁻ adds
    # no weights, and its fused block tail (mmctx.models.norm_gate) saves
    # what ResNet's own tail saves (bn3's input, the block's output)
    for name in NAMES[1:]:
        if name == 'GE-θ⁻-R50':
            assert 0.98 < float(rows[name][11]) < 1.01, rows[name]
        else:
            assert float(rows[name][11]) > 1.0, rows[name]
    # FLOPs are those of the plain ops: the eager fast paths (GEMM 1x1
    # convs, fused gates, custom autograd functions) stay out of the traced
    # graph, so no layer drops out of the count.
    for name in NAMES[1:]:
        assert float(rows[name][4].rstrip('%')) > 0, rows[name]
    assert float(rows['SB-R50'][4].rstrip('%')) >= 0.5  # 0.6-1% at 64x64


@pytest.mark.parametrize('device', [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs a CUDA device'))])
def test_complexity_tool_amp_channels_last(run, repo_root, tmp_path, device):
    """The table with autocast and channels_last (bfloat16 on CPU, float16
    on CUDA), on the CPU and, where one exists, a GPU (``--device cuda``):
    every column filled, the settings in the report."""
    out = tmp_path / 'complexity.md'
    models = ['R50', 'SB-R50', 'GE-θ⁺-R50', 'PSI-R50', 'R50 (again)']
    run([sys.executable, repo_root / 'tools' / 'analysis' / 'complexity.py',
         '--device', device, '--amp', '--channels-last', '--shape', '64x64',
         '--batch', '2', '--repeats', '1', '--warmup', '0', '--models',
         *models, '--out', out], timeout=300)
    report = out.read_text()
    assert 'autocast float32, channels_last' in report
    if device == 'cuda':
        assert f'GPU: {torch.cuda.get_device_name()}' in report
    rows = [[c.strip() for c in line.strip('|').split('|')]
            for line in report.splitlines() if line.startswith('| ')
            and line.strip('|').split('|')[0].strip() in models]
    assert [r[0] for r in rows] == models
    for cells in rows:
        assert len(cells) == 14 and all(float(v) > 0 for v in cells[5:12])


def test_fast_path_ab_tool_tiny_run(run, repo_root):
    """tools/analysis/fast_path_ab.py prints all nineteen tables, every stage,
    setting and gated model, with positive times and ratios."""
    stdout = run([
        sys.executable, repo_root / 'tools' / 'analysis' /
        'fast_path_ab.py', '--shape', '64x96', '--block-shape', '32x32',
        '--batch', '2', '--repeats', '1', '--network-repeats', '1'
    ], timeout=300)
    headers = ('| stage', '| model', '| module', '| conv1 output', '| op ',
               '| block |', '| channels')
    tables = [[line.strip('|').split('|') for line in section.splitlines()
               if line.startswith('| ') and not line.startswith(headers)]
              for section in stdout.split('\n## ')[1:]]
    (pools, reductions, networks, pixel_gates, blocks, norm_gates,
     norm_gate_networks, few_maps, fused_squeezes, pooled_dots,
     offset_dots, inference, sb_tail, sb_head, kernel_grads,
     tail_writes, eval_affines, gate_loops, sb_branch) = tables

    def numbers(cell):
        return [float(v) for v in cell.replace('/', '→').split('→')]

    assert [r[0].strip() for r in pools] == ['1', '2', '3', '4']
    assert pools[0][1].strip() == '1x256x16x24 → 56'
    assert [r[1].strip() for r in reductions] == [
        '2x256x8x8 (56x56)', '2x512x4x4 (28x28)', '2x1024x2x2 (14x14)',
        '2x2048x1x1 (7x7)', '1x256x16x24 (56x56)', '1x512x8x12 (28x28)',
        '1x1024x4x6 (14x14)', '1x2048x2x3 (7x7)']
    assert [(r[0].strip(), r[1].strip()) for r in networks] == [
        (name, size) for size in ('2x3x32x32', '1x3x64x96')
        for name in ('GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50')]
    assert [r[0].strip() for r in blocks] == ['GE-θ⁻-R50', 'GE-θ⁺-R50',
                                              'PSI-R50']
    for r in pools:
        for cell in r[2:]:
            assert all(v > 0 for v in numbers(cell)), r
    for r in reductions:  # ms to 2 decimals: a 2x2048x1x1 map reads 0.00
        for cell in r[2:]:
            assert all(v >= 0 for v in numbers(cell)), r
    for r in networks:
        assert all(float(v) > 0 for v in r[2:]), r
    assert [r[1].strip() for r in pixel_gates] == [
        '2x256x8x8', '2x512x4x4', '2x1024x2x2', '2x2048x1x1']
    for r in pixel_gates:
        assert all(v > 0 for v in numbers(r[2])), r
    for r in blocks:
        assert all(float(v) > 0 for v in r[1:])
    assert [r[1].strip() for r in norm_gates] == [
        '2x256x8x8', '2x512x4x4', '2x1024x2x2', '2x2048x1x1',
        '1x256x16x24', '1x512x8x12', '1x1024x4x6', '1x2048x2x3']
    for r in norm_gates:  # ResNet-50, then GE-θ⁻ / θ / θ⁺, PSI plain → fused
        assert len(r) == 7 and all(v > 0 for c in r[2:] for v in numbers(c))
    assert [(r[0].strip(), r[1].strip()) for r in norm_gate_networks] == [
        (name, size) for size in ('2x3x32x32', '1x3x64x96')
        for name in ('GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50')]
    for r in norm_gate_networks:
        assert all(v > 0 for v in numbers(r[2])) and float(r[3]) > 0
    assert [(r[0].strip(), r[1].strip()) for r in few_maps[:3]] == [
        ('SB', '2x64x8x8 → 5'), ('PSI', '2x256x8x8 → 16'),
        ('SB', '2x128x4x4 → 5')]
    assert len(few_maps) == 14  # SB in 3 stages, PSI in 4; two settings
    for r in few_maps:  # loops / GEMM / conv, eval and forward + backward
        assert all(len(numbers(c)) == 3 and all(v >= 0 for v in numbers(c))
                   for c in r[2:4]), r
    assert [r[0].strip() for r in fused_squeezes] == [
        '2x64x8x8', '2x128x4x4', '2x256x2x2', '1x64x16x24', '1x128x8x12',
        '1x256x4x6']
    assert [r[1].strip() for r in pooled_dots] == [
        '1x256x16x24 → 56', '1x512x8x12 → 28', '1x1024x4x6 → 14',
        '1x2048x2x3 → 7']
    for r in fused_squeezes + pooled_dots:
        assert all(v >= 0 for v in numbers(r[-1])), r
    assert [(r[0].strip(), r[1].strip()) for r in offset_dots] == [
        (f'PSI {what}, stage {stage}', shape) for stage, shape in
        [(1, '2x16x8x8 → 16x16'), (2, '2x4x4x4 → 16x16'),
         (3, '2x1x2x2 → 16x16'), (4, '2x1x1x1 → 8x8'),
         (1, '1x16x16x24 → 16x16'), (2, '1x4x8x12 → 16x16'),
         (3, '1x1x4x6 → 16x16'), (4, '1x1x2x3 → 8x8')]
        for what in ('patches', 'patch loops')] + [
        (f'GE gather dots, stage {stage}', shape) for stage, shape in
        enumerate(['2x256x8x8', '2x512x4x4', '2x1024x2x2', '2x2048x1x1'], 1)]
    for r in offset_dots:
        assert all(v >= 0 for v in numbers(r[2])), r
    assert [(r[0].strip(), r[2].strip()) for r in inference] == [
        (name, size) for size in ('2x3x32x32', '1x3x64x96')
        for name in ('SB-R50', 'GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50',
                     'PSI-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'GE-θ-R50',
                     'GE-θ⁺-R50', 'PSI-R50', 'SB-R50', 'PSI-R50',
                     'GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50',
                     'GE-θ-R50', 'GE-θ⁺-R50')]
    assert [(r[0].strip(), r[2].strip()) for r in gate_loops] == [
        (name, size) for size in ('2x3x32x32', '1x3x64x96')
        for name in ('GE-θ-R50', 'GE-θ⁺-R50')]
    for r in inference + gate_loops:
        assert all(v > 0 for v in numbers(r[3])) and float(r[4]) > 0
    assert [(r[0].strip(), r[1].strip()) for r in sb_tail] == [
        ('block, stage 1', '2x256x8x8'), ('block, stage 2', '2x512x4x4'),
        ('block, stage 3', '2x1024x2x2'), ('block, stage 1', '1x256x16x24'),
        ('block, stage 2', '1x512x8x12'), ('block, stage 3', '1x1024x4x6'),
        ('SB-R50 train step', '2x3x32x32'),
        ('SB-R50 train step', '1x3x64x96'),
        ('SB-R50 inference, branch kept / computed', '2x3x32x32'),
        ('SB-R50 inference, branch kept / computed', '1x3x64x96')]
    for r in sb_tail:  # upstream → fast (ratio), train and eval for blocks
        cells = [c for c in r[2:] if c.strip()]
        assert len(cells) == (2 if r[0].startswith(' block') else 1), r
        for cell in cells:
            before, after = cell.split('(')
            assert all(v > 0 for v in numbers(before)), r
            assert float(after.strip(' )')) > 0, r
    assert [(r[0].strip(), r[1].strip()) for r in sb_head] == [
        ('block, stage 1', '2x256x8x8'), ('block, stage 2', '2x512x4x4'),
        ('block, stage 3', '2x1024x2x2'), ('block, stage 4', '2x2048x1x1'),
        ('block, stage 1', '1x256x16x24'), ('block, stage 2', '1x512x8x12'),
        ('block, stage 3', '1x1024x4x6'), ('block, stage 4', '1x2048x2x3'),
        ('SB-R50 train step', '2x3x32x32'),
        ('SB-R50 train step', '1x3x64x96')]
    assert [(r[0].strip(), r[1].strip()) for r in sb_branch] == [
        (f'branch, stage {stage % 3 + 1}', shape) for stage, shape in
        enumerate(['2x5x8x8', '2x5x4x4', '2x5x2x2', '1x5x16x24',
                   '1x5x8x12', '1x5x4x6'])] + [
        (r[0].strip(), r[1].strip()) for r in sb_head
        if not r[0].endswith('stage 4 ')]  # (no branch in stage 4)
    for r in sb_head + sb_branch:  # plain → fused (ratio), fwd + bwd
        before, after = r[2].split('(')
        assert all(v > 0 for v in numbers(before)), r
        assert float(after.strip(' )')) > 0, r
    assert [(r[0].strip(), r[1].strip()) for r in kernel_grads] == [
        ('kernel gradient, stage 1', '256x16x24 → 56'),
        ('kernel gradient, stage 2', '512x8x12 → 28'),
        ('kernel gradient, stage 3', '1024x4x6 → 14'),
        ('kernel gradient, stage 4', '2048x2x3 → 7'),
        ('GE-θ-R50 train step', '1x3x64x96'),
        ('GE-θ⁺-R50 train step', '1x3x64x96')]
    for r in kernel_grads[:4]:  # banded GEMMs → loops (ms, 2 decimals)
        assert all(v >= 0 for v in numbers(r[2])), r
    for r in kernel_grads[4:]:
        before, after = r[2].split('(')
        assert all(v > 0 for v in numbers(before)), r
        assert float(after.strip(' )')) > 0, r
    assert [(r[0].strip(), r[1].strip()) for r in tail_writes] == [
        (f'{name}, stage {stage}', shape)
        for shapes in (['2x256x8x8', '2x512x4x4', '2x1024x2x2',
                        '2x2048x1x1'],
                       ['1x256x16x24', '1x512x8x12', '1x1024x4x6',
                        '1x2048x2x3'])
        for name in ('GE-θ⁻-R50', 'GE-θ-R50', 'GE-θ⁺-R50', 'PSI-R50')
        for stage, shape in enumerate(shapes, 1)]
    for r in tail_writes:  # new map → over conv3's output (ratio)
        before, after = r[2].split('(')
        assert all(v > 0 for v in numbers(before)), r
        assert float(after.strip(' )')) > 0, r
    assert [(r[0].strip(), r[1].strip()) for r in eval_affines] == [
        (str(channels), dtype) for channels in (64, 256, 1024, 2048)
        for dtype in ('float32', 'float64')]
    for r in eval_affines:  # tensor ops → one C++ call, µs per call
        assert all(v > 0 for v in numbers(r[2])), r


def test_time_two_paths_alternates_and_reports_the_pair_ratio():
    from mmctx.benchmark import time_two_paths
    order = []
    ratio, fast, plain = time_two_paths(lambda: order.append('f'),
                                        lambda: order.append('p'),
                                        repeats=4, warmup=0)
    assert order == ['f', 'p', 'p', 'f', 'f', 'p', 'p', 'f']
    assert ratio > 0 and fast >= 0 and plain >= 0
