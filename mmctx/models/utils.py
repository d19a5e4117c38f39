"""Helpers shared by the modules: argument checks that fail at construction
by name, a batch-size-safe norm call, and resampling to a reference grid
(with a size-generic path for traced and exported graphs)."""
import contextlib
import functools
import numbers
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


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


def check_stage_flags(name, flags, num_stages):
    """Return ``flags`` as a tuple; raise ValueError unless it is a tuple or
    list of ``num_stages`` bools (``1`` or ``'yes'`` is not a flag)."""
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


def norm_affine(mean, var, weight, bias, eps):
    """BatchNorm with these statistics as ``x * scale + shift`` per
    channel: (invstd, scale, shift), in the tensors' dtype."""
    invstd = (var + eps).rsqrt()
    scale = weight * invstd
    return invstd, scale, bias - mean * scale


def eval_affine(norm, dtype=None, loops=None):
    """An eval-mode, affine BatchNorm with running statistics as ``x *
    scale + shift`` per channel: (scale, shift) in ``dtype`` (default: the
    norm's). Computed at every call: keeping it between calls by the
    tensors' version counters would miss changes made through ``.data``
    (mmengine's EMAHook swaps parameters that way). Where autograd does not
    record and the loops apply, one C++ call computes it in double
    (``norm_scale_shift``); otherwise the tensor ops, in ``dtype``.
    ``loops``: the compiled loops, passed by a caller that has established
    eager inference (no autograd, not traced; e.g. a block's inference
    plan), so that only the norm's tensors are checked."""
    tensors = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    dtype = dtype or tensors[0].dtype
    if loops is None:
        ops = _affine_loops(tensors, dtype)
    else:
        ops = loops if _affine_tensors_fit(tensors, dtype) else None
    if ops is not None:
        return tuple(ops.norm_scale_shift(*tensors, norm.eps,
                                          dtype == torch.float64))
    weight, bias, mean, var = (t.to(dtype) for t in tensors)
    return norm_affine(mean, var, weight, bias, norm.eps)[1:]


def _affine_tensors_fit(tensors, dtype):
    """Whether ``norm_scale_shift`` takes these tensors, asked for in
    ``dtype``: contiguous CPU tensors of one float dtype, that or float64
    asked for."""
    weight = tensors[0]
    kind = weight.dtype
    return (weight.device.type == 'cpu'
            and kind in (torch.float32, torch.float64)
            and dtype in (kind, torch.float64)
            and all(t.dtype == kind and t.is_contiguous() for t in tensors))


def _affine_loops(tensors, dtype):
    """The compiled loops where :func:`eval_affine` may use them: tensors
    that :func:`_affine_tensors_fit`, nothing recorded by autograd, eager
    code (not traced, scripted, compiled or exported)."""
    if not _affine_tensors_fit(tensors, dtype) \
            or (torch.is_grad_enabled()
                and any(t.requires_grad for t in tensors)) \
            or size_generic_path() or torch.jit.is_tracing():
        return None
    from .norm_gate import kernels  # norm_gate imports this module
    return kernels()


def hooked(module):
    """Whether ``module`` has forward (pre-)hooks: fast paths that bypass a
    module's ``forward`` leave hooked modules on their stock path. A
    pre-hook with an ``idle(module)`` attribute that is true for it now
    (it would do nothing, e.g. the context norms' statistics hook outside
    ``norm_eval`` training) does not count."""
    return bool(module._forward_hooks) or any(
        not getattr(hook, 'idle', _never_idle)(module)
        for hook in module._forward_pre_hooks.values())


def _never_idle(module):
    return False


_force_size_generic = [None]


@contextlib.contextmanager
def size_generic(enabled=True):
    """Force the modules' path choice (see :func:`size_generic_path`).

    ``size_generic()`` runs the size-generic path in eager mode too (the
    very ops traced and exported graphs contain; tests compare it with the
    eager fast paths). ``size_generic(False)`` keeps the eager fast paths
    even while tracing: for tools that trace one input size to analyse what
    eager code computes (e.g. FLOP counting); such a graph is only valid at
    the traced size.
    """
    previous = _force_size_generic[0]
    _force_size_generic[0] = bool(enabled)
    try:
        yield
    finally:
        _force_size_generic[0] = previous


