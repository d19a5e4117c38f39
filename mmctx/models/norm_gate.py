"""A Gather-Excite bottleneck's tail in training, as one autograd function:
``relu(identity + x * gate(x))`` with ``x = bn3(z)``, bn3 a training-mode
BatchNorm (batch statistics, running statistics updated) and ``gate`` a
global GE gate: GE-θ⁻'s ``sigmoid(mean_HW(x))``, or GE-θ / GE-θ⁺'s
``sigmoid(head(Σ_HW x · w))`` (``w`` the global depthwise kernel, at other
sizes than the reference its resampling's adjoint; ``head`` the gather's
norm and, for GE-θ⁺, the excite).

Separately, BatchNorm reads ``z`` three times and writes ``x``, the gate
reads ``x`` again, the add and the ReLU write the map twice more, and the
backward adds the gate's passes to ReLU's and BatchNorm's. Every one of
these is a per-row affine map or a per-row sum over the (B * C, H * W)
map, and ``x = a z + b`` per channel, so the block needs two passes each
way: forward, the rows' sums, sums of squares and kernel dot products of
``z`` (BatchNorm's statistics and, as ``Σ x · w = a Σ z · w + b Σ w``, the
gate's context), then ``relu(identity + z * (a g) + b g)``; backward,
ReLU's mask with the rows' sums of the masked gradient and of its product
with ``z``, then ``z``'s gradient as ``α grad + β z + γ (+ δ w)`` per row,
with the kernel's gradient in the same pass. The rows are C++ loops
(``csrc/norm_gate.cpp``, compiled for this machine on first use by
``torch.utils.cpp_extension``); the (B, C) algebra runs in float64 here
and the gate's head (its norm, the excite) on autograd. Results equal the
plain ops' up to float rounding, and so do the running statistics and
second derivatives (``tests/test_norm_gate.py``). Without a compiler the
plain ops run (one warning).
"""
import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .utils import (adaptive_avg_pool2d_banded, hooked, norm_affine,
                    size_generic_path)

_SOURCE = Path(__file__).with_name('csrc') / 'norm_gate.cpp'
_FLAGS = ('-O3', '-march=native', '-fopenmp', '-fno-math-errno')
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
            module = load(f'mmctx_norm_gate_{key}', [str(_SOURCE)],
                          extra_cflags=list(_FLAGS),
                          extra_ldflags=['-fopenmp'], verbose=False)
        except Exception as error:  # no compiler, no ninja, ...
            warnings.warn(
                f'mmctx: could not build {_SOURCE} ({type(error).__name__}: '
                f'{error}); Gather-Excite training runs on PyTorch ops '
                '(slower)')
    _kernels.append(module)
    return module


def _keep(tensor):
    return tensor


def _head(gate_module):
    """The gate from the gathered context, (B, C) -> (B, C)."""
    if gate_module.variant == 'parameter_free':
        return torch.sigmoid
    return gate_module.gate_from_dot


