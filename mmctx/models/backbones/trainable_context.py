"""Frozen stages freeze pretrained weights, not context: what the mmctx
ResNets change in upstream ResNet's ``frozen_stages`` and ``norm_eval``."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..gather_excite import GatherExcite
from ..patch_spatial_interaction import PatchSpatialInteraction
from ..spatial_bias import SpatialBias
from ..utils import ConcatNorm
from .pretrained_slices import (context_parameters,
                                editable_pretrained_slices, is_split)

# The mmctx context modules, as backbone parts or as plugins.
CONTEXT_MODULES = (SpatialBias, GatherExcite, PatchSpatialInteraction)


class TrainableContextMixin:
    """Upstream ResNet's ``frozen_stages`` and ``norm_eval``, applied to what
    a stock ResNet checkpoint provides, and only to that.

    ``frozen_stages=k`` freezes exactly what it freezes in a plain ResNet:
    the stem and stages 1..k, their parameters (``requires_grad=False``) and
    their BN statistics (eval mode). The mmctx context modules in those stages
    (:class:`SpatialBias`, :class:`GatherExcite`,
    :class:`PatchSpatialInteraction`, as backbone parts or plugins) keep
    training, and so do the parts of pretrained layers that SB widened: conv3's
    input columns and bn2's weight and bias entries of the bias channels (held
    as separate parameters, see :mod:`.pretrained_slices`; the state dict is
    unchanged). Other plugins (NonLocal2d, ContextBlock, ...) in frozen stages
    are frozen with their stage, as upstream.

    ``norm_eval=True`` keeps the pretrained BN statistics fixed. The norm
    layers inside context modules have none to keep (they start at mean 0,
    variance 1): they normalise with their running statistics like every
    other BN under ``norm_eval`` (so an image's output does not depend on its
    batch companions, and a global gather, one value per image and channel,
    works at any batch size), but they keep estimating those statistics from
    every training batch: the first batches replace the defaults by their
    average, then the norm's moving average takes over (a batch of one value
    per channel is skipped). The bias entries of SB's bn2 belong to that
    pretrained layer and keep its running statistics (mean 0, variance 1: a
    learnt affine); their weight and bias train. README, "Fine-tuning from a
    stock ResNet", has the measured effect.
    """

    def _freeze_stages(self):
        if '_trainable_context' not in self.__dict__:
            # First call, from upstream __init__: the layers exist now.
            for layer in self._frozen_layers():
                for block in layer:
                    separate = getattr(block, 'separate_pretrained_slices',
                                       None)
                    if separate is not None:
                        separate()
            trainable = {
                id(p) for p in self._context_parameters() if p.requires_grad
            }
            # Names, not objects: `.to()` or `assign=True` loads may replace
            # the parameter objects.
            self._trainable_context = [
                name for name, p in self.named_parameters()
                if id(p) in trainable
            ]
            for module in self._context_modules():
                for norm in module.modules():
                    if isinstance(norm, _BatchNorm):
                        norm.updates_stats_in_eval = False
                        norm.register_forward_pre_hook(_update_running_stats)
        super()._freeze_stages()
        params = dict(self.named_parameters())
        for name in self._trainable_context:
            params[name].requires_grad = True
        for layer in self._frozen_layers():
            for module in layer.modules():
                if isinstance(module, CONTEXT_MODULES):
                    module.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for module in self._context_modules():
            for norm in module.modules():
                if isinstance(norm, _BatchNorm):
                    norm.updates_stats_in_eval = mode and self.norm_eval
        return self

    def init_weights(self):
        # Initialisers write into `conv.weight` in place: give them the whole
        # tensors of the split layers.
        with editable_pretrained_slices(self):
            super().init_weights()

    def _frozen_layers(self):
        return [
            getattr(self, f'layer{i}')
            for i in range(1, self.frozen_stages + 1)
        ]

    def _context_modules(self):
        return [m for m in self.modules() if isinstance(m, CONTEXT_MODULES)]

    def _context_parameters(self):
        """Context parameters of the frozen stages (to keep trainable)."""
        params = []
        for layer in self._frozen_layers():
            for module in layer.modules():
                if isinstance(module, CONTEXT_MODULES):
                    params += list(module.parameters())
                elif isinstance(module, ConcatNorm):  # SB's bn2 under GN
                    params += list(module.extra.parameters())
                elif is_split(module):
                    params += context_parameters(module)
        return params


def _update_running_stats(norm, inputs):
    """Forward pre-hook of the BNs in context modules: under ``norm_eval``
    (eval mode while the backbone trains) update the running statistics from
    the batch before normalising with them."""
    if norm.training or not norm.updates_stats_in_eval \
            or norm.running_mean is None:
        return
    x = inputs[0]
    if x.numel() // x.shape[1] < 2:
        return  # one value per channel has no variance
    with torch.no_grad():
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.float(), dims, correction=1)
        norm.num_batches_tracked += 1
        # The first batches replace the defaults (mean 0, variance 1, no
        # information) by their average, then the usual moving average
        # takes over; statistics learnt before (a context-pretrained
        # checkpoint: num_batches_tracked is large) are blended as usual.
        # A tensor weight: no copy of the count to the host.
        momentum = norm.num_batches_tracked.reciprocal().clamp(
            min=norm.momentum or 0.0)
        norm.running_mean.lerp_(mean.to(norm.running_mean),
                                momentum.to(norm.running_mean))
        norm.running_var.lerp_(var.to(norm.running_var),
                               momentum.to(norm.running_var))
