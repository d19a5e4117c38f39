from .backbones import (CifarResNet, ContextResNet, ContextResNetV1c,
                        ContextResNetV1d, ContextResNeXt, GEResNet,
                        GEResNetV1c, GEResNetV1d, GEResNeXt, PSIResNet,
                        PSIResNetV1c, PSIResNetV1d, PSIResNeXt, SBBottleneck,
                        SBResNet, SBResNetV1c, SBResNetV1d, SBResNeXt,
                        SBXBottleneck)
from .gather_excite import GatherExcite
from .patch_spatial_interaction import PatchSpatialInteraction
from .spatial_bias import SpatialBias

__all__ = [
    'SpatialBias', 'GatherExcite', 'PatchSpatialInteraction', 'ContextResNet',
    'ContextResNetV1c', 'ContextResNetV1d', 'ContextResNeXt', 'SBBottleneck',
    'SBXBottleneck', 'SBResNet', 'SBResNetV1c', 'SBResNetV1d', 'SBResNeXt',
    'GEResNet', 'GEResNetV1c', 'GEResNetV1d', 'GEResNeXt', 'PSIResNet',
    'PSIResNetV1c', 'PSIResNetV1d', 'PSIResNeXt', 'CifarResNet'
]
