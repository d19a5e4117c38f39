"""Long-range-context probe: a synthetic dense-prediction task that a plain
ResNet cannot solve and a ResNet with working context modules can.

The task (:func:`make_probe_sample`, a pure function of ``seed``, ``split``
and the sample index):

* a grey background (smooth gradient plus noise, no colour) with one to
  ``max_shapes`` light-grey shapes (ellipses, rectangles, triangles) as
  clutter, the same whatever the class;
* one small saturated **marker** square in a random corner whose colour
  (red, green or blue) is the image's class.

Every pixel at least ``min_cue_distance`` pixels (Chebyshev distance) away
from the marker is labelled with the marker's class (0..2); the pixels
nearer the marker, the marker's own included, are ignored (255). Nothing
within ``min_cue_distance`` of a labelled pixel tells its class: only the
far-away marker does. A backbone whose reach is smaller than
``min_cue_distance`` has to guess (chance: one in three); SB, GE and PSI see
the whole map and can carry the marker's colour to every pixel.

Why every far pixel, not only the shapes: in a first version only the shape
pixels took the marker's class (background 0). No model learned the class
there in 300-1500 iterations, and the cause was the task, not the modules:
even an *oracle* -- the true class added as a +3 (or +30) one-hot to the
backbone's outputs -- was not learned in 600 AdamW iterations (shape-pixel
class probabilities stayed at 0.21 / 0.21 / 0.21), because the class signal
sat on ~7% of the pixels and competed with foreground / background
segmentation. A probe that cannot tell a perfect context from none measures
nothing; with every far pixel labelled, the same oracle was learned within
33 iterations, and SB, GE-θ⁺ and PSI learn the cue (``tests/
test_context_probe.py`` trains them).

:func:`receptive_field` measures the exact theoretical receptive field of a
model (the input pixels an output pixel depends on), which is how the probe
checks that the cue really lies outside the plain model's reach;
:func:`run_probe` trains the probe configs (``configs/probe_*_r14.py``)
through mmengine's Runner with the same schedule and seed and returns one
row per model (params, train time, mIoU, accuracy).
"""
import copy
import math
import os
import os.path as osp
import time
from collections import OrderedDict

import cv2
import numpy as np
import torch
import torch.nn as nn
from mmengine.dataset import BaseDataset
from mmengine.hooks import Hook
from mmengine.registry import DATASETS

PROBE_CLASSES = ('red', 'green', 'blue')
# palette (RGB) used to draw labels: each class in its marker's colour
PROBE_PALETTE = [(230, 40, 40), (40, 200, 40), (40, 80, 230)]
# marker colours (BGR, like cv2 / mmcv images) of classes 0..2
MARKER_BGR = {0: (40, 40, 230), 1: (40, 200, 40), 2: (230, 80, 40)}
IGNORE_INDEX = 255
SPLITS = {'train': 0, 'val': 1}

# the four probe models: name -> config file in configs/
PROBE_MODELS = OrderedDict([
    ('plain', 'probe_plain_r14.py'),
    ('SB', 'probe_sb_r14.py'),
    ('GE-θ⁺', 'probe_ge_r14.py'),
    ('PSI', 'probe_psi_r14.py'),
])
CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                      'configs')


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')


def cue_distance_map(image_size, marker_box):
    """Chebyshev distance (pixels) of every pixel to the marker box
    ``(x0, y0, x1, y1)`` (exclusive ends); 0 inside the box."""
    h, w = image_size
    x0, y0, x1, y1 = marker_box
    xs = np.arange(w)
    ys = np.arange(h)
    dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)
    return np.maximum(dy[:, None], dx[None, :])


