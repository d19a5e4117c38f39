"""Helpers shared by the modules: argument checks that fail at construction
by name, a batch-size-safe norm call, and adaptive pooling that compiles and
exports at any input size."""
import numbers
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


# Every check raises ValueError (also for a value of the wrong type), with a
# message that starts with the argument's name and says what is accepted: one
# exception type to catch for any bad argument, raised at construction.


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name, value, min_value=None, max_value=None):
    """Return ``value`` as an int; raise ValueError unless it is an integer
    (not a bool, not a float such as ``2.0``) in [min_value, max_value]."""
    if _is_int(value) and (min_value is None or value >= min_value) and \
            (max_value is None or value <= max_value):
        return int(value)
    if min_value is not None and max_value is not None:
        accepted = f'an int in [{min_value}, {max_value}]'
    elif min_value is not None:
        accepted = f'an int >= {min_value}'
    elif max_value is not None:
        accepted = f'an int <= {max_value}'
    else:
        accepted = 'an int'
    raise ValueError(f'{name} must be {accepted}, got {value!r}')


def check_positive_int(name, value):
    """Return ``value``; raise ValueError unless it is an int >= 1 (a bool or
    a float such as ``2.0`` is not an int)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    return int(value)


def check_real(name, value, low, high, low_open=True):
    """Return ``value`` as a float; raise ValueError unless it is a real
    number (not a bool) in (low, high] (or [low, high] if not low_open)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        above = value > low if low_open else value >= low
        if above and value <= high:
            return float(value)
    interval = f'{"(" if low_open else "["}{low}, {high}]'
    raise ValueError(f'{name} must be a number in {interval}, got {value!r}')


def check_bool(name, value):
    """Return ``value``; raise ValueError unless it is a bool (an int or a
    string is not a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value


def check_choice(name, value, choices):
    """Return the matching choice; raise ValueError unless ``value`` is one of
    ``choices`` with the same type (``2.0`` or ``True`` is not ``2``, ``'2'``
    is not ``2``)."""
    for choice in choices:
        same_kind = isinstance(value, str) if isinstance(choice, str) \
            else _is_int(value) if _is_int(choice) else type(value) is type(
                choice)
        if same_kind and value == choice:
            return choice
    raise ValueError(
        f'{name} must be one of {", ".join(map(repr, choices))}, '
        f'got {value!r}')


def check_stage_flags(name, flags, num_stages, default=None):
    """Return ``flags`` as a tuple; raise ValueError unless it is a tuple or
    list of ``num_stages`` bools (``1`` or ``'yes'`` is not a flag).
    ``flags=None`` takes ``default(num_stages)`` (when given): defaults that
    follow ``num_stages``."""
    if flags is None and default is not None:
        flags = default(num_stages)
    if not isinstance(flags, (tuple, list)) or len(flags) != num_stages \
            or not all(isinstance(f, bool) for f in flags):
        raise ValueError(
            f'{name} must be a tuple of {num_stages} bools (one per stage), '
            f'got {flags!r}')
    return tuple(flags)


def check_size(name, value):
    """Return ``value`` as an (H, W) pair; raise ValueError unless it is a
    positive int or a tuple / list of two positive ints."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or \
            not all(_is_int(v) and v >= 1 for v in value):
        raise ValueError(f'{name} must be a positive int or a pair (H, W) of '
                         f'positive ints, got {value!r}')
    return tuple(int(v) for v in value)


def check_layer_cfg(name, cfg, optional=False):
    """Raise ValueError unless ``cfg`` is a dict with a ``type`` key (or None
    when ``optional``)."""
    if cfg is None and optional:
        return
    if not isinstance(cfg, dict) or 'type' not in cfg:
        accepted = 'None or ' if optional else ''
        raise ValueError(f'{name} must be {accepted}a dict with a "type" key, '
                         f'e.g. dict(type=\'BN\'), got {cfg!r}')


def check_init_cfg(name, cfg):
    """Raise ValueError unless ``cfg`` is None, a dict or a list of dicts."""
    if cfg is None or isinstance(cfg, dict) or (
            isinstance(cfg, list) and all(isinstance(c, dict) for c in cfg)):
        return
    raise ValueError(
        f'{name} must be None, a dict or a list of dicts, got {cfg!r}')


def check_cfg_keys(name, cfg, accepted, derived=()):
    """Raise ValueError unless ``cfg`` is a dict whose keys are all in
    ``accepted``; keys in ``derived`` are named as set by the caller."""
    if not isinstance(cfg, dict):
        raise ValueError(f'{name} must be a dict, got {cfg!r}')
    clash = sorted(set(cfg) & set(derived))
    if clash:
        raise ValueError(f'{name} must not set {clash}: the backbone derives '
                         'them')
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f'{name} has unknown keys {unknown}; accepted keys: '
                         f'{sorted(accepted)}')

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


def _pool_windows(in_size, out_size, like):
    """(out_size, in_size) bool mask of adaptive pooling's windows along one
    axis (window i covers inputs [floor(i n / m), ceil((i + 1) n / m)), as
    in ``F.adaptive_avg_pool2d``), and each window's length. ``in_size``
    may be symbolic: only tensor arithmetic touches it."""
    rows = torch.arange(out_size, device=like.device)
    start = torch.div(rows * in_size, out_size, rounding_mode='floor')
    end = torch.div((rows + 1) * in_size + out_size - 1, out_size,
                    rounding_mode='floor')
    cols = torch.arange(in_size, device=like.device)
    return (cols >= start[:, None]) & (cols < end[:, None]), end - start