def size_generic_path(x=None):
    """Whether the forward must not branch on the input's size.

    True under ``torch.jit.trace`` / ``script``, the ONNX exporters,
    ``torch.compile`` and ``torch.export`` (a Python ``if`` on a shape would
    be baked into the graph as a constant and the graph would only be right
    at the traced size), when ``x`` has symbolic sizes, and inside
    :func:`size_generic`; False inside ``size_generic(False)``. Eager code
    may take exact fast paths otherwise, except on an empty ``x`` (no
    images or no pixels): the tensor ops handle it, the compiled loops'
    per-row arithmetic would divide by zero.
    """
    forced = _force_size_generic[0]
    if forced is not None:
        return forced
    if torch.jit.is_scripting() or torch.jit.is_tracing() \
            or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling() \
            or torch.compiler.is_exporting():
        return True
    return x is not None and (
        any(not isinstance(side, int) for side in x.shape[-2:])
        or x.numel() == 0)


def _pool_windows(in_size, out_size, like):
    """(out_size, in_size) bool mask of adaptive pooling's windows along one
    axis, and each window's length.

    Window i covers the inputs [floor(i n / m), ceil((i + 1) n / m)), as in
    ``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d``. ``in_size`` may be
    symbolic (a SymInt under torch.export, a traced 0-dim tensor under
    torch.jit.trace): only tensor arithmetic touches it, so the graph stays
    size-generic.
    """
    rows = torch.arange(out_size, device=like.device)
    start = torch.div(rows * in_size, out_size, rounding_mode='floor')
    end = torch.div((rows + 1) * in_size + (out_size - 1), out_size,
                    rounding_mode='floor')
    cols = torch.arange(in_size, device=like.device)
    inside = (cols >= start[:, None]) & (cols < end[:, None])
    return inside, end - start


def _pool_matrix(in_size, out_size, like):
    """(out_size, in_size) matrix of adaptive average pooling along one
    axis; the identity (exact) at ``in_size == out_size``."""
    inside, length = _pool_windows(in_size, out_size, like)
    return inside.to(like.dtype) / length[:, None].to(like.dtype)


def adaptive_avg_pool2d_generic(x, size):
    """``F.adaptive_avg_pool2d(x, size)`` as two matrix products.

    Size-generic under tracing and export (ONNX has no adaptive pooling for
    a dynamic input size; PyTorch's decomposition guards on the size), and
    exactly the identity at ``x``'s own size. Elsewhere it equals the
    adaptive pool up to float rounding.
    """
    rows = _pool_matrix(x.shape[-2], size[0], x)
    cols = _pool_matrix(x.shape[-1], size[1], x)
    # Two plain 2-D products over reshaped maps. matmul's batch-broadcast
    # path, einsum and .contiguous() would make torch.export guard on the
    # sizes (is a side 1?); clone() copies without asking.
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    x = torch.mm(x.reshape(-1, width), cols.transpose(0, 1))  # (.. H, w)
    x = x.view(*lead, height, size[1]).transpose(-1, -2).clone(
        memory_format=torch.contiguous_format)
    x = torch.mm(x.view(-1, height), rows.transpose(0, 1))  # (.. w, h)
    return x.view(*lead, size[1], size[0]).transpose(-1, -2)


def adaptive_max_pool2d_generic(x, size):
    """``F.adaptive_max_pool2d(x, size)`` (values only) as masked maxima
    over each axis's windows: size-generic under tracing and export, and
    exact."""
    rows, _ = _pool_windows(x.shape[-2], size[0], x)
    cols, _ = _pool_windows(x.shape[-1], size[1], x)
    low = float('-inf')
    x = torch.where(cols, x[..., None, :], low).amax(-1)  # (.., H, w)
    x = x.transpose(-1, -2)  # (.., w, H)
    x = torch.where(rows, x[..., None, :], low).amax(-1)  # (.., w, h)
    return x.transpose(-1, -2)


# Outputs per band of the banded pooling below: a few multiply-adds per
# input value keep its products memory-bound.
_BAND = 8


@functools.lru_cache(maxsize=64)
def _bands(in_size, out_size, dtype, device):
    """Adaptive average pooling along one axis, ``in_size -> out_size``, cut
    into bands of ``_BAND`` outputs: band k's windows lie inside the inputs
    ``[start, end)`` of its first and last window, and it is the (_BAND,
    end - start) block of the pooling matrix there. Returns
    ``[(start, end, block)]``."""
    with torch.inference_mode(False), torch.no_grad():
        like = torch.empty((), dtype=dtype, device=device)
        dense = _pool_matrix(in_size, out_size, like)
        inside, _ = _pool_windows(in_size, out_size, like)
        bands = []
        for first in range(0, out_size, _BAND):
            rows = inside[first:first + _BAND].any(0).nonzero()
            start, end = int(rows[0]), int(rows[-1]) + 1
            block = dense[first:first + _BAND, start:end]
            bands.append((start, end, F.pad(
                block, (0, 0, 0, _BAND - block.shape[0])).contiguous()))
    return bands