class _NormGateAddReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, z, identity, weight, bias, kernel, kernel_sum,
                running_mean, running_var, factor, eps, gate_module, ops,
                *head_params):
        batch, _, height, width = z.shape
        area = height * width
        count = batch * area
        sums, squares, *dots = ops.row_moments(z, kernel)
        mean, var = batch_statistics(sums, squares, count)
        invstd, scale, shift = affine_of_statistics(mean, var, weight, bias,
                                                    eps)
        if kernel is None:  # the mean of x
            kernel_sum, context = None, sums / area * scale + shift
        else:  # Σ x · w
            kernel_sum = kernel_sum.double()
            context = dots[0] * scale + shift * kernel_sum
        # The head's graph, for the backward, with its saved tensors kept
        # as they are: outer hooks (activation checkpointing) would pack
        # them and recompute the block to unpack them.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                _keep, _keep):
            context = context.to(z.dtype).requires_grad_()
            gate = _head(gate_module)(context)
        gate_values = gate.detach().double()
        out = ops.scale_shift_add_relu(z, identity, scale * gate_values,
                                       shift * gate_values, None)
        update_running_statistics(running_mean, running_var, mean, var,
                                  count, factor)
        ctx.save_for_backward(z, weight, bias, kernel, out, *head_params)
        ctx.head = context, gate
        ctx.moments = (sums, dots[0] if dots else None, kernel_sum, mean,
                       invstd, scale, shift, gate_values)
        ctx.eps, ctx.ops, ctx.gate_module = eps, ops, gate_module
        return out

    @staticmethod
    def backward(ctx, grad):
        z, weight, bias, kernel, out, *head_params = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _NormGateAddReLU._backward_differentiable(
                ctx, grad, z, weight, bias, kernel, out, head_params)
        (sums, dots, kernel_sum, mean, invstd, scale, shift,
         gate) = ctx.moments
        batch, _, height, width = z.shape
        area = height * width
        count = batch * area
        masked, grad_sums, grad_dots = ctx.ops.relu_grad_moments(
            grad.contiguous(), out, z)
        # the head's backward: the gradient of the context, and its params'
        context, gate_out = ctx.head
        needed = [p for p in head_params if p.requires_grad]
        grad_gate = scale * grad_dots + shift * grad_sums  # Σ_HW grad · x
        head_grads = torch.autograd.grad(
            gate_out, [context] + needed, grad_gate.to(gate_out.dtype),
            allow_unused=True)
        grad_context = head_grads[0].double()
        # x's gradient is masked * gate + grad_context * w per row (w = 1 /
        # area for the mean); BatchNorm's backward needs its sum and its
        # product with z - mean per channel
        if kernel is None:
            context_sum, context_dot = grad_context, grad_context * (
                sums / area - mean)
        else:
            context_sum = grad_context * kernel_sum
            context_dot = grad_context * (dots - mean * kernel_sum)
        grad_bias = (gate * grad_sums + context_sum).sum(0)
        grad_centred = (gate * (grad_dots - mean * grad_sums) +
                        context_dot).sum(0)
        z_scale = scale * invstd.square() * grad_centred / count
        shift_z = z_scale * mean - scale * grad_bias / count
        grad_z = grad_kernel = None
        if kernel is None:
            if ctx.needs_input_grad[0]:
                grad_z, = ctx.ops.combine_rows(
                    masked, z, scale * gate, -z_scale,
                    shift_z + scale * grad_context / area, *(None, ) * 5)
        elif ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            # the kernel's gradient, Σ_b grad_context x, is
            # a Σ_b grad_context z + b Σ_b grad_context per channel
            grad_z, grad_kernel = ctx.ops.combine_rows(
                masked, z, scale * gate, -z_scale, shift_z.expand_as(gate),
                kernel, scale * grad_context, grad_context, scale,
                shift * grad_context.sum(0))
            if not ctx.needs_input_grad[4]:
                grad_kernel = None
        grads = dict(zip(map(id, needed), head_grads[1:]))
        return (grad_z, masked, (grad_centred * invstd).to(weight.dtype),
                grad_bias.to(bias.dtype), grad_kernel) + (None, ) * 7 + tuple(
                    grads.get(id(p)) for p in head_params)

    @staticmethod
    def _backward_differentiable(ctx, grad, z, weight, bias, kernel, out,
                                 head_params):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs. ReLU's mask is constant
        almost everywhere, so ``out > 0`` stands in for the identity; the
        head runs again, its running statistics left as they are."""
        masked = grad * (out > 0)
        inputs = [t for t in (z, weight, bias, kernel, *head_params)
                  if t is not None and t.requires_grad]
        x = F.batch_norm(z, None, None, weight, bias, True, 0., ctx.eps)
        context = x.mean((2, 3)) if kernel is None else (x * kernel).sum(
            (2, 3))
        # the head's norm runs on copies of its buffers (its graph keeps
        # the running statistics it was given)
        owners = [(module, name, buffer)
                  for module in ctx.gate_module.modules()
                  for name, buffer in module.named_buffers(recurse=False)]
        for module, name, buffer in owners:
            setattr(module, name, buffer.clone())
        try:
            gate = _head(ctx.gate_module)(context)
        finally:
            for module, name, buffer in owners:
                setattr(module, name, buffer)
        grads = dict(zip(map(id, inputs), torch.autograd.grad(
            x * gate[..., None, None], inputs, masked, create_graph=True,
            allow_unused=True)))
        return (grads.get(id(z)), masked, grads.get(id(weight)),
                grads.get(id(bias)),
                None if kernel is None else grads.get(id(kernel))) + (
                    None, ) * 7 + tuple(grads.get(id(p)) for p in head_params)


class _PoolAdjoint(torch.autograd.Function):
    """The adjoint of resampling (H, W) maps to a kernel's (h, w) grid,
    applied to the (C, h, w) kernel; its gradient is the resampling."""

    @staticmethod
    def forward(ctx, kernel, size, ops):
        ctx.grid, ctx.ops = kernel.shape[-2:], ops
        return ops.pool_adjoint(kernel.contiguous(), *size)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() or not grad.is_contiguous() \
                or grad.dtype not in (torch.float32, torch.float64):
            # second derivatives: the banded GEMMs, autograd ops
            return adaptive_avg_pool2d_banded(grad, ctx.grid), None, None
        # one read of the (C, H, W) gradient (C++ loops)
        return ctx.ops.adaptive_avg_pool(grad, *ctx.grid), None, None


def resample_adjoint(kernel, size):
    """(C, h, w) kernels on the (h, w) grid that
    :func:`~mmctx.models.utils.resample_to` maps (H, W) inputs onto ->
    (C, H, W) kernels whose per-channel dot products with a map equal those
    of ``kernel`` with the map resampled (up to float rounding); at the
    grid's own size, ``kernel`` itself. Needs :func:`kernels`."""
    if tuple(size) == tuple(kernel.shape[-2:]):
        return kernel
    return _PoolAdjoint.apply(kernel, tuple(size), kernels())


