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
    # every context module holds more than the plain network in training
    # (its parameters and the activations it saves: GE-θ⁻ its gate)
    for name in NAMES[1:]:
        assert float(rows[name][11]) > 1.0, rows[name]
    # the shipped detection setting, and the training loss's gradients
    assert "setting: detection ({'norm_eval': True, 'frozen_stages': 1})" \
        in report
    denormals = next(line for line in report.splitlines()
                     if 'Denormal gradient values' in line)
    assert denormals.startswith('Denormals flushed to zero while timing.')
    counts = denormals.split(': ', 1)[1] + ', '
    for name in NAMES:
        assert f'{name} 0, ' in counts, denormals
    # FLOPs are those of the one forward: no layer drops out of the count
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



def test_complexity_tool_compiled_segmentation_setting(run, repo_root,
                                                       tmp_path):
    """``--compile`` times each backbone's torch.compile; ``--setting
    segmentation`` trains every BN."""
    out = tmp_path / 'complexity.md'
    run([sys.executable, repo_root / 'tools' / 'analysis' / 'complexity.py',
         '--setting', 'segmentation', '--compile', '--no-train', '--shape',
         '64x64', '--batch', '1', '--repeats', '1', '--warmup', '1',
         '--models', 'R50', 'SB-R50', '--out', out], timeout=900)
    report = out.read_text()
    assert "setting: segmentation ({'norm_eval': False, 'frozen_stages': " \
        "-1}); torch.compile (inductor)" in report
    rows = [line for line in report.splitlines()
            if line.startswith('| R50 ') or line.startswith('| SB-R50 ')]
    assert len(rows) == 2


def test_iteration_time_tool_tiny_run(run, repo_root, tmp_path):
    """tools/analysis/iteration_time.py: the Runner's logged time of two
    shipped segmentation configs on ../shared/data, interleaved."""
    out = tmp_path / 'iterations.md'
    stdout = run([
        sys.executable, repo_root / 'tools' / 'analysis' /
        'iteration_time.py', '--task', 'seg', '--rounds', '1', '--iters',
        '2', '--skip', '1', '--batch', '1', '--configs', 'fpn_r50_ade20k',
        'fpn_sb_r50_ade20k', '--out', out], timeout=900)
    assert '[round 1/1] fpn_sb_r50_ade20k:' in stdout
    rows = {line.split('|')[1].strip(): line for line in
            out.read_text().splitlines() if line.startswith('| fpn')}
    assert set(rows) == {'fpn_r50_ade20k', 'fpn_sb_r50_ade20k'}
    ratio = float(rows['fpn_sb_r50_ade20k'].split('|')[3])
    assert 0.3 < ratio < 3
