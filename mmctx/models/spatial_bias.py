"""Spatial Bias (Go & Ryu, "Spatial Bias for Attention-free Non-local Neural
Networks", https://arxiv.org/abs/2302.12505)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS

from .utils import (adaptive_avg_pool2d, adaptive_max_pool2d,
                    built_as_plugin, check_choice, check_init_cfg,
                    check_layer_cfg, check_norm_channels,
                    check_positive_int, normalize)


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
    maps and batch size 1 are fine. The official code upsamples by a scale
    factor fixed for 224 inputs; at that size the two agree.

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
        norm_cfg (dict): Config of the norm layer after the squeeze conv,
            over its ``num_bias + 2`` maps: a per-channel norm (BN, SyncBN,
            IN) or a GroupNorm whose ``num_groups`` divides them.
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
        check_norm_channels('norm_cfg', norm_cfg, num_bias + 2)
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
        self.squeeze = build_conv_layer(conv_cfg, in_channels, num_bias + 2,
                                        kernel_size=1, bias=False)
        self.norm = build_norm_layer(norm_cfg, num_bias + 2)[1]
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
        """The ``num_bias`` bias maps of ``x`` (B, C, H, W), resized to
        ``size``: (B, num_bias, *size)."""
        r = self.pool_size
        maps = F.relu(normalize(self.norm, self.squeeze(x)))
        pool = adaptive_avg_pool2d if self.pool_type == 'avg' \
            else adaptive_max_pool2d
        maps = pool(maps, (r, r))  # (B, k + 2, r, r)
        # Grid positions become the Conv1d's channels; its kernel slides
        # along the k + 2 maps, so each output mixes all positions.
        maps = maps.flatten(2).transpose(1, 2)  # (B, r*r, k + 2)
        bias = self.mix(maps).transpose(1, 2)  # (B, r*r, k) -> (B, k, r*r)
        bias = bias.reshape(-1, self.num_bias, r, r)
        return F.interpolate(bias, size=size, mode='bilinear',
                             align_corners=False)

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
