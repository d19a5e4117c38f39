"""The head of a Spatial Bias bottleneck in training, as one autograd
function: ``out = relu(bn1(x))`` and the branch's squeeze ``maps = W @ out``
(a 1x1 conv with a few output maps), where ``x`` is conv1's output and bn1
a training-mode BatchNorm (batch statistics, running statistics updated)
or, in a network trained with frozen norms (``norm_eval=True``), an
eval-mode one.

``out`` feeds conv2 and the squeeze, so its gradient is the sum of theirs.
The plain ops make about ten passes over the map for this: BatchNorm's
statistics and output, the ReLU, the squeeze's read; in the backward the
squeeze's gradient of ``out`` (written), its sum with conv2's, ReLU's
backward and BatchNorm's two passes. Here the forward reads ``x`` for the
statistics and writes ``out`` in one pass that also forms the squeeze
(``csrc/norm_gate.cpp``, as in inference); the backward makes two passes
that form ``g = (out > 0) (grad + W^T grad_maps)`` a chunk at a time and
never write it: its sums per row with the squeeze weight's gradient, then
``x``'s gradient as ``α g + β x + γ`` per channel (BatchNorm's backward).
Results equal the plain ops' up to float rounding, and so do the running
statistics and second derivatives (``tests/test_fast_paths.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .norm_gate import (affine_of_statistics, batch_statistics, kernels,
                        step_statistics, update_running_statistics)
from .utils import PointwiseConv2d, few_maps_applies, gemm_applies, hooked


class _NormReLUSqueeze(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, squeeze_weight, weight, bias, running_mean,
                running_var, factor, eps, batch_stats, ops):
        batch, _, height, width = x.shape
        count = batch * height * width
        if batch_stats:
            mean, var = batch_statistics(*ops.row_moments(x, None), count)
        else:  # an eval norm in a training network (e.g. norm_eval=True)
            mean, var = running_mean.double(), running_var.double()
        invstd, scale, shift = affine_of_statistics(mean, var, weight, bias,
                                                    eps)
        out, maps = ops.scale_shift_relu_few_maps(x, scale, shift,
                                                  squeeze_weight)
        if batch_stats:
            update_running_statistics(running_mean, running_var, mean, var,
                                      count, factor)
        ctx.save_for_backward(x, out, squeeze_weight, weight, bias)
        ctx.set_materialize_grads(False)  # an unused output has none
        ctx.moments = mean, invstd, scale
        ctx.eps, ctx.batch_stats, ctx.ops = eps, batch_stats, ops
        return out, maps

    @staticmethod
    def backward(ctx, grad, grad_maps):
        x, out, squeeze_weight, weight, bias = ctx.saved_tensors
        if grad is None and grad_maps is None:
            return (None, ) * 10
        # the squeeze weight's gradient only where the maps were used, as
        # autograd's would be
        need_squeeze = ctx.needs_input_grad[1] and grad_maps is not None
        if grad is None:
            grad = torch.zeros_like(x)
        if grad_maps is None:
            grad_maps = x.new_zeros(x.shape[0], squeeze_weight.shape[0],
                                    *x.shape[2:])
        if torch.is_grad_enabled():
            grads = _NormReLUSqueeze._backward_differentiable(
                ctx, grad, grad_maps, x, squeeze_weight, weight, bias)
            return grads[:1] + (grads[1] if need_squeeze else None, ) + \
                grads[2:]
        mean, invstd, scale = ctx.moments
        batch, _, height, width = x.shape
        count = batch * height * width
        grad, grad_maps = grad.contiguous(), grad_maps.contiguous()
        sums, dots, grad_squeeze = ctx.ops.relu_few_maps_grad_moments(
            grad, out, x, squeeze_weight, grad_maps, need_squeeze)
        # BatchNorm's backward: x's gradient is scale * g - x_scale * x
        # + shift_x per channel
        grad_bias = sums.sum(0)
        grad_centred = (dots - mean * sums).sum(0)
        if ctx.batch_stats:
            x_scale = scale * invstd.square() * grad_centred / count
            shift_x = x_scale * mean - scale * grad_bias / count
        else:  # fixed statistics: an affine map
            x_scale = shift_x = torch.zeros_like(scale)
        grad_x = ctx.ops.relu_few_maps_combine(
            grad, out, x, squeeze_weight, grad_maps, scale, -x_scale,
            shift_x) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_squeeze if need_squeeze else None,
                (grad_centred * invstd).to(weight.dtype),
                grad_bias.to(bias.dtype)) + (None, ) * 6

    @staticmethod
    def _backward_differentiable(ctx, grad, grad_maps, x, squeeze_weight,
                                 weight, bias):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs."""
        inputs = [t for t in (x, squeeze_weight, weight, bias)
                  if t.requires_grad]
        if ctx.batch_stats:
            normed = F.batch_norm(x, None, None, weight, bias, True, 0.,
                                  ctx.eps)
        else:
            mean, invstd, _ = (t.to(x.dtype)[:, None, None]
                               for t in ctx.moments)
            normed = (x - mean) * invstd * weight[:, None, None] + bias[
                :, None, None]
        out = F.relu(normed)
        maps = torch.einsum('oc,bchw->bohw', squeeze_weight, out)
        grads = dict(zip(map(id, inputs), torch.autograd.grad(
            (out, maps), inputs, (grad, grad_maps), create_graph=True,
            allow_unused=True)))
        return tuple(grads.get(id(t)) for t in (
            x, squeeze_weight, weight, bias)) + (None, ) * 6


def applies(norm, relu, squeeze, x):
    """Whether :func:`norm_relu_squeeze` may run on conv1's output ``x``:
    ``norm`` a training-mode ``nn.BatchNorm2d`` (batch statistics, more
    than one value per channel) or an eval-mode BatchNorm with running
    statistics (``norm_eval=True`` fine-tuning), affine, of ``x``'s dtype;
    ``squeeze`` a plain 1x1 conv without bias and with few output maps;
    the three modules unhooked; a contiguous float CPU map, eager code
    without autocast, the loops compiled."""
    if norm.training:
        norm_applies = type(norm) is nn.BatchNorm2d and x.dim() == 4 and \
            x.shape[0] * x.shape[2] * x.shape[3] > 1
    else:
        norm_applies = isinstance(norm, _BatchNorm) and \
            norm.running_mean is not None
    return (norm_applies and norm.affine and norm.weight.dtype == x.dtype
            and type(squeeze) in (nn.Conv2d, PointwiseConv2d)
            and squeeze.kernel_size == (1, 1) and squeeze.stride == (1, 1)
            and squeeze.padding in ((0, 0), 'valid') and squeeze.groups == 1
            and squeeze.bias is None
            and not any(hooked(m) for m in (norm, relu, squeeze))
            and gemm_applies(x) and few_maps_applies(squeeze.weight, x))


def norm_relu_squeeze(x, norm, squeeze):
    """``(relu(norm(x)), squeeze(relu(norm(x))))``, the second (B, O, H,
    W). A training-mode ``norm`` normalises with the batch's statistics and
    updates its running statistics (and ``num_batches_tracked``) as its own
    forward would; an eval-mode one applies its running statistics. Call
    only where :func:`applies`."""
    running_mean, running_var, factor = step_statistics(norm)
    weight = squeeze.weight
    return _NormReLUSqueeze.apply(
        x, weight.reshape(weight.shape[0], -1).contiguous(), norm.weight, norm.bias,
        running_mean, running_var, factor, norm.eps, norm.training,
        kernels())
