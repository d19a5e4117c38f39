"""SB-ResNet: ResNet whose bottlenecks concatenate Spatial Bias maps to
conv2's output (Go & Ryu, https://arxiv.org/abs/2302.12505)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmdet.models.backbones.resnet import Bottleneck
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from .. import bias_maps, norm_rank, norm_squeeze
from ..spatial_bias import SpatialBias
from ..norm_gate import kernels, step_statistics
from ..utils import (PointwiseConv2d, build_pointwise_conv, check_choice,
                     check_int, check_positive_int, check_stage_flags,
                     eval_affine, FEW_MAPS, hooked, pointwise_conv,
                     size_generic_path)
from .context_resnet import ContextResNet, check_plugin_cfg, check_plugins
from .pretrained_slices import (compose, editable_pretrained_slices,
                                only_composes, split_pretrained_slices)


class SBBottleneck(Bottleneck):
    """Upstream Bottleneck with a Spatial Bias branch on conv2.

    The branch reads conv2's input (conv1's output, before conv2's stride)
    and joins its maps to conv2's output through a forward hook on conv2, so
    the upstream forward (plugins, checkpointing, DCN) runs unchanged. With
    the paper's concatenation bn2, the after_conv2 plugins and conv3 take
    ``planes + num_bias`` channels. A plain ResNet checkpoint loads with
    conv3's extra input channels zero-padded, so the block starts as exactly
    the pretrained plain block; from scratch they are initialised like the
    rest of conv3 (see :meth:`init_weights`).

    Neither inference nor training on CPU builds the concatenation: bn2 and
    the ReLU act per channel, so conv3 of the joined map is conv3's first
    ``planes`` inputs on conv2's map plus a rank-``num_bias`` term from the
    bias maps. conv3 then runs at ResNet's width, the copy of conv2's map
    into the joined one is saved, and bn3 of conv3's output plus that term,
    the residual add and the ReLU run as compiled loops that never write
    the term out: one pass in inference (:meth:`forward_inference`), where
    the upstream block makes three; in training (:meth:`forward_train`,
    :mod:`mmctx.models.norm_rank`) two passes each way, with bn2 applied
    to conv2's map and the bias maps apart (the branch after its squeeze
    with bn2 and the ReLU on its maps as one function over two C++ calls,
    :mod:`mmctx.models.bias_maps`). Both equal the upstream forward
    up to float rounding, outputs, gradients and running statistics
    (``tests/test_fast_paths.py``); other devices, autocast, SyncBN in
    training, activation checkpointing, plugins and hooks on the bypassed
    layers take the upstream forward.

    In a frozen stage of an mmctx backbone only the pretrained part of the
    widened bn2 and conv3 is frozen: their entries of the bias channels keep
    training (:meth:`separate_pretrained_slices`), as the SB branch does.

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
        self.spatial_bias = SpatialBias(
            planes, **dict(dict(norm_cfg=self.norm_cfg), **sb))
        self.num_bias = self.spatial_bias.num_bias
        if self.spatial_bias.fusion == 'concat':
            self._widen_after_conv2(self.spatial_bias.out_channels)
        self.conv2.register_forward_hook(self._join_spatial_bias)

    def _widen_after_conv2(self, channels):
        # Rebuild what follows conv2 for the concatenated channels.
        self.norm2_name, norm2 = build_norm_layer(
            self.norm_cfg, channels, postfix=2)
        self.add_module(self.norm2_name, norm2)
        # Inference runs it as a GEMM on CPU (PointwiseConv2d): oneDNN's
        # conv is slowest at such odd widths.
        self.conv3 = build_pointwise_conv(
            self.conv_cfg, channels, self.planes * self.expansion, bias=False)
        if self.with_plugins:
            for name in self.after_conv2_plugin_names:
                delattr(self, name)
            self.after_conv2_plugin_names = self.make_block_plugins(
                channels, self.after_conv2_plugins)

    def _join_spatial_bias(self, conv2, inputs, output):
        return self.spatial_bias(inputs[0], output)

    def _bypass_applies(self, x):
        """Whether a forward of this class may replace the upstream one:
        eager code (no autocast, tracing) on a contiguous float map, the
        paper's concatenation, affine BatchNorms, a plain conv3 and no
        plugins or hooks of others on the layers it bypasses (the ReLU
        included: the fused passes apply it)."""
        if self.with_plugins or self.spatial_bias.fusion != 'concat' \
                or not x.is_contiguous() or not x.is_floating_point() \
                or torch.is_autocast_enabled(x.device.type) \
                or size_generic_path(x) or torch.jit.is_tracing():
            return False
        conv2_hooks = self.conv2._forward_hooks
        # (a frozen stage's bn2 and conv3 compose their split tensors in a
        # hook; the forwards here do that themselves)
        return (all(isinstance(norm, _BatchNorm) and norm.affine
                    and only_composes(norm)
                    for norm in (self.norm2, self.norm3))
                and type(self.conv3) in (nn.Conv2d, PointwiseConv2d)
                and self.conv3.bias is None and self.conv3.groups == 1
                and only_composes(self.conv3)
                and not hooked(self.spatial_bias) and not hooked(self.relu)
                and not self.conv2._forward_pre_hooks
                and len(conv2_hooks) == 1
                and getattr(next(iter(conv2_hooks.values())), '__func__',
                            None) is SBBottleneck._join_spatial_bias)

    def _inference_applies(self, x):
        """Whether :meth:`forward_inference` may replace the upstream
        forward: inference (eval mode, no autograd) through eval
        BatchNorms, where :meth:`_bypass_applies`."""
        if self.training or torch.is_grad_enabled() \
                or not self._bypass_applies(x):
            return False
        norm2, norm3 = self.norm2, self.norm3
        return not norm2.training and norm2.running_mean is not None \
            and not norm3.training and norm3.running_mean is not None

    def _training_applies(self, x):
        """Whether :meth:`forward_train` may replace the upstream forward:
        a training block without activation checkpointing, through
        bn2 and bn3 that are training-mode ``nn.BatchNorm2d`` (batch
        statistics; SyncBN takes the upstream forward) or eval-mode
        BatchNorms with running statistics (``norm_eval=True``), on float
        CPU maps with the loops compiled, where :meth:`_bypass_applies`."""
        return (self.training and not self.with_cp
                and x.device.type == 'cpu'
                and x.dtype in (torch.float32, torch.float64)
                and all((type(norm) is nn.BatchNorm2d if norm.training else
                         norm.running_mean is not None)
                        and norm.weight.dtype == x.dtype
                        for norm in (self.norm2, self.norm3))
                and kernels() is not None and self._bypass_applies(x))

    def _squeeze_fuses(self, out):
        """Whether :meth:`forward_inference` may run bn1, the ReLU and the
        branch's squeeze on conv1's output ``out`` as one C++ pass: an
        eval, affine, unhooked bn1 (the ReLU is unhooked, see
        :meth:`_bypass_applies`), a plain unhooked 1x1 squeeze conv with
        few output maps, contiguous float CPU maps; the forward has
        established eager inference with the loops compiled."""
        norm1, squeeze = self.norm1, self.spatial_bias.squeeze
        weight = squeeze.weight
        return (isinstance(norm1, _BatchNorm) and not norm1.training
                and norm1.affine and norm1.running_mean is not None
                and not hooked(norm1)
                and type(squeeze) in (nn.Conv2d, PointwiseConv2d)
                and squeeze.bias is None and not hooked(squeeze)
                and out.device.type == 'cpu' and out.dim() == 4
                and out.is_contiguous() and weight.shape[0] <= FEW_MAPS
                and out.dtype in (torch.float32, torch.float64)
                and weight.dtype == out.dtype
                and norm1.weight.dtype == out.dtype)

    def forward(self, x):
        if self.training:
            if self._training_applies(x):
                return self.forward_train(x)
        elif self._inference_applies(x):
            return self.forward_inference(x)
        return super().forward(x)

    def forward_train(self, x):
        """The upstream forward in training, without the concatenation:
        bn1, its ReLU and the branch's squeeze as one function
        (:mod:`mmctx.models.norm_squeeze`), bn2 on conv2's map and on the
        bias maps separately (its statistics are per channel; the branch
        after the squeeze with bn2 and the ReLU on its maps as one function,
        :mod:`mmctx.models.bias_maps`), conv3 on
        conv2's channels, then bn3 of that plus the bias maps' rank-k term,
        the residual add and the ReLU as one function
        (:mod:`mmctx.models.norm_rank`); call where
        :meth:`_training_applies`."""
        out = self.conv1(x)
        branch = self.spatial_bias
        if norm_squeeze.applies(self.norm1, self.relu, branch.squeeze, out):
            # bn1, the ReLU and the branch's squeeze as one function
            out, squeezed = norm_squeeze.norm_relu_squeeze(
                out, self.norm1, branch.squeeze)
        else:
            out = self.relu(self.norm1(out))
            squeezed = branch.squeeze(out)
        main = self.conv2.forward(out)  # the forward without the join hook
        size = main.shape[-2:]
        norm2, planes = self.norm2, self.planes
        for layer in (norm2, self.conv3):
            compose(layer)
        running = step_statistics(norm2)
        running_mean, running_var, factor = running

        def norm2_relu(maps, part):  # bn2 and the ReLU on some channels
            stats = (None, None) if running_mean is None else (
                running_mean[part], running_var[part])
            return self.relu(F.batch_norm(
                maps, *stats, norm2.weight[part], norm2.bias[part],
                norm2.training, factor, norm2.eps))

        main = norm2_relu(main, slice(None, planes))
        if bias_maps.applies(branch, norm2, squeezed, size):
            # the branch with bn2 and the ReLU on its maps as one function
            bias = bias_maps.bias_maps(branch, squeezed, size, norm2,
                                       slice(planes, None), running)
        else:
            bias = norm2_relu(
                branch.spatial_bias_of_squeezed(squeezed, size),
                slice(planes, None))
        out = pointwise_conv(self.conv3.weight[:, :planes], main)
        identity = x if self.downsample is None else self.downsample(x)
        rank_weight = self.conv3.weight[:, planes:].flatten(1)
        if norm_rank.applies(self.norm3, out, identity, bias,
                             self.spatial_bias):
            return norm_rank.rank_norm_add_relu(out, bias, rank_weight,
                                                identity, self.norm3)
        out = out + torch.einsum('ck,bkhw->bchw', rank_weight, bias)
        return self.relu(self.norm3(out) + identity)

    def forward_inference(self, x):
        """The upstream forward in inference, without the concatenation
        (see the class docstring); call where :meth:`_inference_applies`.
        The checks of what it established (eager inference) are not made
        again below: Python between the convs runs on caches they have
        just flushed, at several times its cost in a warm loop.
        """
        # the C++ loops where they may apply; else the tensor ops
        loops = kernels() if x.device.type == 'cpu' and x.dtype in (
            torch.float32, torch.float64) else None
        out = self.conv1(x)
        squeezed = None
        if loops is not None and self._squeeze_fuses(out):
            # bn1, the ReLU and the branch's squeeze in one pass
            scale1, shift1 = eval_affine(self.norm1, loops=loops)
            squeeze = self.spatial_bias.squeeze.weight
            out, squeezed = loops.scale_shift_relu_few_maps(
                out, scale1, shift1,
                squeeze.reshape(squeeze.shape[0], -1).contiguous())
        else:
            out = self.relu(self.norm1(out))
        main = self.conv2.forward(out)  # the forward without the join hook
        norm2, norm3, planes = self.norm2, self.norm3, self.planes
        for layer in (norm2, self.conv3):
            compose(layer)
        scale2, shift2 = eval_affine(norm2, loops=loops)
        branch = self.spatial_bias
        if squeezed is None:
            squeezed = branch.squeeze(out)
        if loops is not None and branch.inference_bias_fits(squeezed):
            # the branch after its squeeze and bn2 + ReLU of its maps in
            # two C++ passes and a GEMM
            bias = branch.inference_bias(squeezed, main.shape[-2:],
                                         scale2[planes:], shift2[planes:],
                                         loops)
        else:
            bias = branch.spatial_bias_of_squeezed(squeezed, main.shape[-2:])
            bias = F.relu(torch.addcmul(shift2[planes:, None, None], bias,
                                        scale2[planes:, None, None]))
        if loops is not None and main.is_contiguous():
            # bn2 and the ReLU on conv2's channels in one pass (the loops'
            # squeeze to no maps), where the plain ops make two
            main = loops.scale_shift_relu_few_maps(
                main, scale2[:planes], shift2[:planes],
                main.new_empty(0, planes))[0]
        else:
            main = self.relu(
                F.batch_norm(main, norm2.running_mean[:planes],
                             norm2.running_var[:planes],
                             norm2.weight[:planes], norm2.bias[:planes],
                             False, 0., norm2.eps))
        # conv3 on conv2's channels; the bias channels' inputs of conv3 act
        # on the bias maps as a rank-k term
        out = pointwise_conv(self.conv3.weight[:, :planes], main)
        downsample_norm = self._downsample_norm_folds()
        if downsample_norm is not None:  # the tail may apply it
            identity = self.downsample[:-1](x)
        else:
            identity = x if self.downsample is None else self.downsample(x)
        scale3, shift3 = eval_affine(norm3, loops=loops)
        rank_weight = self.conv3.weight[:, planes:].flatten(1)
        if loops is not None and _tail_fuses(out, identity, bias):
            # bn3 of conv3's output plus the rank-k term, the downsample's
            # norm, the residual add and the ReLU in one pass
            return loops.rank_scale_shift_add_relu(
                out, identity, scale3, shift3, rank_weight, bias, out,
                *(eval_affine(downsample_norm, loops=loops)
                  if downsample_norm is not None else (None, None)))
        if downsample_norm is not None:
            identity = downsample_norm(identity)
        batch, channels, height, width = out.shape
        out = torch.addcmul(shift3[:, None, None], out, scale3[:, None, None])
        out.view(batch, channels, -1).baddbmm_(
            (rank_weight * scale3[:, None]).expand(batch, -1, -1),
            bias.reshape(batch, self.num_bias, -1))
        out += identity
        return self.relu(out)

    def _downsample_norm_folds(self):
        """The downsample's norm where the inference tail may apply it in
        its pass: an eval, affine, unhooked BatchNorm with running
        statistics ending an unhooked ``nn.Sequential`` (mmdet's conv +
        norm, or with ``avg_down`` pool + conv + norm); else None."""
        downsample = self.downsample
        if not isinstance(downsample, nn.Sequential) or len(downsample) < 2 \
                or hooked(downsample):
            return None
        norm = downsample[-1]
        if isinstance(norm, _BatchNorm) and not norm.training \
                and norm.affine and norm.running_mean is not None \
                and not hooked(norm):
            return norm
        return None

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
                                    self.planes)
            split_pretrained_slices(self.norm2, ('weight', 'bias'), 0,
                                    self.planes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain ResNet checkpoint: pad bn2 and conv3 for the bias channels
        # (identity norm, zero conv3 inputs) so nothing is dropped.
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
                if tensor.shape[dim] != self.planes:
                    continue
                shape = list(tensor.shape)
                shape[dim] = k
                state_dict[key] = torch.cat(
                    [tensor, tensor.new_full(shape, value)], dim=dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _tail_fuses(out, identity, bias):
    """Whether the compiled loops (built; see
    :meth:`SBBottleneck.forward_inference`) may finish the block in
    inference: contiguous float32 / float64 CPU maps of one dtype, identity
    shaped like conv3's output."""
    return (out.device.type == 'cpu' and out.dtype in (torch.float32,
                                                       torch.float64)
            and all(t.dtype == out.dtype and t.device == out.device
                    and t.is_contiguous() for t in (identity, bias))
            and out.is_contiguous() and identity.shape == out.shape)


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
        stage_with_sb (tuple[bool]): Stages with SB, one flag per stage; the
            paper leaves out stage 4, whose map is too small.
    """

    def __init__(self,
                 depth,
                 sb=dict(num_bias=3, pool_size=10),
                 stage_with_sb=(True, True, True, False),
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
        flags = check_stage_flags('stage_with_sb', stage_with_sb, num_stages)
        if sb is not None:
            # Check the values once, also when no stage takes SB.
            first = flags.index(True) if True in flags else 0
            base = kwargs.get('base_channels', 64)
            check_positive_int('base_channels', base)
            try:
                SpatialBias(base * 2**first, **sb)
            except ValueError as error:
                raise ValueError(f'sb: {error}') from None
        self.sb = None if sb is None else dict(sb)
        self.stage_with_sb = flags
        super().__init__(depth, **kwargs)

    def reserved_block_names(self, stage):
        if self.sb is not None and self.stage_with_sb[stage]:
            return ('spatial_bias', )
        return ()

    def make_res_layer(self, **kwargs):
        if self.sb is not None and \
                self.stage_with_sb[self.stage_of(kwargs['planes'])]:
            kwargs.update(block=SBBottleneck, sb=self.sb)
        return super().make_res_layer(**kwargs)