def _shape_mask(rng, h, w, cx, cy, r):
    mask = np.zeros((h, w), np.uint8)
    kind = int(rng.integers(0, 3))
    angle = float(rng.uniform(0, 180))
    if kind == 0:  # ellipse
        axes = (int(round(r)), int(round(r * rng.uniform(0.5, 1.0))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, angle, 0,
                    360, 1, -1)
    else:
        if kind == 1:  # rectangle
            a, b = r * 0.8, r * rng.uniform(0.4, 0.8)
            pts = np.array([(-a, -b), (a, -b), (a, b), (-a, b)])
        else:  # triangle
            t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
            t = t + rng.uniform(-0.3, 0.3, size=3)
            pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        th = np.deg2rad(angle)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        pts = pts @ rot.T + np.array([cx, cy])
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def make_probe_sample(seed=0,
                      index=0,
                      split='train',
                      image_size=128,
                      marker_size=12,
                      min_cue_distance=56,
                      max_shapes=4):
    """One sample of the probe task (a pure function of the arguments).

    Args:
        seed (int): Data set seed.
        index (int): Sample index.
        split (str): ``'train'`` or ``'val'`` (independent streams).
        image_size (int): Side of the square image.
        marker_size (int): Side of the marker square.
        min_cue_distance (int): Chebyshev distance (pixels) from the marker
            from which on pixels are labelled (nearer ones are ignored).
        max_shapes (int): Shapes per image (1..max_shapes).

    Returns:
        dict: ``img`` (H, W, 3) uint8 BGR, ``gt_seg_map`` (H, W) uint8 (the
        marker's class 0..2 on every pixel at least ``min_cue_distance``
        from the marker, 255 nearer), ``label`` (the class), ``marker_box``
        (x0, y0, x1, y1), ``shape_mask`` (H, W) bool (the clutter).
    """
    _check_int('seed', seed, 0)
    _check_int('index', index, 0)
    if split not in SPLITS:
        raise ValueError(f'split must be one of {tuple(SPLITS)}, got '
                         f'{split!r}')
    _check_int('image_size', image_size, 16)
    _check_int('marker_size', marker_size, 1)
    _check_int('min_cue_distance', min_cue_distance, 1)
    _check_int('max_shapes', max_shapes, 1)
    s = image_size
    if marker_size + min_cue_distance + 8 > s:
        raise ValueError(
            f'min_cue_distance={min_cue_distance} and marker_size='
            f'{marker_size} leave no room for shapes in a {s}x{s} image '
            '(need marker_size + min_cue_distance + 8 <= image_size)')
    rng = np.random.default_rng([seed, SPLITS[split], index])

    # grey background: gradient + per-pixel noise, no hue
    lo, hi = rng.uniform(30, 150, size=2)
    t = np.linspace(0, 1, s)
    ramp = lo + (hi - lo) * (t[None, :] if rng.random() < 0.5 else t[:, None])
    img = np.broadcast_to(ramp, (s, s))[..., None].repeat(3, axis=2)
    img = img + rng.normal(0, 6, size=(s, s, 3))

    label = int(rng.integers(0, len(PROBE_CLASSES)))
    corner = int(rng.integers(0, 4))
    x0 = 0 if corner in (0, 2) else s - marker_size
    y0 = 0 if corner in (0, 1) else s - marker_size
    box = (x0, y0, x0 + marker_size, y0 + marker_size)
    dist = cue_distance_map((s, s), box)
    allowed = dist >= min_cue_distance

    shape_mask = np.zeros((s, s), bool)
    num_shapes = int(rng.integers(1, max_shapes + 1))
    placed = 0
    for _ in range(100):
        if placed == num_shapes:
            break
        r = rng.uniform(10, 20)
        cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
        mask = _shape_mask(rng, s, s, cx, cy, r)
        if not mask.any() or (mask & ~allowed).any():
            continue
        shape_mask |= mask
        placed += 1
    if not placed:  # cannot happen with the checked geometry; be explicit
        raise RuntimeError(f'no shape could be placed (seed={seed}, '
                           f'index={index})')
    grey = rng.uniform(200, 225)
    img[shape_mask] = grey + rng.normal(0, 6, size=(shape_mask.sum(), 3))
    color = np.array(MARKER_BGR[label], float) + rng.uniform(-20, 20, 3)
    img[box[1]:box[3], box[0]:box[2]] = color
    gt = np.where(allowed, label, IGNORE_INDEX).astype(np.uint8)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return dict(img=img, gt_seg_map=gt, label=label, marker_box=box,
                shape_mask=shape_mask)


@DATASETS.register_module()
class ContextProbeDataset(BaseDataset):
    """The probe task as an in-memory mmengine data set: sample ``i`` is
    generated on the fly by :func:`make_probe_sample` (nothing on disk), in
    the format of mmseg's loading transforms (``img``, ``gt_seg_map``,
    ``seg_fields``, shapes), so the pipeline is just ``PackSegInputs``.

    Args:
        num_samples (int): Length of the data set.
        seed (int): Data set seed.
        split (str): ``'train'`` or ``'val'``.
        image_size, marker_size, min_cue_distance, max_shapes: see
            :func:`make_probe_sample`.
        **kwargs: :class:`mmengine.dataset.BaseDataset` arguments
            (``pipeline``, ``test_mode``, ...).
    """

    METAINFO = dict(classes=PROBE_CLASSES, palette=PROBE_PALETTE)

    def __init__(self,
                 num_samples=1000,
                 seed=0,
                 split='train',
                 image_size=128,
                 marker_size=12,
                 min_cue_distance=56,
                 max_shapes=4,
                 **kwargs):
        _check_int('num_samples', num_samples, 1)
        self.num_samples = num_samples
        self.sample_args = dict(
            seed=seed,
            split=split,
            image_size=image_size,
            marker_size=marker_size,
            min_cue_distance=min_cue_distance,
            max_shapes=max_shapes)
        make_probe_sample(index=0, **self.sample_args)  # checks the args
        kwargs.setdefault('serialize_data', False)
        super().__init__(**kwargs)

    def load_data_list(self):
        return [dict(sample_idx=i) for i in range(self.num_samples)]

    def get_data_info(self, idx):
        info = dict(super().get_data_info(idx))
        sample = make_probe_sample(index=info['sample_idx'],
                                   **self.sample_args)
        shape = sample['img'].shape[:2]
        info.update(
            img=sample['img'],
            gt_seg_map=sample['gt_seg_map'],
            seg_fields=['gt_seg_map'],
            img_path=f'probe_{self.sample_args["split"]}_'
            f'{info["sample_idx"]:06d}.png',
            seg_map_path=None,
            ori_shape=shape,
            img_shape=shape,
            pad_shape=shape,
            reduce_zero_label=False,
            label=sample['label'],
            marker_box=sample['marker_box'])
        return info


# ---------------------------------------------------------------------------
# receptive field
# ---------------------------------------------------------------------------
def _dependency_model(model):
    """A float64 copy of ``model`` in which every path that exists carries a
    strictly positive derivative: positive constant weights, identity norm
    layers, max pooling replaced by average pooling over the same window
    (a max depends on its whole window), so gradients cannot cancel or
    vanish and their support is exactly the dependency set."""
    model = copy.deepcopy(model).double().eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(
                    module, child_name,
                    nn.AvgPool2d(child.kernel_size, child.stride,
                                 child.padding, ceil_mode=child.ceil_mode))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                if module.running_mean is not None:
                    module.running_mean.zero_()
                    module.running_var.fill_(1)
                if module.affine:
                    module.weight.fill_(1)
                    module.bias.zero_()
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.fill_(1.0 / fan_in)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def receptive_field(model, image_size=128, pixel=None):
    """Exact theoretical receptive field of a segmentor's output pixel.

    The gradient of the output logits at ``pixel`` (default: the centre) is
    taken with respect to the input in a copy of the model where every
    dependency has a positive derivative (see :func:`_dependency_model`), so
    the non-zero gradient marks exactly the input pixels the output can
    depend on, whatever the weights.

    Args:
        model: An mmseg ``EncoderDecoder`` (anything with ``encode_decode``).
        image_size (int): Side of the square input.
        pixel (tuple[int], optional): (y, x) of the output pixel.

    Returns:
        dict: ``radius`` (largest Chebyshev distance from ``pixel`` to a
        pixel it depends on), ``size`` (side of the bounding box, clipped to
        the image), ``box`` (y0, x0, y1, x1 inclusive) and ``whole_image``.
    """
    _check_int('image_size', image_size, 1)
    s = image_size
    y, x = pixel if pixel is not None else (s // 2, s // 2)
    dep = _dependency_model(model)
    inputs = torch.ones(1, 3, s, s, dtype=torch.float64, requires_grad=True)
    meta = dict(img_shape=(s, s), pad_shape=(s, s), ori_shape=(s, s))
    logits = dep.encode_decode(inputs, [meta])
    logits[0, :, y, x].sum().backward()
    support = inputs.grad[0].abs().sum(0) > 0
    ys, xs = torch.nonzero(support, as_tuple=True)
    box = (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
    radius = max(y - box[0], box[2] - y, x - box[1], box[3] - x)
    return dict(
        radius=int(radius),
        size=max(box[2] - box[0], box[3] - box[1]) + 1,
        box=box,
        whole_image=bool(support.all()))


def marker_boxes(image_size, marker_size):
    """The four corner boxes (x0, y0, x1, y1) a marker can occupy."""
    s, m = image_size, marker_size
    return [(x, y, x + m, y + m) for y in (0, s - m) for x in (0, s - m)]


def cue_reach(model, image_size=128, marker_size=12):
    """How far the marker can reach into a segmentor's output.

    For each corner box the marker can occupy, the output pixels whose
    logits depend on any marker pixel are found exactly: a forward-mode
    derivative (Jacobian-vector product) of the positive-dependency copy of
    the model (:func:`_dependency_model`) along the marker's indicator is
    non-zero exactly there. Returns ``dict(reach=R, whole_image=bool)``, R
    the largest Chebyshev distance (pixels) from the marker box to such an
    output pixel over the four corners. A labelled pixel farther away than R
    cannot see the marker's colour.
    """
    _check_int('image_size', image_size, 1)
    _check_int('marker_size', marker_size, 1)
    s = image_size
    dep = _dependency_model(model)
    meta = [dict(img_shape=(s, s), pad_shape=(s, s), ori_shape=(s, s))]
    base = torch.ones(1, 3, s, s, dtype=torch.float64)
    reach, whole = 0, True
    for box in marker_boxes(s, marker_size):
        direction = torch.zeros_like(base)
        direction[..., box[1]:box[3], box[0]:box[2]] = 1
        _, jvp = torch.autograd.functional.jvp(
            lambda x: dep.encode_decode(x, meta), base, direction)
        influenced = (jvp[0].abs().sum(0) > 0).numpy()
        distance = cue_distance_map((s, s), box)
        reach = max(reach, int(distance[influenced].max()))
        whole = whole and bool(influenced.all())
    return dict(reach=reach, whole_image=whole)


# ---------------------------------------------------------------------------
# running the probe
# ---------------------------------------------------------------------------
class _TrainTimer(Hook):
    """Wall time of the training iterations alone (no build, no eval), and
    the metrics of the last validation."""
    priority = 'VERY_HIGH'

    def __init__(self):
        self.start = self.end = None
        self.metrics = {}

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.start is None:
            self.start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.end = time.perf_counter()

    @property
    def seconds(self):
        return None if self.start is None else self.end - self.start


def probe_config(name, iters=None, work_dir=None, seed=None, cfg_options=None,
                 config_dir=None):
    """The mmengine Config of probe model ``name`` (a key of
    :data:`PROBE_MODELS` or a config path), with the schedule shortened to
    ``iters`` iterations if given."""
    from mmengine.config import Config
    if name in PROBE_MODELS:
        path = osp.join(config_dir or CONFIG_DIR, PROBE_MODELS[name])
    else:
        path = name
    if not osp.isfile(path):
        raise FileNotFoundError(f'probe config for model {name!r} not found: '
                                f'{path}')
    cfg = Config.fromfile(path)
    if iters is not None:
        _check_int('iters', iters, 1)
        config_iters = cfg.train_cfg.max_iters
        cfg.train_cfg.max_iters = iters
        cfg.train_cfg.val_interval = iters
        cfg.default_hooks.checkpoint.interval = iters
        for sched in cfg.param_scheduler:
            # A schedule that ran to the config's end runs to the new end
            # (longer or shorter); a warm-up keeps its length.
            if sched.get('end', 0) > iters or \
                    sched.get('end') == config_iters:
                sched.end = iters
            if sched.get('begin', 0) >= iters:
                raise ValueError(f'iters={iters} is shorter than the warm-up '
                                 f'of the schedule ({sched})')
    if seed is not None:
        cfg.randomness = dict(seed=seed)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    return cfg


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def train_probe_model(cfg, name='model'):
    """Train and evaluate one probe config with mmengine's Runner (like
    ``tools/train.py``); returns (row dict, runner)."""
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    cfg.experiment_name = (f'probe_{name}_{time.strftime("%Y%m%d_%H%M%S")}_'
                           f'{os.getpid()}_{time.perf_counter_ns()}')
    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    timer = _TrainTimer()
    runner.register_hook(timer)
    runner.train()
    total = time.perf_counter() - t0
    metrics = timer.metrics
    row = OrderedDict(
        model=name,
        backbone=cfg.model.backbone.type,
        params=count_params(runner.model),
        train_s=timer.seconds,
        total_s=total,
        mIoU=float(metrics.get('mIoU', math.nan)),
        accuracy=float(metrics.get('aAcc', math.nan)),
        iters=cfg.train_cfg.max_iters)
    return row, runner


def run_probe(models=tuple(PROBE_MODELS), iters=None, work_dir=None,
              seed=0, cfg_options=None, config_dir=None, with_rf=True,
              keep_runners=False):
    """Train the probe models one after the other with the same schedule
    and seed; returns ``(rows, runners)`` (``runners`` only with
    ``keep_runners``, else an empty dict)."""
    rows, runners = [], {}
    for name in map(model_key, models):
        cfg = probe_config(
            name,
            iters=iters,
            seed=seed,
            cfg_options=cfg_options,
            config_dir=config_dir,
            work_dir=osp.join(work_dir, _slug(name)) if work_dir else None)
        if cfg.get('work_dir') is None:
            cfg.work_dir = osp.join('work_dirs', 'context_probe', _slug(name))
        row, runner = train_probe_model(cfg, name)
        if with_rf:
            ds = cfg.val_dataloader.dataset
            reach = cue_reach(_unwrap(runner.model), ds.image_size,
                              ds.marker_size)
            row['reach'] = reach['reach']
            row['cue_distance'] = ds.min_cue_distance
            row['rf'] = 'whole image' if reach['whole_image'] else (
                f'{reach["reach"]} px (labels >= {ds.min_cue_distance} px)')
        rows.append(row)
        if keep_runners:
            runners[name] = runner
    return rows, runners


def _unwrap(model):
    return getattr(model, 'module', model)


def _slug(name):
    return {'GE-θ⁺': 'ge', 'SB': 'sb', 'PSI': 'psi', 'plain': 'plain'}.get(
        name, ''.join(c if c.isalnum() else '_' for c in name).lower())


def format_table(rows, chance=100.0 / len(PROBE_CLASSES)):
    """A Markdown table of probe rows (plus the margin over the plain model
    where a row named 'plain' exists)."""
    plain = next((r for r in rows if r['model'] == 'plain'), None)
    head = ['model', 'backbone', 'params', 'train time', 'mIoU',
            f'accuracy (chance {chance:.1f})']
    if plain is not None:
        head.append('Δ mIoU vs plain')
    if any('rf' in r for r in rows):
        head.append('marker reaches')
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '|'.join('---' for _ in head) + '|']
    for r in rows:
        cells = [r['model'], r['backbone'], f'{r["params"]:,}',
                 f'{r["train_s"]:.0f} s' if r['train_s'] else '—',
                 f'{r["mIoU"]:.1f}', f'{r["accuracy"]:.1f}']
        if plain is not None:
            cells.append('—' if r is plain else
                         f'{r["mIoU"] - plain["mIoU"]:+.1f}')
        if head[-1] == 'marker reaches':
            cells.append(r.get('rf', '—'))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def model_key(name):
    """The :data:`PROBE_MODELS` key for ``name`` (case-insensitive; 'GE'
    names GE-θ⁺); config paths pass through."""
    if name in PROBE_MODELS or osp.isfile(name):
        return name
    aliases = {'plain': 'plain', 'sb': 'SB', 'ge': 'GE-θ⁺', 'ge-θ⁺': 'GE-θ⁺',
               'psi': 'PSI'}
    key = aliases.get(name.lower())
    if key is None:
        raise ValueError(f'models: unknown probe model {name!r}; choose from '
                         f'{list(PROBE_MODELS)} or give a config path')
    return key


def verdicts(rows, margin=25.0):
    """One line per context model: does it beat the plain model by at least
    ``margin`` mIoU points?"""
    plain = next((r for r in rows if r['model'] == 'plain'), None)
    if plain is None:
        return ['(no plain model in the run: no margins)']
    lines = []
    for r in rows:
        if r is plain:
            continue
        gain = r['mIoU'] - plain['mIoU']
        ok = 'PASS' if gain >= margin else 'FAIL'
        lines.append(f'{ok}: {r["model"]} beats plain by {gain:+.1f} mIoU '
                     f'points (accuracy {r["accuracy"]:.1f} vs '
                     f'{plain["accuracy"]:.1f}; needed +{margin:g} mIoU)')
    return lines


def label_to_rgb(label):
    """(H, W) label map -> (H, W, 3) uint8 RGB (ignored pixels grey)."""
    palette = np.array(PROBE_PALETTE + [(128, 128, 128)], np.uint8)
    index = np.where(label == IGNORE_INDEX, len(PROBE_PALETTE), label)
    return palette[np.clip(index, 0, len(PROBE_PALETTE))]


@torch.no_grad()
def predict(model, dataset, indices):
    """Predicted label maps (list of (H, W) arrays) of ``model`` for the
    samples ``indices`` of ``dataset``, through the model's test_step."""
    from mmengine.dataset import pseudo_collate
    model.eval()
    data = pseudo_collate([dataset[i] for i in indices])
    outputs = model.test_step(data)
    return [o.pred_sem_seg.data[0].cpu().numpy() for o in outputs]


def pixel_accuracy(pred, gt):
    labelled = gt != IGNORE_INDEX
    return 100.0 * float((pred[labelled] == gt[labelled]).mean()) \
        if labelled.any() else math.nan


def draw_probe_predictions(models, dataset, indices, path):
    """A grid: one row per validation sample (image, ground truth, the
    prediction of every model with its accuracy on that image's labelled
    pixels)."""
    from .visualization import _plt
    plt = _plt()
    preds = {name: predict(model, dataset, indices)
             for name, model in models.items()}
    ncols = 2 + len(models)
    fig, axes = plt.subplots(len(indices), ncols,
                             figsize=(1.9 * ncols, 2.0 * len(indices)),
                             squeeze=False)
    for r, idx in enumerate(indices):
        info = dataset.get_data_info(idx)
        gt = info['gt_seg_map']
        panels = [(info['img'][..., ::-1], 'image' if r == 0 else None),
                  (label_to_rgb(gt),
                   f'truth: {PROBE_CLASSES[info["label"]]}')]
        for name in models:
            pred = preds[name][r]
            panels.append((label_to_rgb(pred),
                           f'{name} ({pixel_accuracy(pred, gt):.0f}%)'))
        for c, (picture, title) in enumerate(panels):
            axes[r, c].imshow(picture)
            if title:
                axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis('off')
    fig.suptitle('Context probe, validation images: every pixel far from the '
                 'corner marker takes its colour\n(grey in the truth: too '
                 'near the marker, not scored; model: pixel accuracy)',
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _last_checkpoint(work_dir):
    marker = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(marker):
        with open(marker) as f:
            path = f.read().strip()
        if osp.isfile(path):
            return path
    candidates = sorted(
        (p for p in os.listdir(work_dir) if p.endswith('.pth')),
        key=lambda p: osp.getmtime(osp.join(work_dir, p)))
    if not candidates:
        raise FileNotFoundError(f'no checkpoint in {work_dir}')
    return osp.join(work_dir, candidates[-1])


def draw_demo_pictures(runners, out_dir, num_images=4, image_index=0):
    """The demo's pictures from trained probe runs: ``predictions.png``
    (validation predictions of every model), and for every context model
    the context maps of validation image ``image_index``, computed from the
    checkpoint the run wrote (as ``tools/analysis/visualize_context.py``
    does), plus ``context_maps.png`` comparing SB, GE and PSI per stage.
    Returns the paths."""
    from .visualization import (build_model_from_config,
                                compute_context_maps, draw_context_comparison,
                                save_context_maps)
    os.makedirs(out_dir, exist_ok=True)
    first = next(iter(runners.values()))
    dataset = first.val_dataloader.dataset
    models = {name: _unwrap(r.model) for name, r in runners.items()}
    paths = [
        draw_probe_predictions(
            models, dataset, list(range(min(num_images, len(dataset)))),
            osp.join(out_dir, 'predictions.png'))
    ]
    info = dataset.get_data_info(image_index)
    img = info['img']
    image_path = osp.join(out_dir, f'probe_val_{image_index:06d}.png')
    cv2.imwrite(image_path, img)
    paths.append(image_path)
    maps_by_model = OrderedDict()
    for name, runner in runners.items():
        if name == 'plain':
            continue
        model = build_model_from_config(
            copy.deepcopy(runner.cfg), _last_checkpoint(runner.work_dir))
        maps = compute_context_maps(model, img)
        maps_by_model[name] = maps
        paths += save_context_maps(
            maps, img, osp.join(out_dir, 'context_maps', _slug(name)),
            title=f'{name}: validation image {image_index} '
            f'(class {PROBE_CLASSES[info["label"]]})')
    if maps_by_model:
        paths.insert(1, draw_context_comparison(
            maps_by_model, img, osp.join(out_dir, 'context_maps.png')))
    return paths
