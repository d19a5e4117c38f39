"""What every mmctx ResNet shares: upstream mmdet ResNet plus argument checks,
reference feature sizes for size-bound plugins, and loading a stock ResNet
checkpoint so the network starts as the pretrained ResNet."""
import math
import os.path as osp

import torch
from mmdet.models.backbones.resnet import Bottleneck, ResNet
from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import load_state_dict
from torch.nn.modules.utils import _pair

from ..utils import check_positive_int, check_stage_flags
from .trainable_context import TrainableContextMixin

# Prefixes under which stock checkpoints keep the backbone: mmdet / mmseg /
# mmpretrain models save `backbone.*`; DDP-wrapped ones add `module.`.
_BACKBONE_PREFIXES = ('module.', 'backbone.')


@MODELS.register_module()
class ContextResNet(TrainableContextMixin, ResNet):
    """Base of the mmctx ResNets, and the plain ResNet of mmctx configs (so
    sibling configs change only ``type`` and their module's arguments):
    upstream :class:`mmdet.models.ResNet` (all
    its options: out_indices, frozen_stages, norm_eval, norm_cfg, style, deep
    stem, strides, dilations, plugins, ...) with

    - depths 14 and 26 (bottleneck, [1,1,1,1] and [2,2,2,2]) besides the
      standard ones, and a ValueError for others;
    - ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` reading a local
      ResNet checkpoint in mmdet, mmseg, mmpretrain or torchvision layout
      (``state_dict``/``backbone.``/``module.`` wrappers are recognised): every
      matching tensor is loaded, the rest are reported by name, and the new
      context parameters start so the network equals the plain ResNet where
      the design allows (see :meth:`init_weights`). A missing file is a
      FileNotFoundError at construction.
    """

    arch_settings = {
        **ResNet.arch_settings,
        14: (Bottleneck, (1, 1, 1, 1)),
        26: (Bottleneck, (2, 2, 2, 2)),
    }

    def __init__(self, depth, init_cfg=None, **kwargs):
        if depth not in self.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(self.arch_settings)}, got {depth!r}')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            checkpoint = init_cfg.get('checkpoint')
            if '://' in str(checkpoint):
                raise ValueError(
                    'init_cfg.checkpoint must be a local file path (no '
                    f'downloads at run time), got {checkpoint!r}')
            if not osp.isfile(str(checkpoint)):
                raise FileNotFoundError(
                    f'init_cfg.checkpoint: no such file: {checkpoint!r}')
        super().__init__(depth, init_cfg=init_cfg, **kwargs)

    @staticmethod
    def stage_feature_sizes(input_size, strides, stem_stride=4):
        """(H, W) of each stage's output for an input of ``input_size``.

        Every strided layer of the ResNet (stem conv, max pool, stride-2
        convs, ceil-mode average pools) maps a side s to ceil(s / 2).
        """
        height, width = _pair(input_size)
        check_positive_int('reference_input_size', height)
        check_positive_int('reference_input_size', width)
        sizes = []
        for stride in (stem_stride, *strides):
            for _ in range(int(math.log2(stride))):
                height, width = -(-height // 2), -(-width // 2)
            sizes.append((height, width))
        return sizes[1:]

    @staticmethod
    def per_stage_plugins(plugin_cfg, flags, feature_sizes, position):
        """One plugin entry per stage with ``flags[i]``, each told the
        reference feature size of its stage."""
        num_stages = len(flags)
        return [
            dict(cfg=dict(plugin_cfg, feature_size=feature_sizes[i]),
                 stages=tuple(j == i for j in range(num_stages)),
                 position=position) for i in range(num_stages) if flags[i]
        ]

    @classmethod
    def size_bound_plugins(cls, plugin_type, name, plugin_cfg, flags_name,
                           flags, reference_input_size, resnet_kwargs):
        """Checked ``after_conv3`` plugins of a module whose weights depend
        on the feature size (GE, PSI), one per stage in ``flags``."""
        check_plugin_cfg(name, plugin_cfg, ('feature_size', 'in_channels'))
        flags = check_stage_flags(flags_name, flags,
                                  resnet_kwargs.get('num_stages', 4))
        sizes = cls.stage_feature_sizes(
            reference_input_size, resnet_kwargs.get('strides', (1, 2, 2, 2)))
        return cls.per_stage_plugins(
            dict(type=plugin_type, **plugin_cfg), flags, sizes, 'after_conv3')

    def stage_of(self, planes):
        """Stage index of a res layer, from its width (planes = base * 2^i)."""
        return int(math.log2(planes // self.base_channels))

    def train(self, mode=True):
        # Upstream's override returns None, which breaks model.eval() chains.
        super().train(mode)
        return self

    def init_weights(self):
        """Initialise; with a Pretrained init_cfg, load a stock checkpoint.

        The new context parameters get their own initialisation first
        (close-to-identity: SB's extra conv3 inputs are zero, GE's and PSI's
        gates are the constant 0.5), then every checkpoint tensor that fits
        is loaded. A constant gate ``c`` after conv3 that the checkpoint does
        not provide is compensated by dividing norm3's affine parameters by
        ``c``, so the block computes exactly the pretrained block.
        """
        init_cfg = self.init_cfg
        if not (isinstance(init_cfg, dict)
                and init_cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        self.init_cfg = None
        super().init_weights()
        self.init_cfg = init_cfg
        state = read_backbone_state(init_cfg['checkpoint'])
        logger = MMLogger.get_current_instance()
        load_state_dict(self, state, strict=False, logger=logger)
        own = self.state_dict()
        new = [k for k in own if k not in state]
        ignored = [k for k in state if k not in own]
        logger.info(
            f'{type(self).__name__}: loaded {len(own) - len(new)} of '
            f'{len(own)} tensors from {init_cfg["checkpoint"]}; newly '
            f'initialised: {new}; ignored checkpoint entries: {ignored}')
        self._compensate_constant_gates(state)

    @torch.no_grad()
    def _compensate_constant_gates(self, loaded_state):
        for block_name, block in self.named_modules():
            if not isinstance(block, Bottleneck) or not block.with_plugins:
                continue
            gain = 1.0
            for name in block.after_conv3_plugin_names:
                plugin = getattr(block, name)
                prefix = f'{block_name}.{name}.'
                loaded = any(k.startswith(prefix) for k in loaded_state)
                gate = getattr(plugin, 'constant_gate', None)
                if gate is not None and not loaded:
                    gain *= gate
            if gain != 1.0:
                block.norm3.weight.div_(gain)
                block.norm3.bias.div_(gain)


def read_backbone_state(path):
    """The backbone's tensors from a local checkpoint file, in any stock
    layout: a bare state dict (torchvision), or one under ``state_dict`` /
    ``model``, possibly with ``backbone.`` and ``module.`` prefixes (mmdet,
    mmseg, mmpretrain, DDP)."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and key in checkpoint:
            checkpoint = checkpoint[key]
            break
    state = dict(checkpoint)
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {
                k[len(prefix):]: v
                for k, v in state.items() if k.startswith(prefix)
            }
    return state


def check_plugin_cfg(name, cfg, derived):
    """Reject keys of a per-stage plugin config that the backbone sets."""
    if not isinstance(cfg, dict):
        raise ValueError(f'{name} must be a dict, got {cfg!r}')
    clash = sorted(set(cfg) & set(derived))
    if clash:
        raise ValueError(f'{name} must not set {clash}: the backbone derives '
                         'them (set reference_input_size instead)')