def _kernel(gate_module, size):
    """The global depthwise kernel for (H, W) maps as (C, H, W): the
    reference kernel, or at other sizes its resampling's adjoint, so that
    ``Σ x · kernel`` is the plain gather on ``x`` resampled to the
    reference grid; and the kernel's sum per channel (the same for both:
    the resampling keeps constants), without autograd. None, None for
    GE-θ⁻."""
    if gate_module.variant == 'parameter_free':
        return None, None
    kernel = gate_module.gather.weight.squeeze(1)
    return resample_adjoint(kernel, size), kernel.detach().sum(
        (1, 2), dtype=torch.float64)


def pooled_dot_applies(x, kernel, size):
    """Whether :func:`pooled_dot` may compute ``channel_dot(resample_to(x,
    size), kernel)``: inference (no autograd) away from the reference
    ``size``, a contiguous float CPU map of the kernel's dtype, eager code
    without autocast, the loops compiled."""
    return (not torch.is_grad_enabled() and x.dim() == 4
            and tuple(x.shape[-2:]) != tuple(size)
            and x.device.type == 'cpu' and x.is_contiguous()
            and x.dtype in (torch.float32, torch.float64)
            and kernel.dtype == x.dtype
            and not torch.is_autocast_enabled('cpu')
            and not size_generic_path(x) and not torch.jit.is_tracing()
            and kernels() is not None)


def pooled_dot(x, kernel):
    """(B, C): per image and channel, ``x`` adaptively average-pooled to
    the (C, h, w) ``kernel``'s size, dotted with the channel's kernel, in
    one read of the map (C++ loops; the pooling's banded GEMMs read it
    about three times over). Equal to the pool and the dot product up to
    float rounding. Call only where :func:`pooled_dot_applies`."""
    return kernels().pooled_dot(x, kernel.contiguous(), None).to(
        x.dtype)


def batch_statistics(sums, squares, count):
    """A batch's per-channel mean and biased variance (float64) from the
    rows' sums and sums of squares, (B, C) each, of ``count`` values per
    channel."""
    mean = sums.sum(0) / count
    return mean, (squares.sum(0) / count - mean.square()).clamp_min(0)


def affine_of_statistics(mean, var, weight, bias, eps):
    """BatchNorm with these (float64) statistics as ``z * scale + shift``
    per channel: (invstd, scale, shift) in float64."""
    return norm_affine(mean, var, weight.double(), bias.double(), eps)


def running_statistics(norm):
    """A training-mode BatchNorm's running mean and variance (None, None
    where it keeps none) and this step's update factor, counting the step
    in ``num_batches_tracked`` as its forward would."""
    factor = 0. if norm.momentum is None else norm.momentum
    if not norm.track_running_stats or norm.running_mean is None:
        return None, None, factor
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1. / float(norm.num_batches_tracked)
    return norm.running_mean, norm.running_var, factor


def step_statistics(norm):
    """:func:`running_statistics` for a training-mode norm; an eval-mode
    one's running statistics (which it applies) and a zero factor."""
    if norm.training:
        return running_statistics(norm)
    return norm.running_mean, norm.running_var, 0.


def update_running_statistics(running_mean, running_var, mean, var, count,
                              factor):
    """BatchNorm's update of its running statistics (if any) from a batch's
    ``mean`` and biased ``var`` over ``count`` values per channel."""
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(
            (var * (count / (count - 1))).to(running_var.dtype), factor)


