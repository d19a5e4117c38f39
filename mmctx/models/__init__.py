from .backbones import *  # noqa: F401,F403
from .gather_excite import GatherExcite
from .patch_spatial_interaction import PatchSpatialInteraction
from .spatial_bias import SpatialBias

__all__ = [
    'SpatialBias', 'GatherExcite', 'PatchSpatialInteraction', 'SBResNet',
    'SBBottleneck', 'CifarResNet', 'GEResNet', 'PSIResNet', 'ContextResNet'
]
