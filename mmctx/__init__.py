"""mmctx: cheap long-range context modules (Spatial Bias, Gather-Excite,
Patch Spatial Interaction) for OpenMMLab 2.x CNN backbones.

Importing this package registers every module and backbone in mmengine's root
``MODELS`` registry (so mmdet, mmseg and mmpretrain configs find them by type
name) and applies the compatibility fixes of :mod:`mmctx.compat`.
"""
from . import compat  # noqa: F401  (applies the torch/mmengine fixes on import)
from .models import *  # noqa: F401,F403

__version__ = '0.1.0'
