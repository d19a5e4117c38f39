"""A Spatial Bias branch after its squeeze conv in training, with the
block's bn2 and ReLU on its maps, as one autograd function: ``relu(bn2(
upsample(mix(pool(relu(norm(maps)))))))``, where ``maps`` are the squeeze
conv's k + 2 maps, ``norm`` the branch's BatchNorm, ``pool`` adaptive
average pooling to the (r, r) grid, ``mix`` the kernel-3 Conv1d along the
maps, ``upsample`` bilinear resampling to conv2's output size and ``bn2``
the block's bn2 on the k bias channels (SB-ResNet's
:meth:`~mmctx.models.SBBottleneck.forward_train`). The norms are
training-mode BatchNorms (batch statistics, running statistics updated)
or, in a network trained with frozen norms, eval-mode ones.

The maps are small (k = 3, a 10x10 grid), so the plain ops' cost is their
number: about ten calls forward and twenty backward per block, each paying
a fixed cost between the block's convolutions (README, *Where the rest
goes*). Here the forward is one C++ call (the norm's statistics, then
norm, ReLU and pooling in one read written as the Conv1d's windows, the
Conv1d as one GEMM, the resampling, bn2's statistics, bn2 and its ReLU)
and so is the backward (bn2's sums over the output's mask, the
resampling's adjoint, the Conv1d's gradients as GEMMs, then the pooling's
adjoint under the norm's ReLU mask, twice: the norm's sums, then the maps'
gradient). Results equal the plain ops' up to float rounding, and so do
the running statistics and second derivatives (``tests/test_fast_paths.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .norm_gate import kernels, step_statistics
from .spatial_bias import mix_and_resize
from .utils import hooked


class _BiasMaps(torch.autograd.Function):

    @staticmethod
    def forward(ctx, maps, norm_weight, norm_bias, mix_weight, mix_bias,
                bn_weight, bn_bias, norm_stats, bn_stats, r, size, ops):
        # *_stats: (running mean, running var, factor, eps, batch stats)
        out, u, windows, norm_state, bn_state = ops.bias_maps_train(
            maps, norm_weight, norm_bias, *norm_stats[:2],
            norm_stats[4], norm_stats[2], norm_stats[3], mix_weight,
            mix_bias, r, *size, bn_weight, bn_bias, *bn_stats[:2],
            bn_stats[4], bn_stats[2], bn_stats[3])
        ctx.save_for_backward(maps, norm_weight, norm_bias, mix_weight,
                              mix_bias, bn_weight, bn_bias, out, u, windows)
        ctx.states = norm_state, bn_state
        ctx.batch_stats = norm_stats[4], bn_stats[4]
        ctx.eps = norm_stats[3], bn_stats[3]
        ctx.r, ctx.ops = r, ops
        return out

    @staticmethod
    def backward(ctx, grad):
        (maps, norm_weight, norm_bias, mix_weight, mix_bias, bn_weight,
         bn_bias, out, u, windows) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _BiasMaps._backward_differentiable(
                ctx, grad, maps, norm_weight, norm_bias, mix_weight,
                mix_bias, bn_weight, bn_bias)
        (grad_maps, grad_norm_weight, grad_norm_bias, grad_mix_weight,
         grad_mix_bias, grad_bn_weight,
         grad_bn_bias) = ctx.ops.bias_maps_train_backward(
             grad.contiguous(), out, u, windows, maps, ctx.states[0],
             ctx.batch_stats[0], mix_weight, ctx.states[1],
             ctx.batch_stats[1], ctx.r)
        return (grad_maps, grad_norm_weight.to(norm_weight.dtype),
                grad_norm_bias.to(norm_bias.dtype),
                grad_mix_weight.view_as(mix_weight).to(mix_weight.dtype),
                grad_mix_bias.to(mix_bias.dtype),
                grad_bn_weight.to(bn_weight.dtype),
                grad_bn_bias.to(bn_bias.dtype)) + (None, ) * 5

    @staticmethod
    def _backward_differentiable(ctx, grad, *inputs):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs."""
        out = plain_bias_maps(
            *inputs, ctx.r, tuple(grad.shape[-2:]),
            *((None if batch else state, eps) for batch, state, eps in zip(
                ctx.batch_stats, ctx.states, ctx.eps)))
        used = [t for t in inputs if t.requires_grad]
        grads = dict(zip(map(id, used), torch.autograd.grad(
            out, used, grad, create_graph=True, allow_unused=True)))
        return tuple(grads.get(id(t)) for t in inputs) + (None, ) * 5


