"""A Spatial Bias bottleneck's tail in training, as one autograd function:
``relu(identity + bn3(z + W @ maps))``, where ``z`` is conv3 of conv2's
channels, ``maps`` the k bias maps after bn2 and the ReLU, ``W`` conv3's
columns for them, and bn3 a training-mode BatchNorm (batch statistics,
running statistics updated) or, in a network trained with frozen norms
(``norm_eval=True``, the detection setting), an eval-mode one.

It is conv3 of the concatenation ``[conv2's map, bias maps]`` followed by
bn3, the residual add and the ReLU (SB's block as published), without the
concatenation: conv3 runs at ResNet's width, where oneDNN is fastest (at
67 / 131 / 259 input channels its forward and backward took 5-19% longer
than at 64 / 128 / 256 in a profile of the training step), and the
rank-k term ``W @ maps`` (k = 3) is never written out. The forward reads
``z`` twice, for bn3's statistics and for ``relu(identity + a (z + W @ maps)
+ b)``, both C++ loops that form ``z + W @ maps`` a chunk at a time
(``csrc/norm_gate.cpp``); the plain ops write the concatenation, conv3's
output, bn3's, the sum and the ReLU's. The backward makes two passes, as
Gather-Excite's tail does (:mod:`mmctx.models.norm_gate`): ReLU's mask
with the rows' sums (of the mask and of its product with ``u``), then
``u``'s gradient as ``α grad + β u + γ`` per row, with the maps' gradient
(a sum over channels per pixel) and ``W``'s (a sum over pixels per
channel) in the same pass. Results equal the plain ops' up to float
rounding, and so do the running statistics and second derivatives
(``tests/test_fast_paths.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .norm_gate import (_tail_maps, affine_of_statistics, batch_statistics,
                        kernels, step_statistics,
                        update_running_statistics)


class _RankNormAddReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, z, maps, rank_weight, identity, weight, bias,
                running_mean, running_var, factor, eps, batch_stats, ops):
        batch, _, height, width = z.shape
        count = batch * height * width
        if batch_stats:
            mean, var = batch_statistics(
                *ops.rank_row_moments(z, rank_weight, maps), count)
        else:  # an eval norm in a training network (e.g. norm_eval=True)
            mean, var = running_mean.double(), running_var.double()
        # bn3(u) = u * scale + shift
        invstd, scale, shift = affine_of_statistics(mean, var, weight, bias,
                                                    eps)
        out = ops.rank_scale_shift_add_relu(z, identity, scale, shift,
                                            rank_weight, maps,
                                            torch.empty_like(z), None, None)
        if batch_stats:
            update_running_statistics(running_mean, running_var, mean, var,
                                      count, factor)
        ctx.save_for_backward(z, maps, rank_weight, weight, bias, out)
        ctx.moments = mean, invstd, scale
        ctx.eps, ctx.batch_stats, ctx.ops = eps, batch_stats, ops
        return out

    @staticmethod
    def backward(ctx, grad):
        z, maps, rank_weight, weight, bias, out = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _RankNormAddReLU._backward_differentiable(
                ctx, grad, z, maps, rank_weight, weight, bias, out)
        mean, invstd, scale = ctx.moments
        batch, _, height, width = z.shape
        count = batch * height * width
        masked, grad_sums, grad_dots = ctx.ops.rank_relu_grad_moments(
            grad.contiguous(), out, z, rank_weight, maps)
        # BatchNorm's backward: u's gradient is scale * masked - u_scale * u
        # + shift_u per row
        grad_bias = grad_sums.sum(0)
        grad_centred = (grad_dots - mean * grad_sums).sum(0)
        if ctx.batch_stats:
            u_scale = scale * invstd.square() * grad_centred / count
            shift_u = u_scale * mean - scale * grad_bias / count
        else:  # fixed statistics: an affine map
            u_scale = shift_u = torch.zeros_like(scale)
        grad_u, grad_maps, grad_rank = ctx.ops.rank_combine(
            masked, z, rank_weight, maps, scale.expand(batch, -1), -u_scale,
            shift_u.expand(batch, -1))
        return (grad_u, grad_maps, grad_rank.to(rank_weight.dtype), masked,
                (grad_centred * invstd).to(weight.dtype),
                grad_bias.to(bias.dtype)) + (None, ) * 6

    @staticmethod
    def _backward_differentiable(ctx, grad, z, maps, rank_weight, weight,
                                 bias, out):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs; ReLU's mask is constant
        almost everywhere, so ``out > 0`` stands in for the identity."""
        masked = grad * (out > 0)
        inputs = [t for t in (z, maps, rank_weight, weight, bias)
                  if t.requires_grad]
        u = z + torch.einsum('ck,bkhw->bchw', rank_weight, maps)
        if ctx.batch_stats:
            normed = F.batch_norm(u, None, None, weight, bias, True, 0.,
                                  ctx.eps)
        else:
            mean, invstd, _ = (t.to(u.dtype)[:, None, None]
                               for t in ctx.moments)
            normed = (u - mean) * invstd * weight[:, None, None] + bias[
                :, None, None]
        grads = dict(zip(map(id, inputs), torch.autograd.grad(
            normed, inputs, masked, create_graph=True, allow_unused=True)))
        return tuple(grads.get(id(t)) for t in (z, maps, rank_weight)) + (
            masked, grads.get(id(weight)), grads.get(id(bias))) + (None, ) * 6


def applies(norm, z, identity, maps, branch):
    """Whether :func:`rank_norm_add_relu` may run: ``norm`` a training-mode
    ``nn.BatchNorm2d`` (batch statistics, more than one value per channel)
    or an eval-mode BatchNorm with running statistics (``norm_eval=True``
    fine-tuning), affine, unhooked, of ``z``'s dtype; ``z``, ``identity``
    and ``maps`` contiguous float CPU maps (``identity`` shaped like ``z``,
    ``maps`` with ``z``'s batch and size), the module that made ``maps``
    (``branch``) unhooked, eager code without autocast, the loops
    compiled."""
    if norm.training:
        norm_applies = type(norm) is nn.BatchNorm2d and \
            z.dim() == 4 and z.shape[0] * z.shape[2] * z.shape[3] > 1
    else:
        norm_applies = isinstance(norm, _BatchNorm) and \
            norm.running_mean is not None
    return (norm_applies and _tail_maps(norm, z, identity, branch)
            and maps.dim() == 4 and maps.dtype == z.dtype
            and maps.device == z.device and maps.is_contiguous()
            and maps.shape[0] == z.shape[0]
            and maps.shape[2:] == z.shape[2:]
            and kernels() is not None)


def rank_norm_add_relu(z, maps, rank_weight, identity, norm):
    """``relu(identity + norm(z + rank_weight @ maps))``: ``z`` (B, C, H,
    W), ``maps`` (B, k, H, W), ``rank_weight`` (C, k) applied per pixel.
    A training-mode ``norm`` normalises with the batch's statistics and
    updates its running statistics (and ``num_batches_tracked``) as its own
    forward would; an eval-mode one applies its running statistics. Call
    only where :func:`applies`."""
    running_mean, running_var, factor = step_statistics(norm)
    return _RankNormAddReLU.apply(z, maps, rank_weight, identity,
                                  norm.weight, norm.bias, running_mean,
                                  running_var, factor, norm.eps,
                                  norm.training, kernels())
