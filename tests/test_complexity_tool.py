"""tools/analysis/complexity.py end to end on a tiny input (CPU, ~30 s idle)."""
import sys

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

    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if line.startswith('| ') and cells[0] in NAMES:
            rows[cells[0]] = cells
    assert list(rows) == NAMES  # all 8 backbones, in order
    # model | params (M) | Δparams | GFLOPs | Δ% FLOPs | ms | ratio | CPU
    # | train ms | train ratio | train MiB | memory ratio
    r50 = rows['R50']
    assert r50[2] == '+0' and r50[4] == '+0.00%'
    assert r50[6] == r50[7] == r50[9] == r50[11] == '1.000'
    # SPEC §2: SB-ResNet-50 25,986,620 vs ResNet-50 25,557,032 (same fc).
    assert rows['SB-R50'][2] == '+429,588'
    assert rows['GE-θ⁻-R50'][2] == '+0'
    # SPEC §2 GE-θ / GE-θ⁺ (classifier 2,049,000 = fc, in both counts).
    assert rows['GE-θ-R50'][2] == f'{31_106_600 - 25_557_032:+,}'
    assert rows['GE-θ⁺-R50'][2] == f'{33_637_592 - 25_557_032:+,}'
    for cells in rows.values():
        assert float(cells[1]) > 23 and float(cells[3]) > 0
        assert len(cells) == 12
        assert all(float(v) > 0 for v in cells[5:12])
    # every context module holds more than the plain network in training
    # (its parameters and the activations it saves); GE-θ⁻ adds no weights
    for name in NAMES[1:]:
        assert float(rows[name][11]) > 1.0, rows[name]
    # FLOPs are those of the plain ops: the eager fast paths (GEMM 1x1
    # convs, fused gates, custom autograd functions) stay out of the traced
    # graph, so no layer drops out of the count.
    for name in NAMES[1:]:
        assert float(rows[name][4].rstrip('%')) > 0, rows[name]
    assert float(rows['SB-R50'][4].rstrip('%')) >= 0.5  # 0.6-1% at 64x64