def _norm(x, weight, bias, fixed, eps):
    """BatchNorm of ``x``: batch statistics, or ``fixed`` ones (an
    ``affine_state``: mean and 1 / sqrt(var + eps) in its first rows)."""
    if fixed is None:
        return F.batch_norm(x, None, None, weight, bias, True, 0., eps)
    mean, invstd = (t.to(x.dtype)[:, None, None] for t in fixed[:2])
    return (x - mean) * invstd * weight[:, None, None] + bias[:, None, None]


def plain_bias_maps(maps, norm_weight, norm_bias, mix_weight, mix_bias,
                    bn_weight, bn_bias, r, size, norm_fixed, bn_fixed):
    """The function :class:`_BiasMaps` computes, from PyTorch ops (as
    :meth:`mmctx.models.SpatialBias.spatial_bias_of_squeezed` followed by
    bn2 and the ReLU; ``*_fixed``: ``(state or None, eps)``)."""
    pooled = F.adaptive_avg_pool2d(
        F.relu(_norm(maps, norm_weight, norm_bias, *norm_fixed)), r)
    bias = mix_and_resize(pooled, mix_weight, mix_bias, size)
    return F.relu(_norm(bias, bn_weight, bn_bias, *bn_fixed))


def _norm_applies(norm, count):
    if norm.training:
        return type(norm) is nn.BatchNorm2d and count > 1
    return isinstance(norm, _BatchNorm) and norm.running_mean is not None


def applies(branch, bn, maps, size):
    """Whether :func:`bias_maps` may run on the squeeze conv's output
    ``maps`` for a block output of ``size``: the branch's average pooling
    and concatenation, its norm and ``bn`` (the block's bn2) affine
    BatchNorms of ``maps``' dtype, training-mode ``nn.BatchNorm2d`` with
    more than one value per channel or eval-mode with running statistics,
    the norm, pooling and Conv1d unhooked, a contiguous float CPU map,
    eager code without autocast, the loops compiled."""
    norm = branch.norm
    return (branch.pool_type == 'avg' and branch.fusion == 'concat'
            and maps.dim() == 4 and maps.device.type == 'cpu'
            and maps.is_contiguous()
            and maps.dtype in (torch.float32, torch.float64)
            and _norm_applies(norm, maps.shape[0] * maps.shape[2]
                              * maps.shape[3])
            and _norm_applies(bn, maps.shape[0] * size[0] * size[1])
            and norm.affine and bn.affine
            and all(t.dtype == maps.dtype for t in (
                norm.weight, bn.weight, branch.mix.weight))
            and not any(hooked(m) for m in (norm, branch.pool, branch.mix))
            and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing() and kernels() is not None)


def bias_maps(branch, maps, size, bn, channels, bn_running=None):
    """``relu(bn(branch's bias maps of maps))`` on ``bn``'s ``channels``
    (a slice), (B, k, *size). A training-mode norm normalises with the
    batch's statistics and updates its running statistics as its own
    forward would (``bn_running``: ``bn``'s ``step_statistics``, taken
    once by a caller that also normalises its other channels); an
    eval-mode one applies its running statistics. Call only where
    :func:`applies`."""
    norm = branch.norm
    running_mean, running_var, factor = step_statistics(norm)
    bn_mean, bn_var, bn_factor = bn_running or step_statistics(bn)
    return _BiasMaps.apply(
        maps, norm.weight, norm.bias, branch.mix.weight, branch.mix.bias,
        bn.weight[channels], bn.bias[channels],
        (running_mean, running_var, factor, norm.eps, norm.training),
        (None if bn_mean is None else bn_mean[channels],
         None if bn_var is None else bn_var[channels], bn_factor, bn.eps,
         bn.training),
        branch.pool_size, tuple(size), kernels())
