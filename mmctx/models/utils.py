"""Helpers shared by the modules: argument checks that fail at construction
by name, a batch-size-safe norm call, and resampling to a reference grid."""
import numbers

import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def check_positive_int(name, value):
    """Raise ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def check_choice(name, value, choices):
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f'{name} must be one of {", ".join(map(repr, choices))}, '
            f'got {value!r}')


def check_stage_flags(name, flags, num_stages):
    """Raise ValueError unless ``flags`` is a bool per stage."""
    if not isinstance(flags, (tuple, list)) or len(flags) != num_stages:
        raise ValueError(
            f'{name} must be a tuple of {num_stages} bools (one per stage), '
            f'got {flags!r}')
    return tuple(bool(f) for f in flags)


def normalize(norm, x):
    """Apply ``norm``; a BatchNorm that would see a single value per channel
    (batch 1 of a 1x1 map in training) uses its running statistics instead.

    Batch statistics of one value are undefined (PyTorch raises), and global
    gathers produce exactly such maps, so this keeps every input size usable.
    """
    if (norm.training and isinstance(norm, _BatchNorm)
            and x.numel() == x.shape[1]):
        return F.batch_norm(x, norm.running_mean, norm.running_var,
                            norm.weight, norm.bias, False, 0.0, norm.eps)
    return norm(x)


def resample_to(x, size):
    """Average-pool ``x`` to the spatial ``size`` (identity if already so).

    Layers whose weights span a fixed grid (global depthwise gathers, PSI's
    patch MLP) see every input through this, so any H x W maps onto the grid
    they were built for and the reference size is left untouched.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)
