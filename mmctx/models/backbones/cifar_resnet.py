"""Bottleneck ResNet for 32x32 CIFAR images, with optional Spatial Bias."""
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmdet.models.backbones.resnet import Bottleneck
from mmengine.registry import MODELS

from ..utils import check_bool, check_int
from .sb_resnet import SBResNet


@MODELS.register_module()
class CifarResNet(SBResNet):
    """CIFAR bottleneck ResNet of depth 9n+2 (38, 65, 110, ...): a 3x3 stem
    with 16 channels and no pooling, three stages of n bottlenecks with
    16/32/64 planes (64/128/256 output channels) and strides 1/2/2.

    With ``sb`` set it is the paper's CIFAR SB-ResNet (SB in stages 1-2 with
    ``pool_size=6``); ``sb=None`` gives the plain network.

    Args:
        depth (int): 9n + 2 with n >= 1.
        sb (dict | None): Spatial Bias arguments, e.g.
            ``dict(num_bias=3, pool_size=6)``; None (default) for no SB.
        stage_with_sb (tuple[bool] | None): Stages with SB, one flag per
            stage; None: stages 1 and 2 (the paper's), of ``num_stages``.
        **kwargs: Upstream ResNet arguments (out_indices, norm_cfg, ...).
    """

    def __init__(self,
                 depth,
                 sb=None,
                 stage_with_sb=None,
                 num_stages=3,
                 strides=(1, 2, 2),
                 dilations=(1, 1, 1),
                 out_indices=(2, ),
                 base_channels=16,
                 stem_channels=16,
                 norm_eval=False,
                 deep_stem=False,
                 **kwargs):
        if isinstance(depth, bool) or not isinstance(depth, int) \
                or depth < 11 or (depth - 2) % 9:
            raise ValueError(
                f'depth must be 9n + 2 with n >= 1 (11, 20, 38, 65, 110, '
                f'...), got {depth!r}')
        num_stages = check_int('num_stages', num_stages, 1, 4)
        if stage_with_sb is None:
            stage_with_sb = tuple(i < 2 for i in range(num_stages))
        if check_bool('deep_stem', deep_stem):
            raise ValueError('deep_stem must be False for CifarResNet: its '
                             'stem is a single 3x3 conv')
        blocks = (depth - 2) // 9
        # Per-instance depth table: any 9n+2 is valid.
        self.arch_settings = {depth: (Bottleneck, (blocks, ) * num_stages)}
        super().__init__(
            depth,
            sb=sb,
            stage_with_sb=stage_with_sb,
            num_stages=num_stages,
            strides=strides,
            dilations=dilations,
            out_indices=out_indices,
            base_channels=base_channels,
            stem_channels=stem_channels,
            norm_eval=norm_eval,
            **kwargs)

    def _make_stem_layer(self, in_channels, stem_channels):
        self.conv1 = build_conv_layer(
            self.conv_cfg,
            in_channels,
            stem_channels,
            kernel_size=3,
            padding=1,
            bias=False)
        self.norm1_name, norm1 = build_norm_layer(
            self.norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
