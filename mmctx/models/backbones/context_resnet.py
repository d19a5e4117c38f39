"""What every mmctx ResNet shares: upstream mmdet ResNet plus argument checks,
reference feature sizes for size-bound plugins, and loading a stock ResNet
checkpoint so the network starts as the pretrained ResNet."""
import inspect
import math
import re

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks.plugin import infer_abbr
from mmdet.models.backbones.resnet import Bottleneck, ResNet
from mmdet.models.backbones.resnext import Bottleneck as XBottleneck
from mmdet.models.backbones.resnext import ResNeXt
from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader, load_state_dict

from ...compat.checkpoint import CheckpointError
from ..utils import (check_bool, check_cfg_keys, check_choice,
                     check_init_cfg, check_int, check_layer_cfg,
                     check_positive_int, check_size, check_stage_flags)
from .trainable_context import TrainableContextMixin

# Prefixes under which stock checkpoints keep the backbone: mmdet / mmseg /
# mmpretrain models save `backbone.*`; DDP-wrapped ones add `module.`.
_BACKBONE_PREFIXES = ('module.', 'backbone.')


class ContextBottleneck(Bottleneck):
    """Upstream Bottleneck (same layers, plugins, ``with_cp``) whose residual
    add makes a new tensor instead of writing over the branch's output, so
    that full backward hooks work on every layer (with ``out += identity``
    torch refuses them on bn3 and on the last after_conv3 plugin).
    :meth:`forward_conv2` is where SB-ResNet joins its bias maps."""

    def forward_conv2(self, x):
        return self.conv2(x)

    def forward(self, x):

        def _inner_forward(x):
            out = self.relu(self.norm1(self.conv1(x)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.forward_conv2(out)))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.norm3(self.conv3(out))
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv3_plugin_names)
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)


class ContextXBottleneck(ContextBottleneck, XBottleneck):
    """Upstream ResNeXt Bottleneck (conv2 grouped, ``groups`` x a width set
    by ``base_width``) with :class:`ContextBottleneck`'s forward."""


