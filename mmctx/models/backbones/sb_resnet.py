"""SB-ResNet: ResNet whose bottlenecks concatenate Spatial Bias maps to
conv2's output (Go & Ryu, https://arxiv.org/abs/2302.12505)."""
import torch
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.registry import MODELS

from ..spatial_bias import SpatialBias
from ..utils import (ConcatNorm, check_choice, check_int,
                     check_positive_int, check_stage_flags, norm_kind)
from .context_resnet import (ContextBottleneck, ContextResNet,
                             ContextResNetV1c, ContextResNetV1d,
                             ContextResNeXt, ContextXBottleneck,
                             bottleneck_width, check_plugin_cfg,
                             check_plugins)
from .pretrained_slices import (editable_pretrained_slices,
                                split_pretrained_slices)


class SBBottleneck(ContextBottleneck):
    """Upstream Bottleneck with a Spatial Bias branch joined to conv2's output.

    The forward is upstream's (:class:`ContextBottleneck`) with the paper's
    step in :meth:`forward_conv2`::

        out = relu(bn1(conv1(x)))
        out = cat([conv2(out), spatial_bias(out)])  # width + num_bias
        out = relu(bn3(conv3(relu(bn2(out)))) + identity)

    The branch reads conv2's input (conv1's output, before conv2's stride),
    so bn2, the after_conv2 plugins and conv3 take ``width + num_bias``
    channels, where ``width`` is conv2's (``planes`` in a ResNet; in a
    ResNeXt, :class:`SBXBottleneck`, ``groups`` x the group width, and the
    bias maps join the grouped conv's output whole): an ``after_conv2``
    plugin sees what conv3 sees, conv2's output with the bias maps. With
    ``fusion='add'`` the maps are added instead (widths unchanged).

    Norms: with a per-channel ``norm_cfg`` (BN, SyncBN, IN) bn2 is one norm
    over the ``width + num_bias`` channels, as in the paper. A GroupNorm's
    groups cannot take the bias channels (67, 131, 259 channels are not 32
    groups), so under GN conv2's channels keep the backbone's norm and the
    bias maps get their own, ``GN(num_groups=1)``
    (:class:`mmctx.models.utils.ConcatNorm`); the branch's own norm over
    its ``num_bias + 2`` maps is then ``GN(num_groups=1)`` too, unless
    ``sb['norm_cfg']`` says otherwise.

    A plain ResNet checkpoint loads with conv3's extra input channels
    zero-padded, so the block starts as exactly the pretrained plain block;
    from scratch they are initialised like the rest of conv3 (see
    :meth:`init_weights`). In a frozen stage of an mmctx backbone only the
    pretrained part of the widened bn2 and conv3 is frozen: their entries of
    the bias channels keep training (:meth:`separate_pretrained_slices`), as
    the SB branch does.

    Args:
        sb (dict): Arguments of :class:`mmctx.models.SpatialBias` other than
            ``in_channels`` (e.g. ``num_bias``, ``pool_size``).
        **kwargs: Arguments of the upstream Bottleneck.
    """

    def __init__(self, inplanes, planes, sb, **kwargs):
        check_positive_int('inplanes', inplanes)
        check_positive_int('planes', planes)
        check_plugin_cfg('sb', sb, ('in_channels', ), SpatialBias)
        check_choice('style', kwargs.get('style', 'pytorch'),
                     ('pytorch', 'caffe'))
        check_plugins(kwargs.get('plugins'), 1,
                      lambda stage: ('spatial_bias', ))
        super().__init__(inplanes, planes, **kwargs)
        self.norm_kind = norm_kind('norm_cfg', self.norm_cfg)
        self.width = self.conv2.out_channels
        self.spatial_bias = SpatialBias(
            self.width,
            **dict(dict(norm_cfg=self.branch_norm_cfg(self.norm_cfg)), **sb))
        self.num_bias = self.spatial_bias.num_bias
        if self.spatial_bias.fusion == 'concat':
            self._widen_after_conv2(self.spatial_bias.out_channels)

    @staticmethod
    def branch_norm_cfg(norm_cfg):
        """The SB branch's default norm for a backbone's ``norm_cfg``: the
        same per-channel norm, or GN(num_groups=1) for a GroupNorm."""
        if norm_kind('norm_cfg', norm_cfg) == 'group':
            return dict(norm_cfg, num_groups=1)
        return norm_cfg

    def _widen_after_conv2(self, channels):
        # Rebuild what follows conv2 for the concatenated channels.
        if self.norm_kind == 'per_channel':
            self.norm2_name, norm2 = build_norm_layer(
                self.norm_cfg, channels, postfix=2)
        else:
            self.norm2_name, main = build_norm_layer(
                self.norm_cfg, self.width, postfix=2)
            extra = build_norm_layer(self.branch_norm_cfg(self.norm_cfg),
                                     channels - self.width)[1]
            norm2 = ConcatNorm(main, self.width, extra)
        self.add_module(self.norm2_name, norm2)
        self.conv3 = build_conv_layer(
            self.conv_cfg, channels, self.planes * self.expansion,
            kernel_size=1, bias=False)
        if self.with_plugins:
            for name in self.after_conv2_plugin_names:
                delattr(self, name)
            self.after_conv2_plugin_names = self.make_block_plugins(
                channels, self.after_conv2_plugins)

    def forward_conv2(self, x):
        """Spatial Bias: the branch reads conv2's input ``x`` and its maps
        join conv2's output (concatenated: ``width + num_bias`` channels
        for bn2, ReLU and conv3)."""
        return self.spatial_bias(x, self.conv2(x))

    def init_weights(self):
        # From scratch, conv3's bias columns get the same (Kaiming) init as
        # the rest of conv3, as in the paper's networks. Zero columns would
        # leave the branch without a gradient until they grow: in the
        # context probe SB then sat on a two-colour plateau for 300-800
        # iterations, and whether it left it within the configs' 600 turned
        # on float rounding (README, "Context probe"). A plain checkpoint
        # still loads with zero columns (_load_from_state_dict), so a
        # pretrained block starts as exactly the plain one.
        with editable_pretrained_slices(self):
            super().init_weights()

    def separate_pretrained_slices(self):
        """In a frozen stage: keep conv3's inputs and bn2's entries of the
        bias channels trainable, apart from the pretrained ones (see
        :mod:`mmctx.models.backbones.pretrained_slices`)."""
        if self.spatial_bias.fusion == 'concat':
            split_pretrained_slices(self.conv3, ('weight', 'bias'), 1,
                                    self.width)
            if not isinstance(self.norm2, ConcatNorm):  # else: norm2.extra
                split_pretrained_slices(self.norm2, ('weight', 'bias'), 0,
                                        self.width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain ResNet checkpoint: pad bn2 and conv3 for the bias channels
        # (identity norm, zero conv3 inputs) so nothing is dropped.
        if isinstance(self.norm2, ConcatNorm):
            # a plain GN block's norm2 is this one's norm2.main
            for name in ('weight', 'bias'):
                key = f'{prefix}{self.norm2_name}.{name}'
                if key in state_dict:
                    state_dict[f'{prefix}{self.norm2_name}.main.{name}'] = \
                        state_dict.pop(key)
        if self.spatial_bias.fusion == 'concat':
            k = self.num_bias
            padding = {
                f'{self.norm2_name}.weight': 1.0,
                f'{self.norm2_name}.bias': 0.0,
                f'{self.norm2_name}.running_mean': 0.0,
                f'{self.norm2_name}.running_var': 1.0,
                'conv3.weight': 0.0,
            }
            for name, value in padding.items():
                key = prefix + name
                tensor = state_dict.get(key)
                if tensor is None or tensor.dim() == 0:
                    continue
                dim = 1 if name == 'conv3.weight' else 0
                if tensor.shape[dim] != self.width:
                    continue
                shape = list(tensor.shape)
                shape[dim] = k
                state_dict[key] = torch.cat(
                    [tensor, tensor.new_full(shape, value)], dim=dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SBXBottleneck(SBBottleneck, ContextXBottleneck):
    """:class:`SBBottleneck` in upstream's ResNeXt block: the bias maps join
    the grouped conv2's output (``groups`` x group width channels)."""


@MODELS.register_module()
class SBResNet(ContextResNet):
    """ResNet with Spatial Bias in the bottlenecks of chosen stages.

    Configured like mmdet's DCN::

        backbone=dict(type='SBResNet', depth=50,
                      sb=dict(num_bias=3, pool_size=10),
                      stage_with_sb=(True, True, True, False), ...)

    Every other argument is upstream ResNet's; ``plugins`` combine SB with
    NonLocal2d, ContextBlock, GatherExcite, ... as in the paper.

    Args:
        depth (int): 50, 101 or 152 (bottleneck ResNets).
        sb (dict | None): :class:`mmctx.models.SpatialBias` arguments
            (``num_bias`` k = 3, ``pool_size`` r = 10 by default; pool_type,
            fusion). None builds the plain ResNet.
        stage_with_sb (tuple[bool] | None): Stages with SB, one flag per
            stage. None: every stage but the fourth, whose map the paper
            finds too small -- ``(True, True, True, False)`` for the 4
            stages of ``num_stages=4``, all of them for 1-3 stages.
    """

    def __init__(self,
                 depth,
                 sb=dict(num_bias=3, pool_size=10),
                 stage_with_sb=None,
                 **kwargs):
        num_stages = check_int('num_stages', kwargs.get('num_stages', 4), 1,
                               4)
        if sb is not None:
            self.check_depth(depth, bottleneck=True,
                             why=' (SB needs bottleneck blocks; sb=None '
                             'builds the plain ResNet)')
            if not isinstance(sb, dict):
                raise ValueError(f'sb must be a dict or None, got {sb!r}')
            check_plugin_cfg('sb', sb, ('in_channels', ), SpatialBias)
            # a norm SB can widen (SBBottleneck derives the branch's from it)
            norm_cfg = kwargs.get('norm_cfg', dict(type='BN'))
            norm_kind('norm_cfg', norm_cfg)
        flags = check_stage_flags('stage_with_sb', stage_with_sb, num_stages,
                                  default=self.default_stage_with_sb)
        if sb is not None:
            # Check the values once, also when no stage takes SB.
            first = flags.index(True) if True in flags else 0
            base = kwargs.get('base_channels', 64)
            check_positive_int('base_channels', base)
            # conv2's width (ResNeXt: groups x group width)
            width = bottleneck_width(
                base * 2**first,
                check_positive_int('groups', kwargs.get('groups', 1)),
                check_positive_int('base_width', kwargs.get('base_width', 4)),
                base)
            try:
                SpatialBias(width, **dict(
                    dict(norm_cfg=SBBottleneck.branch_norm_cfg(norm_cfg)),
                    **sb))
            except ValueError as error:
                raise ValueError(f'sb: {error}') from None
        self.sb = None if sb is None else dict(sb)
        self.stage_with_sb = flags
        super().__init__(depth, **kwargs)

    # SB's version of the family's block
    sb_bottleneck = SBBottleneck

    @staticmethod
    def default_stage_with_sb(num_stages):
        return tuple(i < 3 for i in range(num_stages))

    def reserved_block_names(self, stage):
        if self.sb is not None and self.stage_with_sb[stage]:
            return ('spatial_bias', )
        return ()

    def make_res_layer(self, **kwargs):
        if self.sb is not None and \
                self.stage_with_sb[self.stage_of(kwargs['planes'])]:
            kwargs.update(block=self.sb_bottleneck, sb=self.sb)
        return super().make_res_layer(**kwargs)


@MODELS.register_module()
class SBResNetV1c(SBResNet, ContextResNetV1c):
    """SBResNet with ResNetV1c's deep stem (:class:`ContextResNetV1c`)."""


@MODELS.register_module()
class SBResNetV1d(SBResNet, ContextResNetV1d):
    """SBResNet with ResNetV1d's deep stem and average-pool shortcuts
    (:class:`ContextResNetV1d`)."""


@MODELS.register_module()
class SBResNeXt(SBResNet, ContextResNeXt):
    """SB-ResNeXt: upstream ResNeXt (``groups``, ``base_width``) whose blocks
    in the stages of ``stage_with_sb`` are :class:`SBXBottleneck`."""
    sb_bottleneck = SBXBottleneck
