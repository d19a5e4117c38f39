"""PSI-ResNet: upstream ResNet with a PatchSpatialInteraction plugin after
conv3 + bn3 of every bottleneck."""
from mmengine.registry import MODELS

from .context_resnet import (ContextResNet, ContextResNetV1c,
                             ContextResNetV1d, ContextResNeXt)


@MODELS.register_module()
class PSIResNet(ContextResNet):
    """ResNet with Patch Spatial Interaction on the residual branch.

    PSI-ResNet-14 and -26 are ResNet-50-width bottleneck ResNets with one and
    two blocks per stage; 50, 101 and 152 are the usual ones. Each stage's
    patch size follows from its feature size at ``reference_input_size``
    (256 in the reference models: maps 64/32/16/8, patches 4/2/1/1, grids
    16/16/16/8); any other input size works.

    Args:
        depth (int): 14, 26, 50, 101 or 152.
        psi (dict): :class:`mmctx.models.PatchSpatialInteraction` arguments:
            ``grid_size`` (16), ``hidden_ratio`` (0.5).
        stage_with_psi (tuple[bool] | None): Stages with PSI; None: every
            stage of ``num_stages`` (all four).
        reference_input_size (int | tuple[int]): Input size that fixes the
            patch sizes (256).
        **kwargs: Upstream ResNet arguments; ``plugins`` come after PSI.
    """

    def __init__(self,
                 depth,
                 psi=dict(grid_size=16, hidden_ratio=0.5),
                 stage_with_psi=None,
                 reference_input_size=256,
                 plugins=None,
                 **kwargs):
        own = self.size_bound_plugins(
            'PatchSpatialInteraction', 'psi', psi, 'stage_with_psi',
            stage_with_psi, reference_input_size, depth, kwargs)
        if plugins is not None and not isinstance(plugins, (list, tuple)):
            raise ValueError(
                f'plugins must be None or a list of dicts, got {plugins!r}')
        super().__init__(depth, plugins=own + list(plugins or []), **kwargs)


@MODELS.register_module()
class PSIResNetV1c(PSIResNet, ContextResNetV1c):
    """PSIResNet with ResNetV1c's deep stem (:class:`ContextResNetV1c`)."""


@MODELS.register_module()
class PSIResNetV1d(PSIResNet, ContextResNetV1d):
    """PSIResNet with ResNetV1d's deep stem and average-pool shortcuts
    (:class:`ContextResNetV1d`)."""


@MODELS.register_module()
class PSIResNeXt(PSIResNet, ContextResNeXt):
    """PSI-ResNeXt: upstream ResNeXt (``groups``, ``base_width``) with
    PSI after conv3 (whose output is a ResNet's) in every block of the
    stages of ``stage_with_psi``."""
