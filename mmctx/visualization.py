"""Context maps of the mmctx modules, for any model that contains them.

Forward hooks on every :class:`~mmctx.models.SpatialBias`,
:class:`~mmctx.models.GatherExcite` and
:class:`~mmctx.models.PatchSpatialInteraction` of a model capture, for one
image fed at its own size:

* **SB** -- the ``k`` spatial-bias maps the module joins to conv2's output
  (already upsampled to conv2's output size by the module), as in Fig. 4 of
  the SB paper;
* **GE** -- its gate ``g``, shown per pixel as the gain ``||g x||_2 /
  ||x||_2`` over the channels (``x`` the module's input): a global-extent
  gate is one value per channel, so this is where it acts in space, bright
  where the channels it opens carry the features (with local extents the
  windows show directly). Where the features vanish, the channel mean of
  the gate. In (0, 1) like the gate;
* **PSI** -- its patch weights (one sigmoid weight per patch, every pixel
  shows its patch's weight).

The gates are recomputed from the module's input with the module's own
layers and checked against its output.

Every map is resized to the image's own size (bilinear for SB, nearest for
the piecewise-constant gates) and saved as a colour-mapped PNG of that size;
gains use the fixed scale [0, 1], SB maps their own min..max.
"""
import copy
import os
import os.path as osp
import re
from collections import OrderedDict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .models import GatherExcite, PatchSpatialInteraction, SpatialBias

CONTEXT_KINDS = OrderedDict([(SpatialBias, 'SB'), (GatherExcite, 'GE'),
                             (PatchSpatialInteraction, 'PSI')])
KIND_DESCRIPTION = {
    'SB': 'spatial-bias map',
    'GE': 'gate gain',
    'PSI': 'patch weight',
}


class NoContextModulesError(ValueError):
    """The model holds none of the mmctx context modules."""


class ContextMap:
    """The maps of one context module for one image.

    Attributes:
        name (str): Module name in the model (``backbone.layer1.0...``).
        kind (str): ``'SB'``, ``'GE'`` or ``'PSI'``.
        stage (int | None): 1-based ResNet stage (``layerN``), if any.
        block (int | None): Block index in the stage, if any.
        maps (np.ndarray): (n, H, W) float32 at the image's size.
        value_range (tuple | None): Fixed colour scale, or None for the
            map's own min..max.
    """

    def __init__(self, name, kind, maps, value_range=None):
        self.name = name
        self.kind = kind
        self.stage, self.block = module_position(name)
        self.maps = maps
        self.value_range = value_range

    @property
    def stem(self):
        """File-name stem, e.g. ``sb_stage1_block0``."""
        if self.stage is None:
            where = re.sub(r'[^0-9A-Za-z]+', '_', self.name).strip('_')
        else:
            where = f'stage{self.stage}_block{self.block}'
        return f'{self.kind.lower()}_{where}'

    def __repr__(self):
        return (f'ContextMap({self.name!r}, {self.kind}, stage={self.stage}, '
                f'block={self.block}, maps={tuple(self.maps.shape)})')


def module_position(name):
    """(stage, block) of a module named ``...layer<stage>.<block>...``."""
    match = re.search(r'(?:^|\.)layer(\d+)\.(\d+)(?:\.|$)', name)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2))


def find_context_modules(model):
    """``[(name, module, kind)]`` of every SB / GE / PSI module in
    ``model``, in registration order."""
    found = []
    for name, module in model.named_modules():
        for cls, kind in CONTEXT_KINDS.items():
            if isinstance(module, cls):
                found.append((name, module, kind))
                break
    return found


def _ge_gate(module, x):
    """GatherExcite's gate for input ``x`` (B, C, h, w) or (B, C, 1, 1),
    computed with the module's own layers as in its forward."""
    context = module.context(x)
    if module.variant == 'depthwise_excite':
        context = module.excite(F.relu(context))
    if module.extent != 'global':
        context = F.interpolate(context, size=x.shape[-2:], mode='nearest')
    return context.sigmoid()


def _psi_gate(module, x):
    """PatchSpatialInteraction's patch weights, expanded to x's size."""
    return module.pixel_weights(x)