def bottleneck_width(planes, groups=1, base_width=4, base_channels=64):
    """Channels of conv1's output / conv2 in a block of ``planes``: planes
    in a ResNet, as upstream's ResNeXt Bottleneck computes them in a
    ResNeXt."""
    if groups == 1:
        return planes
    return math.floor(planes * (base_width / base_channels)) * groups


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
      FileNotFoundError at construction;
    - ``frozen_stages`` / ``norm_eval`` that freeze the pretrained tensors
      only: the context modules keep training and their norms learn their
      statistics (see :class:`TrainableContextMixin`).
    """

    # The block class of the Bottleneck depths (a subclass of upstream's).
    bottleneck = ContextBottleneck
    # Arguments a variant fixes, as upstream's ResNetV1c / ResNetV1d do.
    fixed_args = {}

    arch_settings = {
        **ResNet.arch_settings,
        14: (Bottleneck, (1, 1, 1, 1)),
        26: (Bottleneck, (2, 2, 2, 2)),
    }

    def __init__(self,
                 depth,
                 init_cfg=None,
                 pretrained=None,
                 contract_dilation=False,
                 multi_grid=None,
                 **kwargs):
        self.check_depth(depth)
        for key, value in self.fixed_args.items():
            if kwargs.get(key, value) != value:
                raise ValueError(
                    f'{key} must be {value} in {type(self).__name__} (it is '
                    f'what the variant sets, as upstream), got '
                    f'{kwargs[key]!r}; for another {key} use the class '
                    'without the V1c / V1d suffix')
            kwargs[key] = value
        # mmseg's ResNet options (its dilated ResNetV1c configs), which
        # mmdet's ResNet lacks: the res layers then come from mmseg
        self.contract_dilation = check_bool('contract_dilation',
                                            contract_dilation)
        if multi_grid is not None:
            num_stages = kwargs.get('num_stages', 4)
            blocks = self.arch_settings[depth][1][num_stages - 1] \
                if isinstance(num_stages, int) and 1 <= num_stages <= 4 \
                else None
            if not isinstance(multi_grid, (tuple, list)) or \
                    len(multi_grid) != blocks or not all(
                        isinstance(v, int) and not isinstance(v, bool)
                        and v >= 1 for v in multi_grid):
                raise ValueError(
                    f'multi_grid must be None or a tuple of {blocks} positive '
                    f'ints (one dilation per block of the last stage), got '
                    f'{multi_grid!r}')
            multi_grid = tuple(multi_grid)
        self.multi_grid = multi_grid
        if pretrained is not None:
            # upstream's deprecated spelling of a Pretrained init_cfg
            if not isinstance(pretrained, str) or init_cfg is not None:
                raise ValueError(
                    'pretrained must be a checkpoint path or URL (str) and '
                    'cannot be combined with init_cfg; prefer '
                    "init_cfg=dict(type='Pretrained', checkpoint=...), got "
                    f'pretrained={pretrained!r}, init_cfg={init_cfg!r}')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        check_init_cfg('init_cfg', init_cfg)
        check_resnet_args(self, depth, kwargs)
        # The checkpoint (a path, URL, torchvision:// or open-mmlab:// name)
        # is read by init_weights(), when training starts, never here: a
        # trained model is built, tested and served without it.
        super().__init__(depth=depth, init_cfg=init_cfg, **kwargs)

    def check_depth(self, depth, bottleneck=False, why=''):
        """Raise ValueError naming ``depth`` and the accepted depths unless
        ``depth`` is one of them (only bottleneck depths if ``bottleneck``:
        plugins and context modules need Bottleneck blocks)."""
        depths = sorted(d for d, (block, _) in self.arch_settings.items()
                        if issubclass(block, Bottleneck) or not bottleneck)
        if isinstance(depth, bool) or not isinstance(depth, int) \
                or depth not in depths:
            raise ValueError(f'depth must be one of {depths}{why}, '
                             f'got {depth!r}')

    @staticmethod
    def stage_feature_sizes(input_size, strides, stem_stride=4):
        """(H, W) of each stage's output for an input of ``input_size``.

        Every strided layer of the ResNet (stem conv, max pool, stride-2
        convs, ceil-mode average pools) maps a side s to ceil(s / 2).
        """
        height, width = check_size('reference_input_size', input_size)
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

    def size_bound_plugins(self, plugin_type, name, plugin_cfg, flags_name,
                           flags, reference_input_size, depth, resnet_kwargs):
        """Checked ``after_conv3`` plugins of a module whose weights depend
        on the feature size (GE, PSI), one per stage in ``flags``.

        ``plugin_cfg`` is checked for unknown and derived keys and its values
        by building the module once (for the first stage that has it), so a
        bad value fails here, by name, even if no stage uses the module.
        """
        module = MODELS.get(plugin_type)
        self.check_depth(depth, bottleneck=True,
                         why=f' ({plugin_type} needs bottleneck blocks)')
        check_plugin_cfg(name, plugin_cfg, ('feature_size', 'in_channels'),
                         module)
        num_stages = resnet_kwargs.get('num_stages', 4)
        check_int('num_stages', num_stages, 1, 4)
        flags = check_stage_flags(flags_name, flags, num_stages,
                                  default=lambda n: (True, ) * n)
        strides = resnet_kwargs.get('strides', (1, 2, 2, 2))
        check_int_tuple('strides', strides, num_stages)
        sizes = self.stage_feature_sizes(reference_input_size, strides)
        first = flags.index(True) if any(flags) else 0
        base = resnet_kwargs.get('base_channels', 64)
        check_positive_int('base_channels', base)
        try:  # (conv3's output: the same in a ResNeXt)
            module(in_channels=base * 2**first * Bottleneck.expansion,
                   feature_size=sizes[first], **plugin_cfg)
        except ValueError as error:
            raise ValueError(f'{name}: {error}') from None
        self.own_plugin_labels = [
            f'{name} (stage {i + 1})' for i in range(num_stages) if flags[i]
        ]
        return self.per_stage_plugins(
            dict(type=plugin_type, **plugin_cfg), flags, sizes, 'after_conv3')

    def reserved_block_names(self, stage):
        """Attribute names the backbone's own modules take in the blocks of
        ``stage`` (0-based), which a plugin must not take."""
        return ()

    def stage_of(self, planes):
        """Stage index of a res layer, from its width (planes = base * 2^i)."""
        return int(math.log2(planes // self.base_channels))

    def block_args(self):
        """Arguments the family's blocks take besides upstream ResNet's
        (ResNeXt: groups and base width)."""
        return {}

    def make_res_layer(self, **kwargs):
        if issubclass(self.bottleneck, kwargs['block']):
            # upstream's Bottleneck: our subclass of it
            kwargs['block'] = self.bottleneck
        last = self.stage_of(kwargs['planes']) == self.num_stages - 1
        multi_grid = self.multi_grid if last else None
        if self.contract_dilation or multi_grid is not None:
            # as mmseg's ResNet (multi_grid: its last stage only)
            from mmseg.models.utils import ResLayer as SegResLayer
            return SegResLayer(contract_dilation=self.contract_dilation,
                               multi_grid=multi_grid, **kwargs,
                               **self.block_args())
        return super().make_res_layer(**kwargs)

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
        cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
        pretrained = [c for c in cfgs
                      if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if not pretrained:
            super().init_weights()
            return
        if len(pretrained) > 1:
            raise ValueError('init_cfg: at most one Pretrained entry, got '
                             f'{init_cfg!r}')
        checkpoint = pretrained[0].get('checkpoint')
        rest = [c for c in cfgs if c is not pretrained[0]]
        self.init_cfg = rest or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = init_cfg
        try:
            state = read_backbone_state(checkpoint)
        except (CheckpointError, OSError) as err:
            raise CheckpointError(
                f'{type(self).__name__}: cannot initialise from '
                f'init_cfg.checkpoint={checkpoint!r} ({err}). Change '
                'model.backbone.init_cfg.checkpoint (e.g. --cfg-options '
                'model.backbone.init_cfg.checkpoint=/path/to/resnet50.pth), '
                'or set model.backbone.init_cfg=None to train from scratch.'
            ) from err
        logger = MMLogger.get_current_instance()
        own = self.state_dict().keys()  # (loading changes no key)
        state = mmdet_layout(state, own)
        load_state_dict(self, state, strict=False, logger=logger)
        new = [k for k in own if k not in state]
        ignored = [k for k in state if k not in own]
        logger.info(
            f'{type(self).__name__}: loaded {len(own) - len(new)} of '
            f'{len(own)} tensors from {checkpoint}; newly '
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


@MODELS.register_module()
class ContextResNetV1c(ContextResNet):
    """ContextResNet with mmseg's / mmpretrain's ``ResNetV1c`` settings: the
    deep stem (three 3x3 convs), ``avg_down=False``."""
    fixed_args = dict(deep_stem=True, avg_down=False)


@MODELS.register_module()
class ContextResNetV1d(ContextResNet):
    """ContextResNet with mmdet's / mmpretrain's ``ResNetV1d`` settings
    (ResNet-D, Bag of Tricks): the deep stem and ``avg_down=True`` (the
    shortcut's stride by an average pool before its 1x1 conv)."""
    fixed_args = dict(deep_stem=True, avg_down=True)


@MODELS.register_module()
class ContextResNeXt(ContextResNet, ResNeXt):
    """Upstream :class:`mmdet.models.ResNeXt` (``groups``, ``base_width``: 32
    and 4 for X-101-32x4d) with what :class:`ContextResNet` adds."""
    arch_settings = ResNeXt.arch_settings
    bottleneck = ContextXBottleneck

    def block_args(self):
        return dict(groups=self.groups, base_width=self.base_width,
                    base_channels=self.base_channels)


def read_backbone_state(path):
    """The backbone's tensors from a checkpoint (local path, ``~`` allowed;
    http(s) URL, ``torchvision://`` or ``open-mmlab://`` name, read through
    mmengine's loaders, which mmctx secures), in any stock layout: a bare
    state dict (torchvision), or one under ``state_dict`` / ``model``,
    possibly with ``backbone.`` and ``module.`` prefixes (mmdet, mmseg,
    mmpretrain, DDP)."""
    if not isinstance(path, str) or not path:
        raise ValueError('init_cfg.checkpoint must be a path or URL (str), '
                         f'got {path!r}')
    checkpoint = CheckpointLoader.load_checkpoint(
        path, map_location='cpu', logger='current')
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


def mmdet_layout(state, own):
    """``state`` with mmpretrain's ResNetV1c / V1d keys renamed to mmdet's
    and mmseg's, which ``own`` (the backbone's state-dict keys) has.

    mmpretrain builds the deep stem of ConvModules (``stem.0.conv.weight``,
    ``stem.0.bn.*``; mmdet: ``stem.0.weight``, ``stem.1.*``, ReLUs between),
    and with ``avg_down`` gives a stride-1 shortcut no average pool
    (``downsample.0`` conv, ``.1`` norm; mmdet: ``.1``, ``.2`` after an
    identity pool). Other layouts pass unchanged.
    """
    renamed = {}
    for key, value in state.items():
        stem = re.fullmatch(r'stem\.(\d+)\.(conv|bn)\.(.+)', key)
        if stem and key not in own:
            index = 3 * int(stem[1]) + (stem[2] == 'bn')
            key = f'stem.{index}.{stem[3]}'
        renamed[key] = value
    for conv in [k for k in renamed if k.endswith('.downsample.0.weight')]:
        layer = conv[:-len('0.weight')]  # e.g. 'layer1.0.downsample.'
        if conv in own or f'{layer}2.weight' not in own:
            continue
        old = {k: renamed.pop(k) for k in list(renamed) if k.startswith(layer)}
        for key, value in old.items():
            index, rest = key[len(layer):].split('.', 1)
            renamed[f'{layer}{int(index) + 1}.{rest}'] = value
    return renamed


def check_plugin_cfg(name, cfg, derived, module):
    """Reject a per-stage module config (``sb``, ``ge``, ``psi``) that is no
    dict, sets keys the backbone derives or keys ``module`` does not take."""
    accepted = [
        arg for arg in inspect.signature(module.__init__).parameters
        if arg not in ('self', 'args', 'kwargs') and arg not in derived
    ]
    if isinstance(cfg, dict) and 'feature_size' in cfg \
            and 'feature_size' in derived:
        raise ValueError(f'{name} must not set feature_size: the backbone '
                         'derives it per stage (set reference_input_size '
                         'instead)')
    check_cfg_keys(name, cfg, accepted, derived)


def check_int_tuple(name, value, length):
    """Raise ValueError unless ``value`` is a tuple / list of ``length``
    positive ints."""
    if not isinstance(value, (tuple, list)) or len(value) != length or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for v in value):
        raise ValueError(f'{name} must be a tuple of {length} positive ints '
                         f'(one per stage), got {value!r}')


