"""The long-range-context probe (mmctx.probe): the synthetic task is what it
claims (deterministic, cue outside the plain model's receptive field);
context flows structurally (the marker reaches the far pixels' logits through
SB, GE-θ⁺ and PSI, not through the plain ResNet, and no longer through SB
once its branch is cut off); and it is *learned*: short trainings through
mmengine's Runner with the shipped probe configs, in which SB, GE-θ⁺ and PSI
learn the far cue while the same SB model with its branch cut off stays at
chance.
"""
import copy

import numpy as np
import pytest
import torch

import mmctx  # noqa: F401
from mmctx import probe
from mmctx.models import SpatialBias


def test_sample_is_deterministic_and_labelled_by_the_far_marker():
    a = probe.make_probe_sample(seed=3, index=7)
    b = probe.make_probe_sample(seed=3, index=7)
    c = probe.make_probe_sample(seed=3, index=8)
    d = probe.make_probe_sample(seed=3, index=7, split='val')
    assert np.array_equal(a['img'], b['img'])
    assert np.array_equal(a['gt_seg_map'], b['gt_seg_map'])
    assert not np.array_equal(a['img'], c['img'])
    assert not np.array_equal(a['img'], d['img'])
    labels = []
    for i in range(60):
        s = probe.make_probe_sample(seed=0, index=i)
        gt, img, (x0, y0, x1, y1) = s['gt_seg_map'], s['img'], s['marker_box']
        labels.append(s['label'])
        shapes = s['shape_mask']
        assert shapes.any()
        # every pixel far from the marker has the marker's class, every
        # nearer one (the marker's own included) is ignored
        dist = probe.cue_distance_map(gt.shape, s['marker_box'])
        assert (gt[dist >= 56] == s['label']).all()
        assert (gt[dist < 56] == probe.IGNORE_INDEX).all()
        assert (gt[y0:y1, x0:x1] == probe.IGNORE_INDEX).all()
        assert dist[shapes].min() >= 56
        # the marker is saturated in its class's colour ...
        marker = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        target = np.array(probe.MARKER_BGR[s['label']])
        assert np.abs(marker - target).max() < 25
        # ... the shapes are grey whatever the class
        pixels = img[shapes].astype(float)
        assert np.abs(pixels - pixels.mean(1, keepdims=True)).mean() < 8
        assert pixels.mean() > 180
    assert set(labels) == {0, 1, 2}


def test_sample_arguments_are_checked():
    with pytest.raises(ValueError, match='split'):
        probe.make_probe_sample(split='test')
    with pytest.raises(ValueError, match='min_cue_distance'):
        probe.make_probe_sample(image_size=64, min_cue_distance=60)
    with pytest.raises(ValueError, match='num_samples'):
        probe.ContextProbeDataset(num_samples=0)


@pytest.mark.parametrize('iters', [300, 1200])
def test_iters_stretches_the_decay_and_keeps_the_warm_up(iters):
    """``iters`` shorter or longer than the config's: the poly decay ends at
    the new last iteration (not at lr 0 half-way, nor cut off), the warm-up
    keeps its 20 iterations."""
    cfg = probe.probe_config('SB', iters=iters)
    warm_up, decay = cfg.param_scheduler
    assert (warm_up.begin, warm_up.end) == (0, 20)
    assert (decay.begin, decay.end) == (20, iters)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == iters


def _build(name):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmseg')
    cfg = probe.probe_config(name)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval(), cfg


def _marker_sensitivity(model, size, n=4):
    """Largest change of the logits on labelled pixels when the marker is
    recoloured (relative to the logits' scale), over ``n`` val samples."""
    dataset = probe.ContextProbeDataset(num_samples=n, split='val',
                                        pipeline=[])
    worst = 0.0
    for i in range(n):
        info = dataset.get_data_info(i)
        x0, y0, x1, y1 = info['marker_box']
        recoloured = info['img'].copy()
        other = (info['label'] + 1) % 3  # another class's marker colour
        recoloured[y0:y1, x0:x1] = probe.MARKER_BGR[other]
        with torch.no_grad():
            logits = [
                model.encode_decode(
                    model.data_preprocessor(
                        dict(inputs=[torch.from_numpy(im).permute(2, 0, 1)]),
                        False)['inputs'],
                    [dict(img_shape=(size, size), pad_shape=(size, size))])
                for im in (info['img'], recoloured)
            ]
        labelled = torch.from_numpy(info['gt_seg_map'] != 255)
        diff = (logits[0] - logits[1]).abs()[0][:, labelled].max()
        worst = max(worst, float(diff / logits[0].abs().max()))
    return worst