def _gain(x, gate):
    """Per-pixel gain of a gate over the channels: ``||g x|| / ||x||``
    (the feature-weighted RMS of the gate); where the features vanish, the
    plain channel mean of the gate. (B, 1, h, w) in (0, 1)."""
    gate = gate.expand_as(x).double()
    x = x.double()
    num = (gate * x).pow(2).sum(1, keepdim=True)
    den = x.pow(2).sum(1, keepdim=True)
    ratio = (num / den.clamp_min(1e-300)).sqrt()
    return torch.where(den > 1e-12, ratio, gate.mean(1, keepdim=True)).float()


def _checked_gate(kind, module, x, output):
    gate = _ge_gate(module, x) if kind == 'GE' else _psi_gate(module, x)
    expected = x * gate
    scale = output.abs().max().clamp_min(1e-6)
    if (expected - output).abs().max() > 1e-4 * scale:
        raise RuntimeError(
            f'{type(module).__name__}: the recomputed gate does not '
            'reproduce the module output (has its forward changed?)')
    return gate


class capture_context:
    """Context manager: forward hooks that record each context module's map
    as ``(name, kind, tensor (B, n, h, w))`` in ``self.records``."""

    def __init__(self, model):
        self.modules = find_context_modules(model)
        self.records = []
        self._handles = []

    def _hook(self, name, kind):

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs['x']
            if kind == 'SB':
                if module.fusion == 'concat':
                    maps = output[:, -module.num_bias:]
                else:
                    target = args[1] if len(args) > 1 else kwargs.get(
                        'target', x)
                    maps = module.spatial_bias(x, target.shape[-2:])
            elif kind == 'GE':
                maps = _gain(x, _checked_gate(kind, module, x, output))
            else:
                maps = _checked_gate(kind, module, x, output)[:, :1]
            self.records.append((name, kind, maps.detach().float()))

        return hook

    def __enter__(self):
        for name, module, kind in self.modules:
            self._handles.append(
                module.register_forward_hook(
                    self._hook(name, kind), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


def _channel_conversion(preprocessor):
    for attr in ('_channel_conversion', 'channel_conversion', 'to_rgb'):
        if hasattr(preprocessor, attr):
            return bool(getattr(preprocessor, attr))
    return False


def _size_divisor(preprocessor):
    for attr in ('pad_size_divisor', 'size_divisor'):
        value = getattr(preprocessor, attr, None)
        if value:
            return int(value)
    return 1


def preprocess_image(model, img):
    """A (1, 3, H', W') input tensor for ``model`` from a BGR uint8 image,
    normalised like the model's data preprocessor and padded (bottom /
    right) only to its size divisor; the image itself keeps its size."""
    preprocessor = getattr(model, 'data_preprocessor', None)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    x = x.float()[None]
    if preprocessor is not None:
        if _channel_conversion(preprocessor):
            x = x[:, [2, 1, 0]]
        if getattr(preprocessor, '_enable_normalize', False):
            x = (x - preprocessor.mean.view(1, -1, 1, 1).cpu()) / \
                preprocessor.std.view(1, -1, 1, 1).cpu()
        divisor = _size_divisor(preprocessor)
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % divisor, (-w) % divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def _features(model, inputs):
    if hasattr(model, 'extract_feat'):
        return model.extract_feat(inputs)
    if hasattr(model, 'backbone'):
        return model.backbone(inputs)
    return model(inputs)


@torch.no_grad()
def compute_context_maps(model, img):
    """Context maps of every SB / GE / PSI module of ``model`` for one BGR
    uint8 image (H, W, 3), each resized to (H, W).

    Raises:
        NoContextModulesError: if the model has no such module.
    """
    if not find_context_modules(model):
        raise NoContextModulesError(
            f'{type(model).__name__} contains no mmctx context module '
            '(SpatialBias, GatherExcite, PatchSpatialInteraction): there '
            'are no context maps to draw')
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f'img must be an (H, W, 3) uint8 BGR image, got '
                         f'{img.dtype} array of shape {img.shape}')
    model.eval()
    device = next(model.parameters()).device
    h, w = img.shape[:2]
    inputs = preprocess_image(model, img).to(device)
    padded = tuple(inputs.shape[-2:])
    with capture_context(model) as capture:
        _features(model, inputs)
    results = []
    for name, kind, maps in capture.records:
        mode = 'bilinear' if kind == 'SB' else 'nearest'
        kwargs = dict(align_corners=False) if mode == 'bilinear' else {}
        maps = F.interpolate(maps[:1], size=padded, mode=mode, **kwargs)
        maps = maps[0, :, :h, :w].cpu().numpy().astype(np.float32)
        results.append(
            ContextMap(name, kind, maps,
                       value_range=None if kind == 'SB' else (0.0, 1.0)))
    return results


def colorize(values, value_range=None, colormap=cv2.COLORMAP_VIRIDIS):
    """(H, W) float map -> (H, W, 3) uint8 BGR colour image."""
    values = np.asarray(values, np.float64)
    lo, hi = value_range if value_range is not None else (values.min(),
                                                          values.max())
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)
    scaled = np.clip(np.nan_to_num(scaled), 0, 1)
    return cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8),
                             colormap)


