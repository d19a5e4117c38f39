"""Gather-Excite (Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting
Feature Context in Convolutional Neural Networks", NeurIPS 2018,
https://arxiv.org/abs/1810.12348)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from . import norm_gate
from .gating import (channel_dot, channel_gate, channel_gate_add,
                     channel_scale_shift, global_mean_gate)
from .utils import (check_choice, check_init_cfg, check_layer_cfg,
                    check_positive_int, check_size, eval_affine, hooked,
                    normalize, resample_to, size_generic_path)

VARIANTS = ('parameter_free', 'depthwise', 'depthwise_excite')
EXTENTS = (2, 4, 8, 'global')


@MODELS.register_module()
class GatherExcite(BaseModule):
    """Gather-Excite: rescale a feature map by a gate from gathered context,
    ``y = x * sigmoid(excite(gather(x)))``.

    Variants (the paper's names in brackets):

    - ``'parameter_free'`` (GE-θ⁻): gather is average pooling over windows of
      ``extent`` x ``extent`` (or the whole map); no parameters.
    - ``'depthwise'`` (GE-θ): gather is a depthwise conv (no bias) + BN. For a
      global extent one depthwise conv whose kernel covers the whole
      reference feature map; for extent e, log2(e) stride-2 depthwise 3x3
      convs with BN and ReLU between them.
    - ``'depthwise_excite'`` (GE-θ⁺): GE-θ's gather, ReLU, then an SE-style
      excite: 1x1 conv C -> C/``reduction`` (bias), ReLU, 1x1 conv back to C.

    The gathered map is expanded back to the input size (each pixel takes its
    window's value), passed through a sigmoid and multiplies the input. At
    other sizes than the reference, a global depthwise gather first resamples
    the map to the reference size (adaptive average pooling), so its kernel
    always covers the whole map; at the reference size this is exact.

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
            self.gather = nn.Conv2d(
                channels, channels, feature_size, groups=channels, bias=False)
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

    def _window_mean(self, x):
        """Mean over each extent x extent window; a partial window at the
        border is its own window (``avg_pool2d`` with ``ceil_mode``)."""
        extent = self.extent
        if not size_generic_path(x):
            return F.avg_pool2d(x, extent, extent, ceil_mode=True)
        # Size-generic form for traced / exported graphs (torch.export
        # cannot prove ceil_mode's output-size rule for a symbolic size):
        # weight each pixel by 1 / its window's pixel count, zero-pad to
        # whole windows and sum (avg_pool2d * extent**2, exact for a power
        # of two). Equal to the eager result up to float rounding.
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        row_count = (height - rows // extent * extent).clamp(max=extent)
        col_count = (width - cols // extent * extent).clamp(max=extent)
        weight = 1 / (row_count[:, None] * col_count[None, :]).to(x.dtype)
        pad = (0, (-width) % extent, 0, (-height) % extent)
        return F.avg_pool2d(F.pad(x * weight, pad), extent, extent) * (
            extent * extent)

    def _expand(self, gate, x):
        """Each pixel of ``x`` takes its window's gate (windows are extent
        wide; the last one may be cut by the border)."""
        if not size_generic_path(x):
            height, width = x.shape[-2:]
            return F.interpolate(gate, scale_factor=self.extent,
                                 mode='nearest')[..., :height, :width]
        # The same copy, with output sizes that are exactly x's (symbolic)
        # sizes: pixel i takes window i // extent.
        rows = torch.arange(x.shape[-2], device=x.device) // self.extent
        cols = torch.arange(x.shape[-1], device=x.device) // self.extent
        return gate.index_select(2, rows).index_select(3, cols)

    def _global_dot(self, x):
        """The global depthwise gather without its norm: each channel of
        ``x``, resampled to ``feature_size``, dotted with its kernel (a
        depthwise conv whose kernel covers the map is a per-channel dot
        product, several times faster on CPU as one). Inference away from
        the reference size pools and dots in one read of the map
        (:func:`mmctx.models.norm_gate.pooled_dot`)."""
        kernel = self.gather.weight.squeeze(1)
        if norm_gate.pooled_dot_applies(x, kernel, self.feature_size):
            return norm_gate.pooled_dot(x, kernel)
        return channel_dot(resample_to(x, self.feature_size), kernel)

    def _gather(self, x):
        if self.variant == 'parameter_free':
            if self.extent == 'global':
                return x.mean((2, 3), keepdim=True)
            return self._window_mean(x)
        if self.extent == 'global':
            context = self._global_dot(x)
            return normalize(self.gather_norms[0], context[..., None, None])
        for i, (conv, norm) in enumerate(zip(self.gather, self.gather_norms)):
            if i:
                x = F.relu(x)
            x = normalize(norm, conv(x))
        return x

    def forward_after_norm(self, x, norm):
        """``self(norm(x))`` for an eval-mode, affine BatchNorm ``norm``, with
        the norm folded into the gate (inference only; global extent).

        The norm is a per-channel affine map ``a x + b``, so its output's
        gathered context follows from ``x``'s (a mean or a kernel sum is
        linear, and resampling keeps constants) and the gated output
        ``(a x + b) g`` is one multiply-add over ``x``: the separate pass of
        the norm over the map is saved. Equal to ``self(norm(x))`` up to
        float rounding.
        """
        return channel_scale_shift(x, *self.folded_gate(x, norm))

    def folded_gate(self, x, norm, loops=None):
        """(B, C, 1, 1) ``scale`` and ``shift`` with ``self(norm(x)) = x *
        scale + shift``, for an eval-mode, affine BatchNorm ``norm`` (global
        extent): the norm's ``a``, ``b`` times the gate of ``a x + b``'s
        context, computed from ``x``'s. ``loops``: the compiled loops, from
        a caller that has established eager inference on contiguous float
        CPU maps (:func:`mmctx.models.norm_gate.inference_applies`); then
        GE-θ and θ⁺ compute the gate from the map's dot products in one
        C++ call (:meth:`_folded_gate_loops`)."""
        if loops is not None and self._gate_loops_apply(x):
            folded = self._folded_gate_loops(x, norm, loops)
            if folded is not None:
                return folded
        scale, shift = eval_affine(norm)
        if self.variant == 'parameter_free':
            context = x.mean((2, 3)) * scale + shift
        else:
            kernel = self.gather.weight.squeeze(1)
            context = self._global_dot(x) * scale + shift * kernel.sum((1, 2))
            context = normalize(self.gather_norms[0],
                                context[..., None, None])
        gate = self._gate_of_context(context.view(*x.shape[:2], 1, 1))
        return scale.view(1, -1, 1, 1) * gate, shift.view(1, -1, 1, 1) * gate

    def _gate_loops_apply(self, x):
        """Whether :meth:`_folded_gate_loops` may compute the gate on ``x``
        (in eager inference, the loops compiled): GE-θ or θ⁺ with an eval,
        affine gather BatchNorm with running statistics, plain excite
        convs, none hooked, weights in ``x``'s dtype."""
        if self.variant == 'parameter_free' \
                or self.gather.weight.dtype != x.dtype:
            return False
        gather_norm = self.gather_norms[0]
        if not isinstance(gather_norm, _BatchNorm) or gather_norm.training \
                or not gather_norm.affine \
                or gather_norm.running_mean is None or hooked(gather_norm):
            return False
        if self.variant == 'depthwise':
            return True
        squeeze, relu, expand = self.excite
        return (type(squeeze) is nn.Conv2d and type(expand) is nn.Conv2d
                and type(relu) is nn.ReLU
                and squeeze.bias is not None and expand.bias is not None
                and squeeze.weight.dtype == expand.weight.dtype == x.dtype
                and not hooked(self.excite) and not hooked(squeeze)
                and not hooked(relu) and not hooked(expand))

    def _folded_gate_loops(self, x, norm, loops):
        """:meth:`folded_gate` where :meth:`_gate_loops_apply`: the map's
        dot products with the kernel and the kernel's sums in one read
        (``channel_dots``, or ``pooled_dot`` away from the reference size),
        then the context, the gather norm, the gate and its product with
        the norm's affine map in one call (``global_gate_scale_shift``).
        Equal to the tensor ops up to float rounding. None where a norm's
        tensors are not contiguous tensors of ``x``'s dtype."""
        gather_norm = self.gather_norms[0]
        norms = [norm.weight, norm.bias, norm.running_mean, norm.running_var,
                 gather_norm.weight, gather_norm.bias,
                 gather_norm.running_mean, gather_norm.running_var]
        if any(t.dtype != x.dtype or not t.is_contiguous() for t in norms):
            return None
        kernel = self.gather.weight.squeeze(1)
        kernel_sums = x.new_empty(x.shape[1], dtype=torch.float64)
        if tuple(x.shape[-2:]) == self.feature_size:
            dots = loops.channel_dots(x, kernel, kernel_sums)
        else:
            dots = loops.pooled_dot(x, kernel, kernel_sums)
        excite = []
        if self.variant == 'depthwise_excite':
            squeeze, _, expand = self.excite
            excite = [squeeze.weight, squeeze.bias, expand.weight,
                      expand.bias]
        scale, shift = loops.global_gate_scale_shift(
            dots, kernel_sums, norms[:4], norm.eps, norms[4:],
            gather_norm.eps, excite, x.dtype)
        return (scale.view(*x.shape[:2], 1, 1),
                shift.view(*x.shape[:2], 1, 1))

    def _excite(self, context):
        """``self.excite(context)``. On a (B, C, 1, 1) context (global
        extent) eager code runs its two 1x1 convs as ``F.linear`` on (B, C)
        with the convs' own weights: oneDNN's conv costs several times more
        on a 1x1 map, mostly per call (forward + backward, C = 2048, batch
        8: 4.6 vs 0.8 ms on 2 CPU threads). Equal up to float rounding.
        Traced / exported graphs and hooked convs keep the convs."""
        squeeze, _, expand = self.excite
        if size_generic_path(context) or context.shape[-2:] != (1, 1) \
                or any(hooked(m) for m in self.excite.modules()):
            return self.excite(context)
        hidden = F.relu(F.linear(context.flatten(1),
                                 squeeze.weight.flatten(1), squeeze.bias))
        return F.linear(hidden, expand.weight.flatten(1),
                        expand.bias).view(context.shape)

    def _gate_of_context(self, context):
        if self.variant == 'depthwise_excite':
            context = self._excite(F.relu(context))
        return context.sigmoid()

    def gate_from_dot(self, dot):
        """A global depthwise gate (GE-θ, GE-θ⁺) from its gather's dot
        products before their norm, (B, C) -> (B, C); the fused training
        tail of :mod:`mmctx.models.norm_gate` computes those itself."""
        context = normalize(self.gather_norms[0], dot[..., None, None])
        return self._gate_of_context(context).flatten(1)

    def _gate(self, x):
        gate = self._gate_of_context(self._gather(x))
        return gate if self.extent == 'global' else self._expand(gate, x)

    def forward(self, x):
        if self.variant == 'parameter_free' and self.extent == 'global':
            return global_mean_gate(x)  # one fused op in training
        gate = self._gate(x)
        if self.extent != 'global':
            return x * gate
        return channel_gate(x, gate)

    def forward_residual(self, x, identity):
        """``identity + self(x)``, the gate and a residual block's add in
        one pass over the map (used by the mmctx bottlenecks)."""
        if self.variant == 'parameter_free' and self.extent == 'global':
            return global_mean_gate(x, identity)
        gate = self._gate(x)
        if self.extent != 'global':
            return torch.addcmul(identity, x, gate)
        return channel_gate_add(x, gate, identity)

    def tail_applies(self, norm, z, identity):
        """Whether :meth:`forward_tail` may run here: a global gate after a
        training-mode BatchNorm, on contiguous float CPU maps, in eager code
        (:func:`mmctx.models.norm_gate.applies`)."""
        return self.extent == 'global' and norm_gate.applies(
            norm, z, identity, self)

    def forward_tail(self, z, identity, norm):
        """``relu(identity + self(norm(z)))`` as one function over C++ row
        loops: a bottleneck's tail in training
        (:mod:`mmctx.models.norm_gate`). Call only where
        :meth:`tail_applies`."""
        return norm_gate.norm_gate_add_relu(z, identity, norm, self)

    def inference_tail_applies(self, norm, z, identity):
        """Whether :meth:`forward_inference_tail` may run here: a global
        gate after an eval-mode BatchNorm, on contiguous float CPU maps, in
        eager code without autograd
        (:func:`mmctx.models.norm_gate.inference_applies`)."""
        return norm_gate.inference_applies(norm, z, identity, self)

    def forward_inference_tail(self, z, identity, norm, in_place=False):
        """``relu(identity + self(norm(z)))`` in inference: the norm folded
        into the gate, then one pass over the map
        (:func:`mmctx.models.norm_gate.norm_gate_add_relu_inference`), into
        ``z`` itself with ``in_place``. Call only where
        :meth:`inference_tail_applies`."""
        return norm_gate.norm_gate_add_relu_inference(z, identity, norm, self,
                                                      in_place)
