from .cifar_resnet import CifarResNet
from .context_resnet import ContextResNet
from .ge_resnet import GEResNet
from .psi_resnet import PSIResNet
from .sb_resnet import SBBottleneck, SBResNet

__all__ = [
    'ContextResNet', 'SBBottleneck', 'SBResNet', 'CifarResNet', 'GEResNet',
    'PSIResNet'
]