def _randomise(model):
    """As after some training: random weights in the context modules and
    conv3 (whose zero-initialised parts would hide the context at first)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ('spatial_bias', 'gather_excite',
                                       'patch_spatial', 'conv3')):
                p.normal_(0, 0.1)
    return model


def test_cue_is_outside_the_plain_receptive_field():
    model, cfg = _build('plain')
    data = cfg.val_dataloader.dataset
    size, distance = data.image_size, data.min_cue_distance
    # one output pixel sees a box smaller than the image ...
    rf = probe.receptive_field(model, size)
    assert not rf['whole_image'] and rf['size'] < size, rf
    # ... and the marker, wherever it is, reaches less far than any
    # labelled pixel
    reach = probe.cue_reach(model, size, data.marker_size)
    assert not reach['whole_image']
    assert reach['reach'] < distance, reach
    # so, for any weights, recolouring the marker changes nothing on the
    # labelled pixels of the plain model
    assert _marker_sensitivity(_randomise(model), size) < 1e-6


@pytest.mark.parametrize('name', ['SB', 'GE-θ⁺', 'PSI'])
def test_context_models_can_carry_the_cue(name):
    model, cfg = _build(name)
    data = cfg.val_dataloader.dataset
    reach = probe.cue_reach(model, data.image_size, data.marker_size)
    assert reach['whole_image'], reach
    assert _marker_sensitivity(_randomise(model), data.image_size) > 2e-5


def test_cutting_the_sb_branch_cuts_the_cue(monkeypatch):
    model, cfg = _build('SB')
    data = cfg.val_dataloader.dataset
    _randomise(model)
    assert _marker_sensitivity(model, data.image_size) > 2e-5

    def no_bias(self, x, size):
        return x.new_zeros(x.shape[0], self.num_bias, *size)

    monkeypatch.setattr(SpatialBias, 'spatial_bias', no_bias)
    reach = probe.cue_reach(model, data.image_size, data.marker_size)
    assert not reach['whole_image']
    assert reach['reach'] < data.min_cue_distance
    assert _marker_sensitivity(model, data.image_size) < 1e-6


def test_context_parameters_get_gradients_from_the_first_step():
    """The probe configs train with zero_init_residual=False: with mmdet's
    default (True) every bn3 starts at zero and no context parameter gets a
    gradient in the first step (measured: 0 of 10 SB, 0 of 21 GE, 0 of 18
    PSI tensors, and zero gradient for SB's conv3 bias columns)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')  # also when run on its own
    dataset = probe.ContextProbeDataset(
        num_samples=4, pipeline=[dict(type='mmseg.PackSegInputs')])
    data = pseudo_collate([dataset[i] for i in range(4)])
    for name in ('SB', 'GE-θ⁺', 'PSI'):
        for zero_init in (True, False):
            torch.manual_seed(0)
            cfg = probe.probe_config(name)
            assert cfg.model.backbone.zero_init_residual is False
            cfg.model.backbone.zero_init_residual = zero_init
            from mmengine.registry import MODELS
            model = MODELS.build(cfg.model)
            model.init_weights()
            model.train()
            batch = model.data_preprocessor(copy.deepcopy(data), True)
            losses = model(**batch, mode='loss')
            sum(v for k, v in losses.items() if 'loss' in k).backward()
            grads = [
                p.grad for n, p in model.named_parameters()
                if any(k in n for k in ('spatial_bias', 'gather_excite',
                                        'patch_spatial', 'conv3'))
            ]
            moving = sum(g is not None and bool(g.abs().sum() > 0)
                         for g in grads)
            if zero_init:
                assert moving == 0, name
            else:
                assert moving > 0, name


# ---------------------------------------------------------------------------
# training: context is learned, and only through the context modules
# ---------------------------------------------------------------------------
def _train(tmp_path, name, iters):
    rows, _ = probe.run_probe([name], iters=iters, work_dir=str(tmp_path),
                              cfg_options=dict(log_level='WARNING'),
                              with_rf=False)
    return rows[0]


@pytest.mark.parametrize('name', ['GE-θ⁺', 'PSI'])
def test_ge_and_psi_learn_the_far_cue(tmp_path, name):
    """300 iterations of the shipped schedule's kind (AdamW, warm-up, poly)
    through the Runner: measured 100.0 mIoU for both (plain: 15.8)."""
    row = _train(tmp_path, name, 300)
    assert row['mIoU'] >= 70, row
    assert row['accuracy'] >= 85, row


def test_sb_learns_the_far_cue_and_not_without_its_branch(tmp_path,
                                                          monkeypatch):
    """The configs' 600 iterations. SB tells the marker colours apart one
    at a time, and how long it stays with one colour of three told apart
    (~50 mIoU, 64-73% accuracy) depends on float rounding. Measured with
    validation every 100 iterations, seeds 0-4, each also with conv3's
    output scaled by 1 + 1e-7: 100.0 mIoU by iteration 300 for seeds 0, 1,
    3, 4, seed 2 at ~50 to the end, with one thread; seed 0 with two
    threads (this suite): 51.1. Both states need the far cue: the plain
    model scores 16-18 mIoU and 38% accuracy, the same model with its SB
    branch cut off (zero bias maps) stays at chance whatever the training.
    So the bar sits below the one-colour state (README, "Context probe")."""
    learned = _train(tmp_path / 'sb', 'SB', 600)
    assert learned['mIoU'] >= 40, learned
    assert learned['accuracy'] >= 55, learned

    def no_bias(self, x, size):
        return x.new_zeros(x.shape[0], self.num_bias, *size)

    monkeypatch.setattr(SpatialBias, 'spatial_bias', no_bias)
    cut = _train(tmp_path / 'cut', 'SB', 600)
    assert cut['accuracy'] < 45, cut
    assert learned['mIoU'] - cut['mIoU'] >= 20, (learned, cut)