def adaptive_avg_pool2d(x, size):
    """``F.adaptive_avg_pool2d(x, size)`` as two products with pooling
    matrices built from x's size: exactly the identity at x's own size, and
    one graph for every size under ``torch.compile`` and ``torch.export``
    (inductor specialises its adaptive pooling on the input size; ONNX has
    none for a size known at run time). Meant for maps of few channels."""
    rows, row_len = _pool_windows(x.shape[-2], size[0], x)
    cols, col_len = _pool_windows(x.shape[-1], size[1], x)
    rows = rows.to(x.dtype) / row_len[:, None].to(x.dtype)  # (h, H)
    cols = cols.to(x.dtype) / col_len[:, None].to(x.dtype)  # (w, W)
    # Plain 2-D products over reshaped maps: matmul's batch broadcasting
    # would make torch.export ask whether a side is 1.
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    x = torch.mm(x.reshape(-1, width), cols.t())  # (.. H, w)
    x = x.view(*lead, height, size[1]).transpose(-1, -2).clone(
        memory_format=torch.contiguous_format)  # (.. w, H)
    x = torch.mm(x.view(-1, height), rows.t())  # (.. w, h)
    return x.view(*lead, size[1], size[0]).transpose(-1, -2)


def adaptive_max_pool2d(x, size):
    """``F.adaptive_max_pool2d(x, size)`` (values) as masked maxima over
    each axis's windows, for the same reasons as
    :func:`adaptive_avg_pool2d`."""
    rows, _ = _pool_windows(x.shape[-2], size[0], x)
    cols, _ = _pool_windows(x.shape[-1], size[1], x)
    low = torch.finfo(x.dtype).min
    x = torch.where(cols, x[..., None, :], low).amax(-1)  # (.., H, w)
    x = torch.where(rows, x.transpose(-1, -2)[..., None, :], low).amax(-1)
    return x.transpose(-1, -2)  # (.., h, w)


def built_as_plugin(max_depth=4):
    """Whether the module under construction is being built by mmcv's
    ``build_plugin_layer``, i.e. as a stock ResNet plugin.

    mmdet's and mmseg's ``Bottleneck.make_block_plugins`` build every entry
    of ``plugins`` with ``build_plugin_layer(cfg, in_channels=...)``: the
    plugin gets its config and ``in_channels``, never its ``position``. It
    does not need it to know whether it can work there: at all three
    positions (``after_conv1/2/3``) the block feeds the plugin's output to a
    layer built for ``in_channels`` (conv2, conv3, the residual add), so a
    stock plugin must keep its input's shape. A module whose output does not
    (a concatenating SpatialBias) checks this at construction instead of
    failing with a shape error in the first forward. The check compares code
    objects of the few frames above the constructor (no name matching), so it
    holds for every caller of ``build_plugin_layer``.
    """
    from mmcv.cnn import build_plugin_layer
    code = build_plugin_layer.__code__
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_code is code:
            return True
    return False


# --- norms of a channel count the backbone's norm_cfg was not made for --------
# SB adds num_bias channels to conv2's output and squeezes its input to
# num_bias + 2: a per-channel norm (BN, SyncBN, IN) takes any count; a
# GroupNorm's groups must divide it.
def norm_kind(name, norm_cfg):
    """'per_channel' (BN, SyncBN, IN and their subclasses) or 'group'
    (GroupNorm) for ``norm_cfg``; ValueError naming ``name`` otherwise."""
    from mmengine.registry import MODELS
    check_layer_cfg(name, norm_cfg)
    cls = MODELS.get(norm_cfg['type'])
    if isinstance(cls, type) and issubclass(
            cls, (_BatchNorm, _InstanceNorm, nn.SyncBatchNorm)):
        return 'per_channel'
    if isinstance(cls, type) and issubclass(cls, nn.GroupNorm):
        return 'group'
    raise ValueError(
        f'{name} must be a per-channel norm (BN, SyncBN, IN, ...) or a '
        f"GroupNorm ('GN'): the context modules normalise channel counts "
        f'the norm was not configured for; got {norm_cfg!r}')


def check_norm_channels(name, norm_cfg, channels):
    """ValueError naming ``name`` unless ``norm_cfg`` can normalise
    ``channels`` channels (a GroupNorm's num_groups must divide them)."""
    if norm_kind(name, norm_cfg) == 'group':
        groups = norm_cfg.get('num_groups')
        if not _is_int(groups) or groups < 1 or channels % groups:
            raise ValueError(
                f'{name}: GroupNorm num_groups must divide the {channels} '
                f'channels it normalises here (e.g. num_groups=1), got '
                f'{norm_cfg!r}')


class ConcatNorm(nn.Module):
    """A norm of a concatenation ``cat([a, b], 1)`` that normalises ``a``'s
    channels with ``main`` and ``b``'s with ``extra``: SB's bn2 under
    GroupNorm, where conv2's channels keep the backbone's GN and the bias
    maps get a norm of their own (a GN's groups cannot span both)."""

    def __init__(self, main, main_channels, extra):
        super().__init__()
        self.main, self.extra = main, extra
        self.main_channels = main_channels

    def forward(self, x):
        c = self.main_channels
        return torch.cat([self.main(x[:, :c]), self.extra(x[:, c:])], 1)
