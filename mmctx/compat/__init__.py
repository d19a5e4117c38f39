"""Fixes that let the OpenMMLab 2.x stack (mmengine 0.10.7, mmcv 2.1.0, mmdet
3.3.0, mmseg 1.2.2, mmpretrain 1.2.0) run on current torch and on machines
without CUDA, one module each:

- :mod:`.checkpoint` -- mmengine's checkpoint loads run under a small,
  validating weights-only allowlist (scoped to those loads), name the file in
  every error, and ``--resume`` with nothing to resume warns loudly;
- :mod:`.cpu_distributed` -- gloo / ``device_ids=None`` / BN instead of SyncBN
  when CUDA is unavailable;
- :mod:`.mmpretrain_without_torchvision` -- mmpretrain imports without
  torchvision.

Applied once when ``mmctx`` is imported -- by our ``tools/*.py`` and by the
stock mmdet/mmseg/mmpretrain tools through ``custom_imports`` (the config is
parsed, and mmctx imported, before the Runner initialises distributed
training or loads a checkpoint). Every fix is idempotent.
"""
from .checkpoint import (CheckpointError, CheckpointNotFoundError,
                         load_checkpoint_file, mmengine_checkpoint_globals,
                         patch_mmengine_loading, torchvision_model_urls)
from .cpu_distributed import patch_cpu_distributed
from .mmpretrain_without_torchvision import (
    TORCHVISION_USERS, allow_mmpretrain_without_torchvision)

__all__ = [
    'apply', 'CheckpointError', 'CheckpointNotFoundError',
    'load_checkpoint_file', 'torchvision_model_urls',
    'mmengine_checkpoint_globals', 'patch_mmengine_loading',
    'patch_cpu_distributed', 'allow_mmpretrain_without_torchvision',
    'TORCHVISION_USERS'
]


def apply() -> None:
    """Apply all fixes (each is idempotent)."""
    patch_mmengine_loading()
    patch_cpu_distributed()
    allow_mmpretrain_without_torchvision()


apply()