class _BandedPool(torch.autograd.Function):
    """Adaptive average pooling of the rows of a (R, n) matrix to m values,
    returned transposed, (m, R): one small GEMM per band of inputs, read
    as a strided view (no copy). (The transposed product is the one BLAS
    runs fast with so few outputs per band.)"""

    @staticmethod
    def forward(ctx, x, out_size):
        bands = _bands(x.shape[-1], out_size, x.dtype, x.device)
        ctx.bands, ctx.in_size = bands, x.shape[-1]
        out = x.new_empty(len(bands) * _BAND, x.shape[0])
        for k, (start, end, block) in enumerate(bands):
            torch.mm(block, x[:, start:end].t(),
                     out=out[k * _BAND:(k + 1) * _BAND])
        return out[:out_size]

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_zeros(grad.shape[1], ctx.in_size)
        for k, (start, end, block) in enumerate(ctx.bands):
            rows = grad[k * _BAND:(k + 1) * _BAND]
            grad_x[:, start:end].addmm_(rows.t(), block[:rows.shape[0]])
        return grad_x, None


def adaptive_avg_pool2d_banded(x, size):
    """``F.adaptive_avg_pool2d(x, size)`` for eager code, as banded GEMMs.

    Each axis is pooled by a few small matrix products over strided bands
    of the input (each output window lies inside one band), which reads the
    map once; PyTorch's CPU kernel sums every window separately in scalar
    code, 2-3x slower (``tools/analysis/fast_path_ab.py``). Equal to the
    adaptive pool up to float rounding (``tests/test_fast_paths.py``).
    """
    *lead, height, width = x.shape
    rows = x.reshape(-1, width)
    if width != size[1]:
        rows = _BandedPool.apply(rows, size[1])  # (w, .. H)
    else:
        rows = rows.t()
    cols = rows.reshape(-1, height)  # (w .., H)
    if height != size[0]:
        cols = _BandedPool.apply(cols, size[0])  # (h, w ..)
    else:
        cols = cols.t()
    out = cols.reshape(size[0], size[1], -1).permute(2, 0, 1).contiguous()
    return out.view(*lead, *size)


