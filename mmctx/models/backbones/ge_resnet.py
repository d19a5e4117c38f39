"""GE-ResNet: upstream ResNet with a GatherExcite plugin after conv3 + bn3 of
every bottleneck (Hu et al., NeurIPS 2018)."""
from mmengine.registry import MODELS

from .context_resnet import (ContextResNet, ContextResNetV1c,
                             ContextResNetV1d, ContextResNeXt)


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
        stage_with_ge (tuple[bool] | None): Stages with GE; None: every
            stage of ``num_stages`` (all four in the paper).
        reference_input_size (int | tuple[int]): Input size the global
            gathers are built for (224 for ImageNet).
        **kwargs: Upstream ResNet arguments; ``plugins`` are kept and come
            after GE.
    """

    def __init__(self,
                 depth,
                 ge=dict(variant='parameter_free', extent='global'),
                 stage_with_ge=None,
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


@MODELS.register_module()
class GEResNetV1c(GEResNet, ContextResNetV1c):
    """GEResNet with ResNetV1c's deep stem (:class:`ContextResNetV1c`)."""


@MODELS.register_module()
class GEResNetV1d(GEResNet, ContextResNetV1d):
    """GEResNet with ResNetV1d's deep stem and average-pool shortcuts
    (:class:`ContextResNetV1d`)."""


@MODELS.register_module()
class GEResNeXt(GEResNet, ContextResNeXt):
    """GE-ResNeXt: upstream ResNeXt (``groups``, ``base_width``) with
    GE after conv3 (whose output is a ResNet's) in every block of the
    stages of ``stage_with_ge``."""