PLUGIN_POSITIONS = ('after_conv1', 'after_conv2', 'after_conv3')


def _plugin_class(type_):
    if inspect.isclass(type_):
        return type_
    # As mmcv's build_plugin_layer looks it up.
    with MODELS.switch_scope_and_registry(None) as registry:
        return registry.get(type_)


def check_plugins(plugins, num_stages, reserved=lambda stage: (),
                  own_labels=()):
    """Check upstream ResNet's ``plugins`` (None or a list of dicts with
    ``cfg``, ``position`` and optional ``stages``), and that no two plugins
    of a stage get the same attribute name (upstream: a bare assertion).
    The first entries may be the backbone's own, named by ``own_labels``."""
    if plugins is None:
        return
    if not isinstance(plugins, (list, tuple)):
        raise ValueError(f'plugins must be None or a list of dicts, got '
                         f'{plugins!r}')
    labels = list(own_labels) + [
        f'plugins[{i}]' for i in range(len(plugins) - len(own_labels))
    ]
    names = [dict() for _ in range(num_stages)]
    for where, plugin in zip(labels, plugins):
        check_cfg_keys(where, plugin, ('cfg', 'position', 'stages'))
        for key in ('cfg', 'position'):
            if key not in plugin:
                raise ValueError(f'{where} needs a {key!r} key')
        check_layer_cfg(f'{where}.cfg', plugin['cfg'])
        check_choice(f'{where}.position', plugin['position'],
                     PLUGIN_POSITIONS)
        stages = plugin.get('stages')
        if stages is not None:
            stages = check_stage_flags(f'{where}.stages', stages, num_stages)
        cls = _plugin_class(plugin['cfg']['type'])
        if cls is None:
            raise ValueError(
                f'{where}.cfg.type {plugin["cfg"]["type"]!r} is not a '
                'registered module (missing custom_imports?)')
        name = infer_abbr(cls) + str(plugin['cfg'].get('postfix', ''))
        for stage in range(num_stages):
            if stages is not None and not stages[stage]:
                continue
            other = names[stage].get(name)
            if other is not None or name in reserved(stage):
                clash = f'{other}' if other is not None else \
                    'the block\'s own module'
                raise ValueError(
                    f'{where}: a second module named {name!r} in stage '
                    f'{stage + 1} (first: {clash}); give one of them a '
                    "distinct cfg postfix, e.g. postfix='_2'")
            names[stage][name] = where