def resample_to(x, size):
    """Average-pool ``x`` to the spatial ``size`` (identity if already so).

    Layers whose weights span a fixed grid (global depthwise gathers, PSI's
    patch MLP) see every input through this, so any H x W maps onto the grid
    they were built for and the reference size is left untouched.

    Eager calls skip the pooling at the reference size and otherwise use,
    on CPU, :func:`adaptive_avg_pool2d_banded` (``F.adaptive_avg_pool2d``
    up to rounding, 2-3x faster there), elsewhere ``F.adaptive_avg_pool2d``.
    Traced / exported graphs always resample with
    :func:`adaptive_avg_pool2d_generic` (identity at the reference size,
    equal to the adaptive pool elsewhere up to rounding), so one graph
    serves every input size.
    """
    size = tuple(size)
    if size_generic_path(x):
        return adaptive_avg_pool2d_generic(x, size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.device.type != 'cpu' or torch.jit.is_tracing():
        # GPUs pool in parallel; FLOP counters know the op
        return F.adaptive_avg_pool2d(x, size)
    return adaptive_avg_pool2d_banded(x, size)


class PointwiseConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and state dict) whose 1x1
    conv on CPU runs as one GEMM per image, forward and backward, where
    that is faster on this CPU (:func:`pointwise_path`).

    oneDNN's CPU conv copies an NCHW input to a blocked layout and back, a
    full pass over the map that for a 1x1 conv can cost as much as the
    product; ``weight @ x.view(C, H*W)`` reads the map as it is
    (:func:`pointwise_product`). Which is faster depends on the CPU and the
    BLAS behind ``torch.bmm``: on an Intel Xeon the GEMM was (SB's conv3 at
    stage 1: 30.5 vs 41.6 ms forward + backward), on an AMD EPYC (Zen 4)
    oneDNN's AVX-512 conv is, by 1.3-2.6x at SB-R50's conv3 widths, while
    the GEMM still wins for few output maps (PSI's squeeze). Strided or
    padded convs, channels_last, autocast or non-CPU inputs and traced /
    exported graphs use the conv; both paths give the same result up to
    float rounding.
    """

    def forward(self, x):
        if self.kernel_size != (1, 1) or self.stride != (1, 1) \
                or self.padding not in ((0, 0), 'valid') or self.groups != 1 \
                or not gemm_applies(x):
            return super().forward(x)
        path = pointwise_path(self.weight, x)
        if path == 'conv':
            return super().forward(x)
        out = _pointwise_products()[path](self.weight, x)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


POINTWISE_PATHS = ('auto', 'gemm', 'conv', 'loops')
# (out, in, batched, log2 of the pixel count, training, dtype, threads)
# -> 'gemm' / 'conv' / 'loops', timed once per process
_pointwise_choices = {}
# Output maps up to which the loops (few_maps_product) are a candidate
FEW_MAPS = 16


def pointwise_path(weight, x):
    """``'gemm'``, ``'conv'`` or ``'loops'``: which computes the 1x1 conv
    of ``weight`` (O, C, 1, 1) on ``x`` fastest here,
    :func:`pointwise_product`, ``F.conv2d`` or, for at most ``FEW_MAPS``
    output maps, :func:`few_maps_product`; call only where
    :func:`gemm_applies`.

    ``MMCTX_POINTWISE`` (``auto`` by default, ``gemm``, ``conv`` or
    ``loops``) fixes the answer (``loops`` where they apply, else
    ``gemm``). With ``auto`` the first call for a kind of product times
    the candidates, alternating (forward, and where autograd records,
    forward + backward), and keeps the fastest for the process, like
    ``torch.backends.cudnn.benchmark``. A kind is the weight's shape,
    whether the batch is 1, the pixel count rounded to a power of two (so
    the varying input sizes of detection training time a few kinds, not
    every size), training or not, the dtype and the thread count. All
    paths compute the same product up to float rounding.
    """
    mode = os.environ.get('MMCTX_POINTWISE', 'auto')
    if mode != 'auto':
        if mode not in POINTWISE_PATHS:
            raise ValueError(f'MMCTX_POINTWISE must be one of '
                             f'{POINTWISE_PATHS}, got {mode!r}')
        if mode == 'loops' and not few_maps_applies(weight, x):
            return 'gemm'
        return mode
    batch, _, height, width = x.shape
    train = torch.is_grad_enabled() and (x.requires_grad
                                         or weight.requires_grad)
    key = (weight.shape[0], weight.shape[1], batch > 1,
           (batch * height * width).bit_length(), train, x.dtype,
           torch.get_num_threads())
    choice = _pointwise_choices.get(key)
    if choice is None:
        choice = _pointwise_choices[key] = _time_pointwise_paths(
            weight, x, train)
    return choice


def pointwise_conv(weight, x):
    """``F.conv2d(x, weight)`` for a (O, C, 1, 1) ``weight``, by the
    fastest path here (:func:`pointwise_path`) where
    :func:`gemm_applies`."""
    if not gemm_applies(x):
        return F.conv2d(x, weight)
    return _pointwise_products()[pointwise_path(weight, x)](weight, x)


def _pointwise_products():
    # looked up at each call: tests replace the functions to time them
    return dict(gemm=pointwise_product, conv=lambda w, t: F.conv2d(t, w),
                loops=few_maps_product)


def _time_pointwise_paths(weight, x, train, rounds=3):
    """The fastest path on detached copies of ``weight`` and ``x`` (medians
    of ``rounds`` alternating runs after one warm-up each)."""
    weight = weight.detach().reshape(weight.shape[0], -1, 1, 1)
    x = x.detach()
    if train:
        weight = weight.clone().requires_grad_()
        x = x.clone().requires_grad_()
    paths = _pointwise_products()
    if not few_maps_applies(weight, x):
        del paths['loops']
    grad = None

    def run(path):
        nonlocal grad
        with torch.set_grad_enabled(train):
            out = paths[path](weight, x)
            if train:
                if grad is None:
                    grad = torch.ones_like(out)
                torch.autograd.grad(out, (weight, x), grad)

    times = {path: [] for path in paths}
    # Saved tensors as they are: the outer hooks of activation
    # checkpointing (which recomputes the forward without this timing) or
    # of a memory measurement must not see the timing's graphs.
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        for round_ in range(rounds + 1):
            for path in paths:
                start = time.perf_counter()
                run(path)
                if round_:  # the first round warms up
                    times[path].append(time.perf_counter() - start)
    return min(paths, key=lambda path: statistics.median(times[path]))


def _same(tensor):
    return tensor


def gemm_applies(x):
    """Whether :func:`pointwise_product` may replace a 1x1 conv on ``x``:
    an eager (untraced), contiguous NCHW map on CPU without autocast."""
    return x.dim() == 4 and x.device.type == 'cpu' and x.is_contiguous() \
        and not torch.is_autocast_enabled('cpu') and not size_generic_path(x) \
        and not torch.jit.is_tracing()  # FLOP counters trace the conv


class _PointwiseProduct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, weight, x):
        ctx.save_for_backward(weight, x)
        batch, channels, height, width = x.shape
        weight = weight.reshape(-1, channels)
        maps = x.view(batch, channels, height * width)
        out = torch.mm(weight, maps[0])[None] if batch == 1 else torch.bmm(
            weight.expand(batch, -1, -1), maps)
        return out.view(batch, -1, height, width)

    @staticmethod
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors
        batch, channels = x.shape[:2]
        flat = weight.reshape(-1, channels)
        maps = x.view(batch, channels, -1)
        grad = grad.contiguous().view(batch, flat.shape[0], -1)
        grad_weight = grad_x = None
        if ctx.needs_input_grad[0]:
            # sum over images of grad_b @ x_b^T (x read transposed in place)
            grad_weight = torch.bmm(grad, maps.transpose(1, 2)).sum(0) \
                if batch > 1 else torch.mm(grad[0], maps[0].t())
            grad_weight = grad_weight.view_as(weight)
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(flat.t().expand(batch, -1, -1), grad) \
                if batch > 1 else torch.mm(flat.t(), grad[0])[None]
            grad_x = grad_x.view_as(x)
        return grad_weight, grad_x


def pointwise_product(weight, x):
    """A 1x1 conv without bias, ``weight`` (O, C, 1, 1) on ``x`` (B, C, H,
    W, contiguous), as one GEMM per image with a contiguous (B, O, H, W)
    result; its backward is two GEMMs per image. (``torch.matmul`` would
    fold the batch into the rows and return a transposed result whose copy
    to NCHW costs more than the product.)"""
    return _PointwiseProduct.apply(weight, x)


def few_maps_applies(weight, x):
    """Whether :func:`few_maps_product` may compute the 1x1 conv of
    ``weight`` on ``x`` (besides :func:`gemm_applies`): at most
    ``FEW_MAPS`` output maps, float32 / float64, and the compiled loops
    (:func:`mmctx.models.norm_gate.kernels`)."""
    from .norm_gate import kernels  # norm_gate imports this module
    return weight.shape[0] <= FEW_MAPS and x.dtype == weight.dtype \
        and x.dtype in (torch.float32, torch.float64) \
        and kernels() is not None


class _FewMapsProduct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, weight, x):
        ctx.save_for_backward(weight, x)
        from .norm_gate import kernels
        return kernels().few_maps_product(
            weight.reshape(weight.shape[0], -1).contiguous(), x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            # second derivatives: the GEMMs' backward, made of autograd ops
            return _PointwiseProduct.backward(ctx, grad)
        from .norm_gate import kernels
        weight, x = ctx.saved_tensors
        grad_weight, grad_x = kernels().few_maps_product_backward(
            weight.reshape(weight.shape[0], -1).contiguous(), x,
            grad.contiguous(), ctx.needs_input_grad[0],
            ctx.needs_input_grad[1])
        if grad_weight is not None:
            grad_weight = grad_weight.view_as(weight)
        return grad_weight, grad_x


def few_maps_product(weight, x):
    """:func:`pointwise_product` for a few output maps (Spatial Bias's and
    PSI's squeezes), as C++ loops (``csrc/norm_gate.cpp``) that read the
    map once per image and chunk of pixels, the chunk's output rows in
    cache; call where :func:`few_maps_applies`. MKL's GEMM packs the map
    first for so few output rows, and oneDNN's conv reorders it: 2-6x
    slower at Spatial Bias's 5 maps on an AMD EPYC. The backward reads the
    map and the gradient once for both gradients. Equal to the conv up to
    float rounding, second derivatives included (autograd's, through the
    GEMMs)."""
    if torch.is_grad_enabled() and (weight.requires_grad
                                    or x.requires_grad):
        return _FewMapsProduct.apply(weight, x)
    # nothing to record: the loops alone (an autograd Function's call
    # costs tens of microseconds even so)
    from .norm_gate import kernels
    return kernels().few_maps_product(
        weight.reshape(weight.shape[0], -1).contiguous(), x)


def build_pointwise_conv(conv_cfg, in_channels, out_channels, bias):
    """A 1x1 conv from ``conv_cfg``; the default (None or plain Conv2d) is
    a :class:`PointwiseConv2d`."""
    if conv_cfg is None or conv_cfg == dict(type='Conv2d') \
            or conv_cfg == dict(type='Conv'):
        return PointwiseConv2d(in_channels, out_channels, 1, bias=bias)
    from mmcv.cnn import build_conv_layer
    return build_conv_layer(conv_cfg, in_channels, out_channels,
                            kernel_size=1, bias=bias)


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
