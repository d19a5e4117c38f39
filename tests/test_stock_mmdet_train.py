"""The stock tools/train.py shipped inside mmdet (mmdet/.mim/tools) trains a
config that pulls mmctx in through custom_imports -- and resumes, which
needs mmctx's weights-only allowlist."""
import json
import sys
from pathlib import Path

import mmdet


def test_stock_mmdet_train_with_custom_imports(run, tiny_det_config,
                                               tmp_path):
    tool = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'train.py'
    assert tool.is_file(), f'{tool} not shipped with mmdet'
    work_dir = tmp_path / 'work'
    cfg = tiny_det_config(max_iters=2)
    log = run([sys.executable, tool, cfg, '--work-dir', work_dir])
    probe = json.loads((work_dir / 'probe_rank0.json').read_text())
    assert probe['mmctx_imported'] and not probe['torchvision_imported']
    assert (work_dir / 'iter_2.pth').is_file()
    assert 'Iter(train) [2/2]' in log
    assert 'coco/bbox_mAP' in log  # validation ran through CocoMetric

    log = run([sys.executable, tool, cfg, '--work-dir', work_dir,
               '--resume', '--cfg-options', 'train_cfg.max_iters=3',
               'train_cfg.val_interval=100'])
    assert 'resumed epoch: 0, iter: 2' in log
    assert (work_dir / 'iter_3.pth').is_file()
