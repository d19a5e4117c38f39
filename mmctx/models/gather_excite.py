"""Gather-Excite (Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting
Feature Context in Convolutional Neural Networks", NeurIPS 2018,
https://arxiv.org/abs/1810.12348)."""
import math

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS

from .utils import (check_choice, check_init_cfg, check_layer_cfg,
                    check_positive_int, check_size, normalize)

VARIANTS = ('parameter_free', 'depthwise', 'depthwise_excite')
EXTENTS = (2, 4, 8, 'global')


class GlobalDepthwiseConv(nn.Conv2d):
    """GE-θ's global gather: a depthwise conv (no bias) whose kernel covers
    the whole feature map, i.e. one dot product per channel. Built for the
    reference map size; on another H x W the kernel is resized to H x W
    (bilinear) and scaled by the ratio of the areas, so it still covers the
    map and gives a map of constant value c the context it gives at the
    reference size. At the reference size the kernel is used as it is."""

    def __init__(self, channels, feature_size):
        super().__init__(channels, channels, feature_size, groups=channels,
                         bias=False)

    def forward(self, x):
        size = x.shape[-2:]
        kernel = F.interpolate(self.weight, size=size, mode='bilinear',
                               align_corners=False)
        area = self.kernel_size[0] * self.kernel_size[1]
        kernel = kernel * (area / (size[0] * size[1]))
        # (B, C, 1, 1): each channel dotted with its kernel
        return (x * kernel.view(1, -1, *size)).sum((2, 3), keepdim=True)


@MODELS.register_module()
class GatherExcite(BaseModule):
    """Gather-Excite: rescale a feature map by a gate from gathered context,
    ``y = x * sigmoid(excite(gather(x)))``.

    Variants (the paper's names in brackets), as in the official GENet
    definitions:

    - ``'parameter_free'`` (GE-θ⁻): no parameters. The global gather is the
      mean of each channel; extent e is average pooling over *overlapping*
      windows, kernel 2e-1, stride e, padding e-1 with padded pixels not
      counted, which gives a ⌈H/e⌉ x ⌈W/e⌉ map (the paper's "Ave Pooling
      (15x15, stride 8)" for e = 8; timm's ``GatherExcite`` is the same).
    - ``'depthwise'`` (GE-θ): a depthwise conv (no bias) + BN. For a global
      extent one depthwise conv whose kernel covers the whole reference
      feature map; for extent e, log2(e) stride-2 depthwise 3x3 convs with
      BN and ReLU between them (⌈H/e⌉ x ⌈W/e⌉ again).
    - ``'depthwise_excite'`` (GE-θ⁺): GE-θ's gather, ReLU, then an SE-style
      excite: 1x1 conv C -> C/``reduction`` (bias), ReLU, 1x1 conv back to C.

    A local gate is mapped back to the input's H x W by nearest
    interpolation (``F.interpolate(size=(H, W))``, as timm does): pixel i
    takes gate cell ``floor(i * ⌈H/e⌉ / H)``, which is ``i // e`` when e
    divides H. A global gate is one value per channel. At other sizes than
    the reference, a global depthwise gather resizes its kernel to the map
    (:class:`GlobalDepthwiseConv`), so the kernel always covers the whole
    map; at the reference size it is the paper's conv.

    The last parametric layer starts at zero, so the gate starts as the
    constant 0.5 (``constant_gate``); a backbone starting from a plain
    ResNet checkpoint compensates that constant in the preceding norm layer.

    Args:
        in_channels (int): Channels C of the input.
        variant (str): One of ``'parameter_free'``, ``'depthwise'``,
            ``'depthwise_excite'``.
        extent (int | str): Gather extent: 2, 4, 8 or ``'global'``.
        feature_size (int | tuple[int], optional): Reference (H, W) of the
            feature map, e.g. 56/28/14/7 in the four ResNet-50 stages at 224
            input. Required by the global depthwise variants (it is their
            kernel size); checked but unused otherwise.
        reduction (int): Channel reduction of the excite MLP (16).
        norm_cfg (dict): Norm layer of the depthwise gather.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 in_channels,
                 variant='parameter_free',
                 extent='global',
                 feature_size=None,
                 reduction=16,
                 norm_cfg=dict(type='BN'),
                 init_cfg=None):
        check_init_cfg('init_cfg', init_cfg)
        super().__init__(init_cfg)
        in_channels = check_positive_int('in_channels', in_channels)
        variant = check_choice('variant', variant, VARIANTS)
        extent = check_choice('extent', extent, EXTENTS)
        reduction = check_positive_int('reduction', reduction)
        if variant == 'depthwise_excite' and in_channels // reduction < 1:
            raise ValueError(
                f'reduction must be at most in_channels ({in_channels}), '
                f'got {reduction}')
        check_layer_cfg('norm_cfg', norm_cfg)
        parametric = variant != 'parameter_free'
        if feature_size is not None:
            feature_size = check_size('feature_size', feature_size)
        elif parametric and extent == 'global':
            raise ValueError(
                'feature_size (the reference H, W of the feature map, the '
                'global kernel size) is required for '
                f"variant={variant!r} with extent='global'; as a plugin of a "
                'stock ResNet give it per stage, or use the GEResNet '
                'backbone, which derives it from reference_input_size')
        self.in_channels = in_channels
        self.variant = variant
        self.extent = extent
        self.feature_size = feature_size

        if not parametric:
            return
        channels = in_channels
        if extent == 'global':
            self.gather = GlobalDepthwiseConv(channels, feature_size)
            self.gather_norms = nn.ModuleList(
                [build_norm_layer(norm_cfg, channels)[1]])
        else:
            steps = int(math.log2(extent))
            self.gather = nn.ModuleList(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1,
                          groups=channels, bias=False) for _ in range(steps))
            self.gather_norms = nn.ModuleList(
                build_norm_layer(norm_cfg, channels)[1] for _ in range(steps))
        if variant == 'depthwise_excite':
            hidden = channels // reduction
            self.excite = nn.Sequential(
                nn.Conv2d(channels, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, channels, 1))

    @property
    def constant_gate(self):
        """Gate value after :meth:`init_weights`, or None if input-dependent."""
        return None if self.variant == 'parameter_free' else 0.5

    def init_weights(self):
        super().init_weights()
        # Zero the last layer: the gate starts as sigmoid(0) everywhere.
        if self.variant == 'depthwise':
            constant_init(self.gather_norms[-1], 0)
        elif self.variant == 'depthwise_excite':
            constant_init(self.excite[-1], 0)

    def context(self, x):
        """The gathered context: (B, C, 1, 1) for the global extent, else
        (B, C, ⌈H/e⌉, ⌈W/e⌉)."""
        e = self.extent
        if self.variant == 'parameter_free':
            if e == 'global':
                return x.mean((2, 3), keepdim=True)
            return F.avg_pool2d(x, 2 * e - 1, stride=e, padding=e - 1,
                                count_include_pad=False)
        if e == 'global':
            return normalize(self.gather_norms[0], self.gather(x))
        for i, (conv, norm) in enumerate(zip(self.gather,
                                             self.gather_norms)):
            x = normalize(norm, conv(F.relu(x) if i else x))
        return x

    def forward(self, x):
        context = self.context(x)
        if self.variant == 'depthwise_excite':
            context = self.excite(F.relu(context))
        if self.extent != 'global':
            context = F.interpolate(context, size=x.shape[-2:],
                                    mode='nearest')
        # in x's dtype: under autocast GE-θ's gather (fp32 kernel) gives a
        # float32 context, which would make the block's output float32
        return x * context.sigmoid().to(x.dtype)
