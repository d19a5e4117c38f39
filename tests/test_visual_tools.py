"""The stock visual tools (issue 10 part 4):

- ``tools/test.py CONFIG CKPT --show-dir DIR`` writes the drawn predictions of
  every test image, for a detection config (a freshly built Faster R-CNN
  saved as an mmengine checkpoint) and a segmentation config (the checkpoint
  of a 2-iteration training run), on the real samples in ../shared/data;
- ``--show`` without a display stops at once with a clear message;
- a config with ``TensorboardVisBackend`` trains and writes an event file;
- ``tools/analysis/analyze_logs.py plot_curve`` plots that run's json log.

The three tool runs that need a model start up front, two at a time.
"""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from config_overrides import (REPO_ROOT, ADE20K_SAMPLE, TINY_COCO,
                              cli_options, config_path, det_options,
                              find_checkpoint, load_config, seg_options)

DET = 'faster_rcnn_r50'
SEG = 'fpn_sb_r50_ade20k'
TOOLS = REPO_ROOT / 'tools'


def _env(**extra):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO_ROOT)] +
        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['OMP_NUM_THREADS'] = '1'
    env['MKL_NUM_THREADS'] = '1'
    env['MPLBACKEND'] = 'Agg'
    env.update(extra)
    return env


def _run(args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)],
                          cwd=str(REPO_ROOT), env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def _det_run(tmp):
    """A freshly built Faster R-CNN, saved like mmengine saves one, tested
    with --show-dir on 2 tiny_coco images. Every box is drawn
    (score_thr 0): an untrained detector scores far below the hook's 0.3."""
    import torch
    import mmctx  # noqa: F401
    from mmengine.registry import MODELS, init_default_scope
    cfg = load_config(DET)
    options = det_options(cfg)
    cfg.merge_from_dict(options)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    ckpt = tmp / 'det.pth'
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, ckpt)
    show_dir = tmp / 'det_show'
    options['default_hooks.visualization.score_thr'] = 0.0
    rc, out = _run([TOOLS / 'test.py', config_path(DET), ckpt, '--work-dir',
                    tmp / 'det_work', '--show-dir', show_dir,
                    *cli_options(options)])
    return dict(rc=rc, out=out, show_dir=show_dir)


def _seg_run(tmp):
    """Semantic FPN trained for 2 iterations with the TensorBoard backend
    added to the visualizer, then tested with --show-dir."""
    work = tmp / 'seg_work'
    cfg_file = tmp / 'fpn_sb_tensorboard.py'
    cfg_file.write_text(
        f"_base_ = {str(config_path(SEG))!r}\n"
        "visualizer = dict(vis_backends=[dict(type='LocalVisBackend'),\n"
        "                                dict(type='TensorboardVisBackend')])\n")
    options = seg_options(load_config(SEG))
    rc, out = _run([TOOLS / 'train.py', cfg_file, '--work-dir', work,
                    *cli_options(options)])
    result = dict(train_rc=rc, train_out=out, work=work)
    if rc != 0:
        return result
    show_dir = tmp / 'seg_show'
    rc, out = _run([TOOLS / 'test.py', config_path(SEG),
                    find_checkpoint(work), '--work-dir', tmp / 'seg_test',
                    '--show-dir', show_dir, *cli_options(options)])
    result.update(rc=rc, out=out, show_dir=show_dir)
    return result


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('visual')
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {'seg': pool.submit(_seg_run, tmp),
               'det': pool.submit(_det_run, tmp)}
    yield futures
    pool.shutdown(wait=True)


def _read(path):
    import cv2
    img = cv2.imread(str(path))
    assert img is not None, f'{path} is not an image'
    return img


def _changed(drawn, original, tol=40):
    """Fraction of pixels that differ by more than ``tol`` in some channel
    (JPEG re-encoding stays well below that)."""
    diff = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2)
    return float((diff > tol).mean())


def test_show_dir_detection(runs):
    result = runs['det'].result()
    assert result['rc'] == 0, result['out'][-4000:]
    assert 'coco/bbox_mAP' in result['out']
    files = sorted(result['show_dir'].iterdir())
    # one file per test image, named after it: ground truth | prediction
    assert len(files) == 2, files
    for path in files:
        source = _read(TINY_COCO / 'train2017' / path.name)
        drawn = _read(path)
        h, w = source.shape[:2]
        assert drawn.shape == (h, 2 * w, 3), (path, drawn.shape)
        gt, pred = drawn[:, :w], drawn[:, w:]
        assert _changed(gt, source) > 0.005, path
        assert _changed(pred, source) > 0.005, path
        assert not np.array_equal(gt, pred)


def test_show_dir_segmentation(runs):
    result = runs['seg'].result()
    assert result['train_rc'] == 0, result['train_out'][-4000:]
    assert result['rc'] == 0, result['out'][-4000:]
    assert 'mIoU' in result['out']
    files = sorted((result['show_dir'] / 'vis_data' / 'vis_image').glob(
        'test_*.png'))
    assert len(files) == 2, files
    sources = sorted((ADE20K_SAMPLE / 'images' / 'validation').glob('*.jpg'))
    for path in files:
        name = next(s for s in sources if path.name.startswith(
            f'test_{s.name}_'))
        source = _read(name)
        drawn = _read(path)
        h, w = source.shape[:2]
        assert drawn.shape == (h, 2 * w, 3), (path, drawn.shape)
        # the predicted label map is blended over the whole image
        assert _changed(drawn[:, w:], source, tol=20) > 0.2, path


