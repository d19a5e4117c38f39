"""GE-θ⁻'s bottleneck tail in training, as one autograd function:
``relu(identity + x * sigmoid(mean_HW(x)))`` with ``x = bn3(z)``, bn3 a
training-mode BatchNorm (batch statistics, running statistics updated).

Separately, BatchNorm reads ``z`` three times and writes ``x``, the gate
reads ``x`` again, the add and the ReLU write the map twice more, and the
backward adds the gate's passes to ReLU's and BatchNorm's. Every one of
these is a per-row affine map or a per-row sum over the (B * C, H * W)
map, so the block needs only two passes each way: forward, the rows' sums
and sums of squares of ``z`` (BatchNorm's statistics and, since
``mean_HW(x) = a mean_HW(z) + b`` per channel, the gate's context), then
``relu(identity + z * (a g) + b g)``; backward, ReLU's mask with the rows'
sums of the masked gradient and of its product with ``z``, then ``z``'s
gradient as ``α grad + β z + γ`` per row. The rows are C++ loops
(``csrc/norm_mean_gate.cpp``, compiled for this machine on first use by
``torch.utils.cpp_extension``); the per-row algebra runs in float64 here.
Results equal the plain ops' up to float rounding, and so do the running
statistics and second derivatives (``tests/test_norm_mean_gate.py``).
Without a compiler the plain ops run (one warning).
"""
import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import hooked, size_generic_path

_SOURCE = Path(__file__).with_name('csrc') / 'norm_mean_gate.cpp'
_FLAGS = ('-O3', '-march=native', '-fopenmp')
_kernels = []  # [the compiled module, or None where it cannot be built]


def _cpu_flags():
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            return next((line for line in f if line.startswith('flags')), '')
    except OSError:
        return ''


def kernels():
    """The compiled row kernels, or None where they cannot be built (or
    ``MMCTX_CPU_KERNELS=0``). Built once per source, torch version and CPU
    (``-march=native``: the name carries a hash of all three, so a cache
    shared between machines never runs another CPU's code) into
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)."""
    if _kernels:
        return _kernels[0]
    module = None
    if os.environ.get('MMCTX_CPU_KERNELS', '1') != '0':
        key = hashlib.sha1(_SOURCE.read_bytes() + torch.__version__.encode()
                           + ' '.join(_FLAGS).encode()
                           + _cpu_flags().encode()).hexdigest()[:12]
        try:
            from torch.utils.cpp_extension import load
            module = load(f'mmctx_norm_mean_gate_{key}', [str(_SOURCE)],
                          extra_cflags=list(_FLAGS),
                          extra_ldflags=['-fopenmp'], verbose=False)
        except Exception as error:  # no compiler, no ninja, ...
            warnings.warn(
                f'mmctx: could not build {_SOURCE} ({type(error).__name__}: '
                f'{error}); GE-θ⁻ training runs on PyTorch ops (slower)')
    _kernels.append(module)
    return module


class _NormMeanGateAddReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, z, identity, weight, bias, running_mean, running_var,
                factor, eps, ops):
        batch, _, height, width = z.shape
        area = height * width
        count = batch * area
        sums, squares = ops.row_moments(z)
        mean = sums.sum(0) / count
        var = (squares.sum(0) / count - mean.square()).clamp_min(0)
        invstd = (var + eps).rsqrt()
        scale = weight.double() * invstd  # x = z * scale + shift
        shift = bias.double() - mean * scale
        gate = torch.sigmoid(sums / area * scale + shift)
        out = ops.scale_shift_add_relu(z, identity, scale * gate,
                                       shift * gate)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_(
                (var * (count / (count - 1))).to(running_var.dtype), factor)
        ctx.save_for_backward(z, weight, bias, out)
        ctx.moments = sums, mean, invstd, scale, shift, gate
        ctx.eps, ctx.ops = eps, ops
        return out

    @staticmethod
    def backward(ctx, grad):
        z, weight, bias, out = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _NormMeanGateAddReLU._backward_differentiable(
                ctx, grad, z, weight, bias, out)
        sums, mean, invstd, scale, shift, gate = ctx.moments
        batch, _, height, width = z.shape
        area = height * width
        count = batch * area
        masked, grad_sums, grad_dots = ctx.ops.relu_grad_moments(
            grad.contiguous(), out, z)
        # x's gradient is masked * gate + k per row, k from the gate's mean
        grad_context = (scale * grad_dots + shift * grad_sums) * (
            gate * (1 - gate))
        k = grad_context / area
        # BatchNorm's backward, with x's gradient summed per row above
        grad_bias = (gate * grad_sums + grad_context).sum(0)
        grad_centred = (gate * (grad_dots - mean * grad_sums) + k *
                        (sums - mean * area)).sum(0)
        grad_weight = grad_centred * invstd
        z_scale = scale * invstd.square() * grad_centred / count
        grad_z = None
        if ctx.needs_input_grad[0]:
            grad_z = ctx.ops.combine_rows(
                masked, z, scale * gate, -z_scale,
                scale * (k - grad_bias / count) + z_scale * mean)
        return (grad_z, masked, grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype)) + (None, ) * 5

    @staticmethod
    def _backward_differentiable(ctx, grad, z, weight, bias, out):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs. ReLU's mask is constant
        almost everywhere, so ``out > 0`` stands in for the identity."""
        masked = grad * (out > 0)
        inputs = [t for t in (z, weight, bias) if t.requires_grad]
        x = F.batch_norm(z, None, None, weight, bias, True, 0., ctx.eps)
        gated = x * x.mean((2, 3), keepdim=True).sigmoid()
        grads = dict(zip(map(id, inputs), torch.autograd.grad(
            gated, inputs, masked, create_graph=True)))
        return (grads.get(id(z)), masked, grads.get(id(weight)),
                grads.get(id(bias))) + (None, ) * 5


def applies(norm, z, identity):
    """Whether :func:`norm_mean_gate_add_relu` takes the fused path."""
    return (type(norm) is nn.BatchNorm2d and norm.training and norm.affine
            and not hooked(norm) and z.dim() == 4
            and z.device.type == 'cpu' and z.is_contiguous()
            and z.dtype in (torch.float32, torch.float64)
            and identity.shape == z.shape and identity.dtype == z.dtype
            and identity.is_contiguous() and norm.weight.dtype == z.dtype
            and z.shape[0] * z.shape[2] * z.shape[3] > 1
            and not torch.is_autocast_enabled('cpu')
            and not size_generic_path(z) and not torch.jit.is_tracing()
            and kernels() is not None)


def norm_mean_gate_add_relu(z, identity, norm):
    """``relu(identity + x * sigmoid(mean_HW(x)))`` with ``x = norm(z)``,
    ``norm`` a training-mode ``nn.BatchNorm2d``, whose running statistics
    (and ``num_batches_tracked``) are updated as its own forward would.
    Call only where :func:`applies`."""
    factor = 0. if norm.momentum is None else norm.momentum
    running_mean = running_var = None
    if norm.track_running_stats and norm.running_mean is not None:
        running_mean, running_var = norm.running_mean, norm.running_var
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # cumulative moving average
                factor = 1. / float(norm.num_batches_tracked)
    return _NormMeanGateAddReLU.apply(z, identity, norm.weight, norm.bias,
                                      running_mean, running_var, factor,
                                      norm.eps, kernels())
