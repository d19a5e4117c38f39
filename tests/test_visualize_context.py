"""tools/analysis/visualize_context.py and mmctx.visualization: context maps
of shipped configs (detection, segmentation, classification) from a
checkpoint the test writes, on a real COCO image, at the image's own size.
"""
import sys

import cv2
import numpy as np
import pytest
import torch

import mmctx  # noqa: F401
from mmctx.visualization import (NoContextModulesError,
                                 build_model_from_config,
                                 compute_context_maps)

NO_PRETRAINED = {'model.backbone.init_cfg': None}


@pytest.fixture(scope='module')
def image_path(shared_data):
    images = sorted((shared_data / 'tiny_coco' / 'train2017').glob('*.jpg'))
    assert images, 'no COCO image in the shared data'
    return images[0]


def _save_checkpoint(model, path):
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, str(path))
    return path


def test_tool_writes_sb_maps_of_a_detection_config(repo_root, run,
                                                   image_path, tmp_path):
    config = repo_root / 'configs' / 'faster_rcnn_sb_r50.py'
    model = build_model_from_config(str(config), cfg_options=NO_PRETRAINED)
    model.init_weights()
    ckpt = _save_checkpoint(model, tmp_path / 'sb.pth')
    out = tmp_path / 'maps'
    stdout = run([sys.executable, 'tools/analysis/visualize_context.py',
                  config, ckpt, image_path, '--out-dir', out,
                  '--cfg-options', 'model.backbone.init_cfg=None'])
    h, w = cv2.imread(str(image_path)).shape[:2]
    assert (out / 'overview.png').is_file()
    assert (out / 'context_maps.npz').is_file()
    # SB in stages 1-3 of ResNet-50 (3, 4, 6 blocks), k = 3 maps each
    files = sorted(out.glob('sb_stage*_block*_map*.png'))
    assert len(files) == (3 + 4 + 6) * 3
    for f in files:
        assert str(f) in stdout
        assert cv2.imread(str(f)).shape == (h, w, 3), f
    raw = np.load(out / 'context_maps.npz')
    firsts = [raw[f'sb_stage{s}_block0_map0'] for s in (1, 2, 3)]
    for a in firsts:
        assert a.shape == (h, w) and a.std() > 0
    pictures = [cv2.imread(str(out / f'sb_stage{s}_block0_map0.png'))
                for s in (1, 2, 3)]
    assert not np.array_equal(pictures[0], pictures[1])
    assert not np.array_equal(pictures[1], pictures[2])
    assert not np.allclose(firsts[0], firsts[1])


def _randomise_gates(model):
    """A trained-looking model: the gates' zero-initialised last layers and
    the zero-initialised last norm of every residual branch get random
    weights, so the gates and their inputs depend on the image."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.excite.2.' in name or '.mlp.2.' in name:
                p.normal_(0, 0.5 if ".excite." in name else 0.02)
            elif name.endswith('bn3.weight'):
                p.normal_(1, 0.2)


@pytest.mark.parametrize('config,kind', [
    ('fpn_ge_r50_ade20k.py', 'ge'),      # segmentation, GE-θ⁺
    ('imagenet_psi_r50_sgd.py', 'psi'),  # classification, PSI
])
def test_gate_maps_of_segmentation_and_classification_configs(
        repo_root, image_path, tmp_path, config, kind):
    from mmctx.visualization import visualize_context
    config = str(repo_root / 'configs' / config)
    model = build_model_from_config(config, cfg_options=NO_PRETRAINED)
    model.init_weights()
    img = cv2.imread(str(image_path))
    h, w = img.shape[:2]
    # freshly initialised, the gate is the constant 0.5 (its last layer is
    # zero) and the maps say so
    for cmap in compute_context_maps(model, img):
        assert np.allclose(cmap.maps, 0.5, atol=1e-5), cmap
    _randomise_gates(model)
    ckpt = _save_checkpoint(model, tmp_path / f'{kind}.pth')
    paths = visualize_context(config, str(ckpt), str(image_path),
                              str(tmp_path / 'out'),
                              cfg_options=NO_PRETRAINED)
    stage_files = [tmp_path / 'out' / f'{kind}_stage{s}_block0.png'
                   for s in (1, 2, 3, 4)]
    for f in stage_files:
        assert str(f) in paths
        assert cv2.imread(str(f)).shape == (h, w, 3)
    raw = np.load(tmp_path / 'out' / 'context_maps.npz')
    maps = [raw[f'{kind}_stage{s}_block0'] for s in (1, 2, 3, 4)]
    for a in maps:
        assert a.shape == (h, w)
        assert 0 <= a.min() and a.max() <= 1  # sigmoid gates
    for a, b in zip(maps, maps[1:]):
        assert not np.allclose(a, b)
    if kind == 'psi':
        # PSI's map is its patch weights: piecewise constant, varying
        assert maps[0].std() > 0
    pictures = [cv2.imread(str(f)) for f in stage_files]
    assert any(not np.array_equal(a, b)
               for a, b in zip(pictures, pictures[1:]))


def test_config_without_context_modules_is_a_clear_error(
        repo_root, image_path, tmp_path):
    import subprocess
    config = repo_root / 'configs' / 'faster_rcnn_r50.py'
    with pytest.raises(NoContextModulesError, match='without mmctx context'):
        build_model_from_config(str(config), cfg_options=NO_PRETRAINED)
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/visualize_context.py', str(config),
         str(tmp_path / 'none.pth'), str(image_path), '--out-dir',
         str(tmp_path / 'out')], cwd=str(repo_root), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode != 0
    assert 'without mmctx context modules' in proc.stderr
    assert not (tmp_path / 'out').exists()