def check_resnet_args(backbone, depth, kwargs):
    """Check upstream ResNet's arguments by name (upstream asserts, or
    accepts and ignores, most of them)."""
    # upstream's arguments: ResNet's, and ResNeXt's in a ResNeXt
    params = {
        name: param
        for cls in reversed(type(backbone).__mro__)
        if cls in (ResNet, ResNeXt)
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name not in ('self', 'kwargs')
    }
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = {
            arg
            for cls in type(backbone).__mro__ if '__init__' in vars(cls)
            and issubclass(cls, ResNet)
            for arg in inspect.signature(cls.__init__).parameters
        }
        accepted = sorted(accepted - {'self', 'kwargs'})
        raise ValueError(f'{type(backbone).__name__} got unknown arguments '
                         f'{unknown}; accepted: {accepted}')
    args = {k: p.default for k, p in params.items()}
    args.update(kwargs, depth=depth)
    num_stages = check_int('num_stages', args['num_stages'], 1, 4)
    check_positive_int('in_channels', args['in_channels'])
    if args['stem_channels'] is not None:
        check_positive_int('stem_channels', args['stem_channels'])
    check_positive_int('base_channels', args['base_channels'])
    if 'groups' in args:  # ResNeXt
        check_positive_int('groups', args['groups'])
        check_positive_int('base_width', args['base_width'])
    check_int_tuple('strides', args['strides'], num_stages)
    check_int_tuple('dilations', args['dilations'], num_stages)
    out_indices = args['out_indices']
    if not isinstance(out_indices, (tuple, list)) or not out_indices or \
            not all(isinstance(i, int) and not isinstance(i, bool)
                    and 0 <= i < num_stages for i in out_indices):
        raise ValueError(
            f'out_indices must be a non-empty tuple of stage indices in '
            f'[0, {num_stages - 1}], got {out_indices!r}')
    check_choice('style', args['style'], ('pytorch', 'caffe'))
    for flag in ('deep_stem', 'avg_down', 'norm_eval', 'with_cp',
                 'zero_init_residual'):
        check_bool(flag, args[flag])
    check_int('frozen_stages', args['frozen_stages'], -1, num_stages)
    check_layer_cfg('conv_cfg', args['conv_cfg'], optional=True)
    check_layer_cfg('norm_cfg', args['norm_cfg'])
    if args['norm_cfg']['type'] == 'GN':
        # torch would stop inside the stem with a message naming no argument
        stem = args['stem_channels'] or args['base_channels']
        widths = {stem, stem // 2} if args['deep_stem'] else {stem}
        planes = [args['base_channels'] * 2**i for i in range(num_stages)]
        widths |= {p * Bottleneck.expansion for p in planes}
        widths |= {
            bottleneck_width(p, args.get('groups', 1),
                             args.get('base_width', 4), args['base_channels'])
            for p in planes}
        groups = args['norm_cfg'].get('num_groups')
        if not isinstance(groups, int) or groups < 1 or any(
                w % groups for w in widths):
            raise ValueError(
                f'norm_cfg: GroupNorm num_groups must divide every width it '
                f'normalises ({sorted(widths)}), got {args["norm_cfg"]!r}')
    check_layer_cfg('dcn', args['dcn'], optional=True)
    if args['dcn'] is not None:
        check_stage_flags('stage_with_dcn', args['stage_with_dcn'],
                          num_stages)
    elif not isinstance(args['stage_with_dcn'], (tuple, list)) or any(
            flag is not False for flag in args['stage_with_dcn']):
        raise ValueError('stage_with_dcn must be all False when dcn is None '
                         f'(no stage can have DCN), got '
                         f'{args["stage_with_dcn"]!r}')
    plugins = args['plugins']
    if plugins and backbone.arch_settings[depth][0] is not Bottleneck:
        backbone.check_depth(depth, bottleneck=True,
                             why=' (plugins need bottleneck blocks)')
    check_plugins(plugins, num_stages, backbone.reserved_block_names,
                  getattr(backbone, 'own_plugin_labels', ()))
