"""GE-ResNet: upstream ResNet with a GatherExcite plugin after conv3 + bn3 of
every bottleneck (Hu et al., NeurIPS 2018)."""
import torch
from mmdet.models.backbones.resnet import Bottleneck
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils import hooked, size_generic_path
from .context_resnet import ContextResNet
from .gated_bottleneck import GatedBottleneck


class GEBottleneck(GatedBottleneck):
    """Upstream Bottleneck whose inference folds norm3 into a global GE gate
    that directly follows it (:meth:`GatherExcite.forward_after_norm`);
    otherwise a :class:`GatedBottleneck` (in training norm3, a global GE
    gate, the residual add and the ReLU as one function,
    :mod:`mmctx.models.norm_gate`).

    In eval mode without autograd, an eval BatchNorm followed by a global
    GE gate is one multiply-add over the map instead of two passes. The
    upstream forward runs unchanged: while it runs, ``norm3`` passes its
    input through and the first after_conv3 plugin applies both. Training,
    autograd, traced / exported graphs and hooked layers take the plain
    path, and so does autocast (the fold's float32 norm constants would
    change the output dtype); both paths compute the same output
    (``tests/test_fast_paths.py``).
    """

    _fold_norm3 = False

    @property
    def norm3(self):
        if self._fold_norm3:
            return _pass_through
        return getattr(self, self.norm3_name)

    def _can_fold_norm3(self, x):
        if self.training or torch.is_grad_enabled() or not self.with_plugins \
                or not self.after_conv3_plugin_names or size_generic_path(x) \
                or torch.jit.is_tracing():  # FLOP counters: the plain ops
            return False
        if torch.is_autocast_enabled(x.device.type):
            # The fold's float32 norm constants would make the output
            # float32 where the plain path keeps autocast's dtype.
            return False
        norm = getattr(self, self.norm3_name)
        gate = getattr(self, self.after_conv3_plugin_names[0])
        return (isinstance(norm, _BatchNorm) and not norm.training
                and norm.affine and norm.running_mean is not None
                and hasattr(gate, 'forward_after_norm')
                and gate.extent == 'global'
                and not hooked(norm) and not hooked(gate))

    def forward(self, x):
        if not self._can_fold_norm3(x) or self._inference_tail_may_fuse(
                self.residual_gate(x)):  # the fused tail folds it too
            return super().forward(x)
        self._fold_norm3 = True
        try:
            return Bottleneck.forward(self, x)
        finally:
            self._fold_norm3 = False

    def forward_plugin(self, x, plugin_names):
        if self._fold_norm3 and plugin_names is \
                self.after_conv3_plugin_names:
            gate, *plugin_names = plugin_names
            x = getattr(self, gate).forward_after_norm(
                x, getattr(self, self.norm3_name))
        return super().forward_plugin(x, plugin_names)


def _pass_through(x):
    return x


@MODELS.register_module()
class GEResNet(ContextResNet):
    """ResNet with Gather-Excite on the residual branch (``after_conv3``).

    A global depthwise gather's kernel covers its stage's whole feature map
    at the reference input size (56/28/14/7 for ResNet-50 at 224); the
    backbone derives each stage's size from ``reference_input_size`` and the
    strides, and any other input size works (see
    :class:`mmctx.models.GatherExcite`).

    Args:
        depth (int): ResNet depth (50, 101, ...).
        ge (dict): :class:`mmctx.models.GatherExcite` arguments: ``variant``
            ('parameter_free' = GE-θ⁻, 'depthwise' = GE-θ,
            'depthwise_excite' = GE-θ⁺), ``extent`` (2, 4, 8, 'global'),
            ``reduction``.
        stage_with_ge (tuple[bool]): Stages with GE (all four in the paper).
        reference_input_size (int | tuple[int]): Input size the global
            gathers are built for (224 for ImageNet).
        **kwargs: Upstream ResNet arguments; ``plugins`` are kept and come
            after GE.
    """

    bottleneck = GEBottleneck

    def __init__(self,
                 depth,
                 ge=dict(variant='parameter_free', extent='global'),
                 stage_with_ge=(True, True, True, True),
                 reference_input_size=224,
                 plugins=None,
                 **kwargs):
        own = self.size_bound_plugins(
            'GatherExcite', 'ge', ge, 'stage_with_ge',
            stage_with_ge, reference_input_size, depth, kwargs)
        if plugins is not None and not isinstance(plugins, (list, tuple)):
            raise ValueError(
                f'plugins must be None or a list of dicts, got {plugins!r}')
        super().__init__(depth, plugins=own + list(plugins or []), **kwargs)