def test_tensorboard_backend_writes_events(runs):
    result = runs['seg'].result()
    assert result['train_rc'] == 0, result['train_out'][-4000:]
    events = list(Path(result['work']).rglob('events.out.tfevents.*'))
    assert events and all(e.stat().st_size > 0 for e in events), \
        list(Path(result['work']).rglob('*'))
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert 'loss' in acc.Tags()['scalars'], acc.Tags()
    assert [e.step for e in acc.Scalars('loss')] == [1, 2]


def test_analyze_logs_plot_curve(runs, tmp_path):
    result = runs['seg'].result()
    assert result['train_rc'] == 0, result['train_out'][-4000:]
    logs = sorted(Path(result['work']).rglob('vis_data/scalars.json'))
    assert len(logs) == 1, logs
    out = tmp_path / 'curve.png'
    rc, text = _run([TOOLS / 'analysis' / 'analyze_logs.py', 'plot_curve',
                     logs[0], '--keys', 'loss', 'mIoU', '--out', out])
    assert rc == 0, text
    assert 'save curve to' in text
    img = _read(out)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 5  # something is drawn
    # a missing key names what the log has
    rc, text = _run([TOOLS / 'analysis' / 'analyze_logs.py', 'plot_curve',
                     logs[0], '--keys', 'bbox_mAP', '--out', out])
    assert rc != 0 and "'bbox_mAP'" in text and 'loss' in text, text


def test_curve_reads_epoch_and_iter_logs(tmp_path):
    from mmctx.log_analysis import curve, load_json_log
    log = tmp_path / 'scalars.json'
    log.write_text(
        '{"lr": 0.02, "loss": 2.0, "epoch": 1, "iter": 1, "step": 1}\n'
        '{"lr": 0.02, "loss": 1.5, "epoch": 1, "iter": 2, "step": 2}\n\n'
        '{"coco/bbox_mAP": 0.1, "data_time": 0.1, "step": 1}\n')
    records = load_json_log(log)
    assert curve(records, 'loss') == ([1, 2], [2.0, 1.5], 'iter', True)
    assert curve(records, 'bbox_mAP') == ([1], [0.1], 'epoch', False)
    with pytest.raises(KeyError, match='mIoU'):
        curve(records, 'mIoU')


# --------------------------------------------------------------------------
# --show
# --------------------------------------------------------------------------
def test_show_without_display_fails_clearly(tmp_path):
    env = _env()
    env.pop('DISPLAY', None)
    env.pop('WAYLAND_DISPLAY', None)
    rc, out = _run([TOOLS / 'test.py', config_path(DET), tmp_path / 'x.pth',
                    '--show'], env=env, timeout=300)
    assert rc == 2, out
    assert 'Traceback' not in out
    assert '--show needs a display' in out and '--show-dir' in out


def test_trigger_visualization_hook(monkeypatch, tmp_path):
    """The hook settings per toolbox, as upstream test.py sets them."""
    from mmengine.config import Config

    from mmctx.show_results import (NoDisplayError, has_display,
                                    trigger_visualization_hook)
    monkeypatch.chdir(tmp_path)
    det = Config(dict(default_scope='mmdet', default_hooks=dict(
        visualization=dict(type='DetVisualizationHook'))))
    trigger_visualization_hook(det, show_dir='out')
    assert det.default_hooks.visualization == dict(
        type='DetVisualizationHook', draw=True,
        test_out_dir=str(tmp_path / 'out'))
    seg = Config(dict(default_scope='mmseg', visualizer=dict(
        type='SegLocalVisualizer'), default_hooks=dict(
            visualization=dict(type='SegVisualizationHook'))))
    monkeypatch.setenv('DISPLAY', ':0')
    assert has_display() or sys.platform.startswith(('win', 'darwin'))
    trigger_visualization_hook(seg, show=True, show_dir='s', wait_time=0.5)
    assert seg.default_hooks.visualization == dict(
        type='SegVisualizationHook', draw=True, show=True, wait_time=0.5,
        interval=1)
    assert seg.visualizer.save_dir == str(tmp_path / 's')
    cls = Config(dict(default_scope='mmpretrain', default_hooks=dict(
        visualization=dict(type='VisualizationHook', enable=False))))
    trigger_visualization_hook(cls, show_dir='c')
    assert cls.default_hooks.visualization == dict(
        type='VisualizationHook', enable=True, interval=1, show=False,
        wait_time=2.0, out_dir=str(tmp_path / 'c'))
    # nothing asked: nothing changes; no hook: a clear error
    untouched = Config(dict(default_hooks=dict()))
    assert trigger_visualization_hook(untouched) is untouched
    with pytest.raises(RuntimeError, match='VisualizationHook'):
        trigger_visualization_hook(untouched, show_dir='x')
    if not sys.platform.startswith(('win', 'darwin')):
        monkeypatch.delenv('DISPLAY')
        monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
        with pytest.raises(NoDisplayError, match='--show-dir'):
            trigger_visualization_hook(det, show=True)


def test_setup_installs_what_the_visual_tools_import():
    """setup.py requires (and setup_env.sh's sanity check imports) what
    mmdet's plot_curve and mmengine's TensorBoard backend need."""
    import ast
    from importlib.metadata import version
    tree = ast.parse((REPO_ROOT / 'setup.py').read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, 'id', None) == 'setup')
    requires = next(ast.literal_eval(k.value) for k in call.keywords
                    if k.arg == 'install_requires')
    names = {re.split(r'[<>=!~ ]', r)[0] for r in requires}
    assert {'matplotlib', 'seaborn', 'tensorboard'} <= names
    for name in ('matplotlib', 'seaborn', 'tensorboard'):
        assert version(name)
    sanity = (REPO_ROOT / 'tools' / 'setup_env.sh').read_text()
    assert 'import matplotlib, seaborn' in sanity
    assert 'from torch.utils.tensorboard import SummaryWriter' in sanity
