"""Spatial Bias (Go & Ryu, "Spatial Bias for Attention-free Non-local Neural
Networks", https://arxiv.org/abs/2302.12505)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from .norm_gate import kernels
from .utils import (adaptive_avg_pool2d_generic, adaptive_max_pool2d_generic,
                    built_as_plugin, check_choice, check_init_cfg,
                    build_pointwise_conv, check_layer_cfg,
                    check_positive_int, eval_affine, hooked, normalize,
                    size_generic_path)


def mix_and_resize(pooled, weight, bias, size):
    """Spatial Bias's Conv1d (``weight``, ``bias``) along the maps of the
    pooled (B, k + 2, r, r) maps, as one GEMM over its windows (oneDNN's
    conv costs several times more on so small an input, per call), and
    the k bias maps resized bilinearly to ``size``."""
    batch, k, r = pooled.shape[0], pooled.shape[1] - 2, pooled.shape[-1]
    windows = pooled.flatten(2).unfold(1, 3, 1)  # (B, k, r*r, 3)
    maps = F.linear(windows.reshape(batch, k, -1), weight.reshape(r * r, -1),
                    bias)  # (B, k, r*r)
    return F.interpolate(maps.reshape(batch, k, r, r), size=size,
                         mode='bilinear', align_corners=False)


@MODELS.register_module()
class SpatialBias(BaseModule):
    """Spatial Bias: a few globally mixed, heavily compressed feature maps.

    The input is squeezed to ``num_bias + 2`` channels (1x1 conv, BN, ReLU)
    and pooled to a fixed ``pool_size x pool_size`` grid. A ``Conv1d`` with
    ``pool_size**2`` input and output channels then slides (kernel 3, no
    padding) along the channel axis, so every grid position is mixed with
    every other one: ``num_bias`` maps of global context. They are upsampled
    bilinearly to the target size and joined to the target feature map.

    In SB-ResNet the branch reads the bottleneck's conv1 output and its maps
    are concatenated to conv2's output (``fusion='concat'``, the paper's
    design; the block then widens bn2 and conv3, see
    :class:`mmctx.models.SBBottleneck`). With ``fusion='add'`` the maps are
    projected back to ``in_channels`` by a zero-initialised 1x1 conv and added
    (the paper's "add" ablation), so the module keeps the channel count and
    works as a stock ResNet plugin, e.g. at ``position='after_conv2'``; a
    concatenating SpatialBias built as a stock plugin raises ValueError.

    Any input size works: pooling is adaptive (maps smaller than the grid are
    repeated) and upsampling goes to the target's exact size, so non-square
    maps and batch size 1 are fine.

    Args:
        in_channels (int): Channels of the input feature map.
        num_bias (int): Number of spatial-bias channels ``k``. The paper uses
            3 ("Bias-3"); must be smaller than ``in_channels``.
        pool_size (int): Side ``r`` of the pooled grid: 10 for ImageNet-size
            inputs, 6 for CIFAR.
        pool_type (str): ``'avg'`` (the paper's) or ``'max'`` pooling.
        fusion (str): ``'concat'`` (output has ``in_channels + num_bias``
            channels) or ``'add'`` (output has ``in_channels`` channels).
        conv_cfg (dict, optional): Config of the 1x1 squeeze conv.
        norm_cfg (dict): Config of the norm layer after the squeeze conv.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 in_channels,
                 num_bias=3,
                 pool_size=10,
                 pool_type='avg',
                 fusion='concat',
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 init_cfg=None):
        check_init_cfg('init_cfg', init_cfg)
        super().__init__(init_cfg)
        check_positive_int('in_channels', in_channels)
        check_positive_int('num_bias', num_bias)
        check_positive_int('pool_size', pool_size)
        if num_bias >= in_channels:
            raise ValueError(
                f'num_bias must be smaller than in_channels ({in_channels}), '
                f'got {num_bias}')
        check_choice('pool_type', pool_type, ('avg', 'max'))
        check_choice('fusion', fusion, ('concat', 'add'))
        check_layer_cfg('conv_cfg', conv_cfg, optional=True)
        check_layer_cfg('norm_cfg', norm_cfg)
        if fusion == 'concat' and built_as_plugin():
            # A stock plugin must keep its input's channels (see
            # utils.built_as_plugin); concatenation adds num_bias of them.
            raise ValueError(
                "fusion='concat' (the default) cannot work in a stock ResNet "
                'plugin: it adds num_bias channels that the next layer of '
                "the block does not take. Use fusion='add' for a plugin, or "
                "the SBResNet backbone (type='SBResNet', sb=dict(...)) for "
                "the paper's concatenation")
        self.in_channels = in_channels
        self.num_bias = num_bias
        self.pool_size = pool_size
        self.pool_type = pool_type
        self.fusion = fusion
        self.out_channels = in_channels + num_bias if fusion == 'concat' \
            else in_channels

        # k + 2 maps: the unpadded kernel-3 Conv1d below eats two of them.
        self.squeeze = build_pointwise_conv(conv_cfg, in_channels,
                                            num_bias + 2, bias=False)
        self.norm = build_norm_layer(norm_cfg, num_bias + 2)[1]
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_type == 'avg' \
            else nn.AdaptiveMaxPool2d(pool_size)
        num_positions = pool_size * pool_size
        self.mix = nn.Conv1d(num_positions, num_positions, kernel_size=3)
        if fusion == 'add':
            self.proj = nn.Conv2d(num_bias, in_channels, kernel_size=1)

    def init_weights(self):
        super().init_weights()
        if self.fusion == 'add':
            # Start as the identity: the block adds nothing until trained.
            constant_init(self.proj, 0)

    def spatial_bias(self, x, size):
        """The ``num_bias`` bias maps of ``x``, resized to ``size``."""
        return self.spatial_bias_of_squeezed(self.squeeze(x), size)

    def spatial_bias_of_squeezed(self, maps, size):
        """The bias maps from the squeeze conv's output ``maps`` (B, k + 2,
        H, W), resized to ``size``."""
        batch = maps.shape[0]
        r = self.pool_size
        maps = F.relu(normalize(self.norm, maps))
        generic = size_generic_path(maps)
        if generic:
            # Traced / exported graphs: adaptive pooling from tensor ops
            # (the legacy ONNX exporter has none for a dynamic input size).
            generic_pool = adaptive_avg_pool2d_generic \
                if self.pool_type == 'avg' else adaptive_max_pool2d_generic
            maps = generic_pool(maps, (r, r))
        else:
            maps = self.pool(maps)  # (B, k + 2, r, r)
        if not (generic or torch.jit.is_tracing() or hooked(self.mix)):
            return mix_and_resize(maps, self.mix.weight, self.mix.bias, size)
        # Positions become Conv1d channels; the kernel slides over the maps.
        maps = maps.flatten(2).transpose(1, 2)  # (B, r*r, k + 2)
        bias = self.mix(maps).transpose(1, 2)  # (B, k, r*r)
        bias = bias.reshape(batch, self.num_bias, r, r)
        return F.interpolate(
            bias, size=size, mode='bilinear', align_corners=False)

    def inference_bias_applies(self, maps):
        """Whether :meth:`inference_bias` may run on the squeeze conv's
        output ``maps``: inference through an eval, affine BatchNorm with
        running statistics, unhooked layers, eager code on contiguous
        float32 / float64 CPU maps, the loops compiled."""
        return (not torch.is_grad_enabled()
                and not size_generic_path(maps)  # (tracing included)
                and kernels() is not None and self.inference_bias_fits(maps))

    def inference_bias_fits(self, maps):
        """:meth:`inference_bias_applies` for a caller that has established
        eager inference with the loops compiled (e.g. SB-ResNet's block
        inference): the norm, the hooks and ``maps``."""
        norm = self.norm
        return (isinstance(norm, _BatchNorm)
                and not norm.training and norm.affine
                and norm.running_mean is not None
                and norm.weight.dtype == maps.dtype
                and self.mix.weight.dtype == maps.dtype
                and maps.device.type == 'cpu' and maps.is_contiguous()
                and maps.dtype in (torch.float32, torch.float64)
                and not hooked(norm) and not hooked(self.pool)
                and not hooked(self.mix))

    def inference_bias(self, maps, size, scale, shift, loops=None):
        """``relu(bias * scale + shift)`` per bias map (a following eval
        norm and ReLU, e.g. SB-ResNet's bn2 on the bias channels) of the
        bias maps of the squeeze conv's output ``maps``, resized to
        ``size``: the norm, ReLU and pooling in one C++ pass that writes
        the Conv1d's windows, the Conv1d as one GEMM, the resampling, norm
        and ReLU in another; equal to :meth:`spatial_bias_of_squeezed`
        followed by the affine map and ReLU up to float rounding. Call where
        :meth:`inference_bias_applies` (``loops``: the compiled loops, from
        a caller that has established eager inference, see
        :func:`~mmctx.models.utils.eval_affine`)."""
        r = self.pool_size
        ops = kernels()
        windows = ops.scale_shift_relu_pool_windows(
            maps, *eval_affine(self.norm, loops=loops), r,
            self.pool_type == 'max')
        bias = F.linear(windows.view(maps.shape[0], self.num_bias, -1),
                        self.mix.weight.view(r * r, -1), self.mix.bias)
        return ops.upsample_scale_shift_relu(
            bias.view(maps.shape[0], self.num_bias, r, r), *size,
            scale, shift)

    def forward(self, x, target=None):
        """Join the spatial bias of ``x`` to ``target`` (default: ``x``).

        Args:
            x (Tensor): (B, in_channels, H, W) map the bias is computed from.
            target (Tensor, optional): (B, in_channels, H', W') map the bias
                is joined to, e.g. conv2's (strided) output in a bottleneck.
        """
        if target is None:
            target = x
        bias = self.spatial_bias(x, target.shape[-2:])
        if self.fusion == 'concat':
            return torch.cat([target, bias], dim=1)
        return target + self.proj(bias)