def save_context_maps(context_maps, img, out_dir, title=None):
    """Write every map as a PNG of the image's size
    (``<kind>_stage<s>_block<b>[_map<j>].png``), the raw values as
    ``context_maps.npz`` and an ``overview.png`` (the image and, per stage,
    the maps of its last block). Returns the written paths (overview
    first)."""
    os.makedirs(out_dir, exist_ok=True)
    paths, arrays = [], OrderedDict()
    for cmap in context_maps:
        for j, values in enumerate(cmap.maps):
            stem = cmap.stem + (f'_map{j}' if len(cmap.maps) > 1 else '')
            path = osp.join(out_dir, stem + '.png')
            cv2.imwrite(path, colorize(values, cmap.value_range))
            paths.append(path)
            arrays[stem] = values
    np.savez_compressed(osp.join(out_dir, 'context_maps.npz'), **arrays)
    overview = osp.join(out_dir, 'overview.png')
    draw_overview(context_maps, img, overview, title=title)
    return [overview] + paths


def last_block_per_stage(context_maps):
    """The maps of the last block of each (kind, stage), in stage order."""
    chosen = OrderedDict()
    for cmap in context_maps:
        key = (cmap.kind, cmap.stage if cmap.stage is not None else cmap.name)
        chosen[key] = cmap  # later blocks overwrite earlier ones
    return list(chosen.values())


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def draw_overview(context_maps, img, path, title=None):
    """One figure: the image, then one row per (kind, stage) with the maps
    of that stage's last block."""
    plt = _plt()
    rows = last_block_per_stage(context_maps)
    ncols = 1 + max(len(c.maps) for c in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(2.2 * ncols, 2.3 * len(rows)),
        squeeze=False)
    rgb = img[..., ::-1]
    for r, cmap in enumerate(rows):
        axes[r, 0].imshow(rgb)
        where = f'stage {cmap.stage}' if cmap.stage else cmap.name
        axes[r, 0].set_title(f'{cmap.kind}, {where}', fontsize=8)
        for j in range(1, ncols):
            ax = axes[r, j]
            if j - 1 < len(cmap.maps):
                values = cmap.maps[j - 1]
                vmin, vmax = cmap.value_range or (values.min(), values.max())
                im = ax.imshow(values, cmap='viridis', vmin=vmin, vmax=vmax)
                label = KIND_DESCRIPTION[cmap.kind]
                if len(cmap.maps) > 1:
                    label += f' {j - 1}'
                ax.set_title(label, fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.axis('off')
        axes[r, 0].axis('off')
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _strip_pretrained(cfg):
    """Drop every ``init_cfg`` of type Pretrained (the checkpoint replaces
    all weights anyway), so no backbone file is needed to build."""
    if isinstance(cfg, dict):
        init = cfg.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            cfg['init_cfg'] = None
        elif isinstance(init, (list, tuple)):
            cfg['init_cfg'] = [
                c for c in init
                if not (isinstance(c, dict) and c.get('type') == 'Pretrained')
            ] or None
        for value in cfg.values():
            _strip_pretrained(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _strip_pretrained(value)


def build_model_from_config(config, checkpoint=None, cfg_options=None,
                            device='cpu'):
    """Build ``config``'s model (any mmdet / mmseg / mmpretrain / mmctx
    config) in eval mode and load ``checkpoint`` into it. Pretrained
    ``init_cfg`` entries are dropped first: the checkpoint supplies the
    weights. SyncBN becomes BN (one process)."""
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import MODELS, DefaultScope, init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise ValueError(f'config {getattr(cfg, "filename", config)} has no '
                         '"model" entry')
    model_cfg = copy.deepcopy(cfg.model)  # a ConfigDict: mmdet wants one
    _strip_pretrained(model_cfg)
    scope = cfg.get('default_scope', None)
    if scope is not None and DefaultScope.get_current_instance() is None:
        init_default_scope(scope)
    if scope is not None:
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(model_cfg)
    else:
        model = MODELS.build(model_cfg)
    model = revert_sync_batchnorm(model)
    if not find_context_modules(model):
        raise NoContextModulesError(
            f'config {getattr(cfg, "filename", config)} builds a model '
            f'(backbone type {model_cfg.get("backbone", {}).get("type")!r}) '
            'without mmctx context modules (SpatialBias, GatherExcite, '
            'PatchSpatialInteraction): there are no context maps to draw')
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint: no such file: '
                                    f'{checkpoint!r}')
        load_checkpoint(model, checkpoint, map_location='cpu', strict=False)
    return model.to(device).eval()


def visualize_context(config, checkpoint, image, out_dir, cfg_options=None,
                      device='cpu'):
    """Write the context maps of ``config`` + ``checkpoint`` for ``image``
    (a path or a BGR uint8 array) into ``out_dir``; returns the paths."""
    import mmcv
    if isinstance(image, str):
        if not osp.isfile(image):
            raise FileNotFoundError(f'image: no such file: {image!r}')
        img = mmcv.imread(image, channel_order='bgr')
        name = osp.basename(image)
    else:
        img, name = np.asarray(image), 'image'
    model = build_model_from_config(config, checkpoint, cfg_options, device)
    maps = compute_context_maps(model, img)
    title = f'{osp.basename(str(getattr(config, "filename", config)))} — ' \
            f'{name} ({img.shape[1]}x{img.shape[0]})'
    return save_context_maps(maps, img, out_dir, title=title)


def draw_context_comparison(maps_by_model, img, path, title=None):
    """One row per model (e.g. SB, GE, PSI), one column per stage (its last
    block): the image, then the SB bias map with the most spatial variation
    / the GE gate gain / the PSI patch weights."""
    plt = _plt()
    rows = OrderedDict(
        (name, last_block_per_stage(maps))
        for name, maps in maps_by_model.items())
    ncols = 1 + max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols,
                             figsize=(2.3 * ncols, 2.2 * len(rows)),
                             squeeze=False)
    for r, (name, cmaps) in enumerate(rows.items()):
        axes[r, 0].imshow(img[..., ::-1])
        axes[r, 0].set_title(name, fontsize=9)
        for c in range(1, ncols):
            ax = axes[r, c]
            ax.axis('off')
            if c - 1 >= len(cmaps):
                continue
            cmap = cmaps[c - 1]
            j = int(np.argmax([m.std() for m in cmap.maps]))
            values = cmap.maps[j]
            vmin, vmax = cmap.value_range or (values.min(), values.max())
            im = ax.imshow(values, cmap='viridis', vmin=vmin, vmax=vmax)
            label = KIND_DESCRIPTION[cmap.kind]
            if len(cmap.maps) > 1:
                label += f' {j}'
            where = f'stage {cmap.stage}' if cmap.stage else cmap.name
            ax.set_title(f'{where}: {label}', fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        axes[r, 0].axis('off')
    fig.suptitle(title or 'Context maps per stage (last block of each stage)',
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