def tail_maps_apply(norm, z, identity, gate_module):
    """Whether a fused block tail may run on these maps: ``norm`` a
    training-mode, affine, unhooked ``nn.BatchNorm2d`` of ``z``'s dtype,
    ``z`` and ``identity`` contiguous float CPU maps of one shape with more
    than one value per channel, an unhooked gate, eager code without
    autocast (shared by this module's tail and
    :mod:`mmctx.models.norm_pixel_gate`'s; each also needs its loops
    compiled)."""
    return (type(norm) is nn.BatchNorm2d and norm.training
            and z.dim() == 4 and z.shape[0] * z.shape[2] * z.shape[3] > 1
            and _tail_maps(norm, z, identity, gate_module))


def inference_tail_maps_apply(norm, z, identity, gate_module):
    """:func:`tail_maps_apply` for inference: ``norm`` an eval-mode
    BatchNorm (running statistics), no autograd."""
    return (isinstance(norm, _BatchNorm) and not norm.training
            and norm.running_mean is not None
            and not torch.is_grad_enabled()
            and _tail_maps(norm, z, identity, gate_module))


def _tail_maps(norm, z, identity, gate_module):
    return (norm.affine and not hooked(norm) and z.dim() == 4
            and z.device.type == 'cpu' and z.is_contiguous()
            and z.dtype in (torch.float32, torch.float64)
            and identity.shape == z.shape and identity.dtype == z.dtype
            and identity.is_contiguous() and norm.weight.dtype == z.dtype
            and not hooked(gate_module)
            and not torch.is_autocast_enabled('cpu')
            and not size_generic_path(z) and not torch.jit.is_tracing())


def applies(norm, z, identity, gate_module):
    """Whether :func:`norm_gate_add_relu` takes the fused path: ``norm`` a
    training-mode ``nn.BatchNorm2d``, ``gate_module`` a global
    :class:`~mmctx.models.GatherExcite`, contiguous float CPU maps, eager
    code (:func:`tail_maps_apply`)."""
    return _global_gate_of(gate_module, z) \
        and tail_maps_apply(norm, z, identity, gate_module) \
        and kernels() is not None


def inference_applies(norm, z, identity, gate_module):
    """Whether :func:`norm_gate_add_relu_inference` may run: ``norm`` an
    eval-mode BatchNorm, a global :class:`~mmctx.models.GatherExcite`,
    contiguous float CPU maps, eager code without autograd
    (:func:`inference_tail_maps_apply`)."""
    return _global_gate_of(gate_module, z) \
        and inference_tail_maps_apply(norm, z, identity, gate_module) \
        and kernels() is not None


def _global_gate_of(gate_module, z):
    """A global GE gate whose kernel (if any) has ``z``'s dtype."""
    if getattr(gate_module, 'extent', None) != 'global':
        return False
    return gate_module.variant == 'parameter_free' \
        or gate_module.gather.weight.dtype == z.dtype


def norm_gate_add_relu_inference(z, identity, norm, gate_module,
                                 in_place=False):
    """``relu(identity + gate_module(norm(z)))`` for an eval-mode ``norm``,
    in one pass over ``z`` after the gate's context: the norm folded into
    the gate (:meth:`GatherExcite.folded_gate`), then per row ``relu(
    identity + z * (a g) + b g)``, where the plain ops write the gated map,
    the sum and the ReLU's output in three passes. ``in_place``: the output
    overwrites ``z`` (the caller's temporary; see
    :meth:`GatedBottleneck.forward`). Call only where
    :func:`inference_applies`."""
    loops = kernels()
    scale, shift = gate_module.folded_gate(z, norm, loops)
    return loops.scale_shift_add_relu(z, identity, scale.reshape(-1),
                                      shift.reshape(-1),
                                      z if in_place else None)


def norm_gate_add_relu(z, identity, norm, gate_module):
    """``relu(identity + gate_module(norm(z)))``, ``norm`` a training-mode
    ``nn.BatchNorm2d``, whose running statistics (and
    ``num_batches_tracked``) are updated as its own forward would, and so
    are those of the gate's norm. Call only where :func:`applies`."""
    running_mean, running_var, factor = running_statistics(norm)
    head_params = [p for name, p in gate_module.named_parameters()
                   if not name.startswith('gather.')]  # the kernel: its own
    return _NormGateAddReLU.apply(z, identity, norm.weight, norm.bias,
                                  *_kernel(gate_module, z.shape[-2:]),
                                  running_mean,
                                  running_var, factor, norm.eps, gate_module,
                                  kernels(), *head_params)
