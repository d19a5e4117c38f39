from .backbones import (CifarResNet, ContextResNet, GEResNet, PSIResNet,
                        SBBottleneck, SBResNet)
from .gather_excite import GatherExcite
from .patch_spatial_interaction import PatchSpatialInteraction
from .spatial_bias import SpatialBias

__all__ = [
    'SpatialBias', 'GatherExcite', 'PatchSpatialInteraction', 'SBResNet',
    'SBBottleneck', 'CifarResNet', 'GEResNet', 'PSIResNet', 'ContextResNet'
]
