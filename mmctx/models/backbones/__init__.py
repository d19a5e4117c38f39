from .cifar_resnet import CifarResNet
from .context_resnet import (ContextResNet, ContextResNetV1c,
                             ContextResNetV1d, ContextResNeXt)
from .ge_resnet import GEResNet, GEResNetV1c, GEResNetV1d, GEResNeXt
from .psi_resnet import PSIResNet, PSIResNetV1c, PSIResNetV1d, PSIResNeXt
from .sb_resnet import (SBBottleneck, SBResNet, SBResNetV1c, SBResNetV1d,
                        SBResNeXt, SBXBottleneck)

__all__ = [
    'ContextResNet', 'ContextResNetV1c', 'ContextResNetV1d', 'ContextResNeXt',
    'SBBottleneck', 'SBXBottleneck', 'SBResNet', 'SBResNetV1c', 'SBResNetV1d',
    'SBResNeXt', 'GEResNet', 'GEResNetV1c', 'GEResNetV1d', 'GEResNeXt',
    'PSIResNet', 'PSIResNetV1c', 'PSIResNetV1d', 'PSIResNeXt', 'CifarResNet'
]
