"""A Patch Spatial Interaction bottleneck's tail in training, as one autograd
function: ``relu(identity + x * psi(x))`` with ``x = bn3(z)``, bn3 a
training-mode BatchNorm (batch statistics, running statistics updated) and
``psi(x)`` PSI's weight per image and pixel.

PSI's squeeze is linear in ``x`` and ``x = a z + b`` per channel, so its
per-offset maps (:meth:`PatchSpatialInteraction.offset_weights`) are one
GEMM over ``z`` with the weights scaled by ``a``, plus a constant; the rest
of the gate (resampling, patches, MLP, sigmoid: small maps) runs on
autograd as the function's head. So the forward reads ``z`` three times:
BatchNorm's sums and sums of squares per row, the GEMM, and
``relu(identity + (a z + b) w)`` in one pass. Separately, BatchNorm reads
``z`` twice and writes ``x``, the squeeze reads ``x``, and the gate, the add
and the ReLU read and write the map twice more.

The backward is three passes: ReLU's mask with, per pixel, the sum over
channels of its product with ``x`` (the weights' gradient) and, per row, the
sums BatchNorm needs; then, after the head's backward has given the
per-offset maps' gradient ``D``, their products with ``z`` (one GEMM: the
squeeze weight's gradient and BatchNorm's other sums); then ``z``'s
gradient, ``a (masked w + Σ_k W_k D_k) + β z + γ`` per row. The loops are
in ``csrc/norm_gate.cpp`` (built by :func:`mmctx.models.norm_gate.kernels`);
the per-channel algebra runs in float64. Results equal the plain ops' up to
float rounding, and so do the running statistics and second derivatives
(``tests/test_norm_pixel_gate.py``). Without a compiler the plain ops run.
"""
import torch
import torch.nn.functional as F

from .norm_gate import (affine_of_statistics, batch_statistics,
                        inference_tail_maps_apply, kernels,
                        running_statistics, tail_maps_apply,
                        update_running_statistics)
from .utils import eval_affine, pointwise_conv


def _keep(tensor):
    return tensor


def _offset_products(weight, z):
    """(K, C) weights, (B, C, H, W) map -> (B, K, H * W): per image, the
    weights times the map's (C, H * W) matrix, by the fastest 1x1 conv here
    (:func:`~mmctx.models.utils.pointwise_conv`)."""
    return pointwise_conv(weight[:, :, None, None], z).view(
        z.shape[0], weight.shape[0], -1)


def _offset_maps_of_norm(offset_weights, scale, shift, z):
    """(B, K, H, W): the squeeze's per-offset maps of ``x = z * scale +
    shift`` (per channel, float64 ``scale`` and ``shift``), from ``z``:
    ``W x = (W a) z + W b``."""
    offsets = offset_weights.double()
    maps = _offset_products((offsets * scale).to(z.dtype), z)
    return (maps + (offsets @ shift).to(z.dtype)[:, None]).view(
        *z.shape[:1], -1, *z.shape[2:])


class _NormPixelGateAddReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, z, identity, weight, bias, offset_weights,
                running_mean, running_var, factor, eps, psi, ops,
                *head_params):
        batch, _, height, width = z.shape
        count = batch * height * width
        sums, squares = ops.row_moments(z, None)
        mean, var = batch_statistics(sums, squares, count)
        invstd, scale, shift = affine_of_statistics(mean, var, weight, bias,
                                                    eps)
        maps = _offset_maps_of_norm(offset_weights, scale, shift, z)
        # The head's graph, for the backward, with its saved tensors kept
        # as they are: outer hooks (activation checkpointing) would pack
        # them and recompute the block to unpack them.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                _keep, _keep):
            maps = maps.requires_grad_()
            pixel_weights = psi.pixel_weights_of_patches(
                psi.patches_of_offset_maps(maps), (height, width))
        pixel_values = pixel_weights.detach().contiguous()
        out = ops.pixel_scale_shift_add_relu(z, identity, scale, shift,
                                             pixel_values, None)
        update_running_statistics(running_mean, running_var, mean, var,
                                  count, factor)
        ctx.save_for_backward(z, weight, bias, offset_weights, out,
                              pixel_values, *head_params)
        ctx.head = maps, pixel_weights
        ctx.moments = mean, invstd, scale, shift
        ctx.eps, ctx.ops, ctx.psi = eps, ops, psi
        return out

    @staticmethod
    def backward(ctx, grad):
        (z, weight, bias, offset_weights, out, pixel_values,
         *head_params) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _NormPixelGateAddReLU._backward_differentiable(
                ctx, grad, z, weight, bias, offset_weights, out, head_params)
        mean, invstd, scale, shift = ctx.moments
        batch, channels, height, width = z.shape
        count = batch * height * width
        masked, pixel_sums, grad_sums, grad_dots = \
            ctx.ops.relu_grad_pixel_moments(grad.contiguous(), out, z,
                                            pixel_values, scale, shift)
        # the head's backward: the per-offset maps' gradient, and its
        # params' (the squeeze's bias, the MLP)
        maps, pixel_weights = ctx.head
        needed = [p for p in head_params if p.requires_grad]
        head_grads = torch.autograd.grad(
            pixel_weights, [maps] + needed,
            pixel_sums.view_as(pixel_weights), allow_unused=True)
        maps_grad = head_grads[0].contiguous().view(batch, -1, height * width)
        # x's gradient is masked * w + Σ_k W[k, c] D[k] per row; BatchNorm's
        # backward needs its sum and its product with z per channel
        offsets = offset_weights.double()
        grad_maps_z = torch.bmm(maps_grad, z.view(batch, channels, -1)
                                .transpose(1, 2)).sum(0).double()  # (K, C)
        grad_maps_sum = maps_grad.sum((0, 2), dtype=torch.float64)  # (K,)
        grad_bias = grad_sums.sum((0, 2)) + grad_maps_sum @ offsets
        grad_z_dot = grad_dots.sum((0, 2)) + (offsets * grad_maps_z).sum(0)
        grad_centred = grad_z_dot - mean * grad_bias
        z_scale = scale * invstd.square() * grad_centred / count
        shift_z = z_scale * mean - scale * grad_bias / count
        grad_z = grad_offsets = None
        if ctx.needs_input_grad[0]:
            grad_z = ctx.ops.combine_pixel_rows(
                masked, z, pixel_values, maps_grad, scale,
                (offsets * scale).t().contiguous(), -z_scale, shift_z)
        if ctx.needs_input_grad[4]:
            # Σ D x = a Σ D z + b Σ D per offset and channel
            grad_offsets = (grad_maps_z * scale + grad_maps_sum[:, None] *
                            shift).to(offset_weights.dtype)
        grads = dict(zip(map(id, needed), head_grads[1:]))
        return (grad_z, masked, (grad_centred * invstd).to(weight.dtype),
                grad_bias.to(bias.dtype), grad_offsets) + (None, ) * 6 + tuple(
                    grads.get(id(p)) for p in head_params)

    @staticmethod
    def _backward_differentiable(ctx, grad, z, weight, bias, offset_weights,
                                 out, head_params):
        """Second derivatives (``create_graph=True``): the same gradients
        from the plain ops on the saved inputs. ReLU's mask is constant
        almost everywhere, so ``out > 0`` stands in for the identity."""
        masked = grad * (out > 0)
        inputs = [t for t in (z, weight, bias, offset_weights, *head_params)
                  if t.requires_grad]
        x = F.batch_norm(z, None, None, weight, bias, True, 0., ctx.eps)
        maps = torch.einsum('kc,bchw->bkhw', offset_weights, x)
        pixel_weights = ctx.psi.pixel_weights_of_patches(
            ctx.psi.patches_of_offset_maps(maps), z.shape[-2:])
        grads = dict(zip(map(id, inputs), torch.autograd.grad(
            x * pixel_weights, inputs, masked, create_graph=True,
            allow_unused=True)))
        return (grads.get(id(z)), masked, grads.get(id(weight)),
                grads.get(id(bias)), grads.get(id(offset_weights))) + (
                    None, ) * 6 + tuple(grads.get(id(p)) for p in head_params)


def applies(norm, z, identity, psi):
    """Whether :func:`norm_pixel_gate_add_relu` takes the fused path:
    ``norm`` a training-mode ``nn.BatchNorm2d``, contiguous float CPU maps,
    eager code (:func:`mmctx.models.norm_gate.tail_maps_apply`)."""
    return psi.squeeze.weight.dtype == z.dtype and tail_maps_apply(
        norm, z, identity, psi) and kernels() is not None


def norm_pixel_gate_add_relu(z, identity, norm, psi):
    """``relu(identity + psi(norm(z)))``, ``norm`` a training-mode
    ``nn.BatchNorm2d``, whose running statistics (and
    ``num_batches_tracked``) are updated as its own forward would. Call
    only where :func:`applies`."""
    running_mean, running_var, factor = running_statistics(norm)
    head_params = [p for name, p in psi.named_parameters()
                   if name != 'squeeze.weight']  # the offset weights: own
    return _NormPixelGateAddReLU.apply(z, identity, norm.weight, norm.bias,
                                       psi.offset_weights(), running_mean,
                                       running_var, factor, norm.eps, psi,
                                       kernels(), *head_params)


def inference_applies(norm, z, identity, psi):
    """Whether :func:`norm_pixel_gate_add_relu_inference` may run: ``norm``
    an eval-mode BatchNorm, contiguous float CPU maps, eager code without
    autograd (:func:`mmctx.models.norm_gate.inference_tail_maps_apply`)."""
    return psi.squeeze.weight.dtype == z.dtype and inference_tail_maps_apply(
        norm, z, identity, psi) and kernels() is not None


def norm_pixel_gate_add_relu_inference(z, identity, norm, psi,
                                       in_place=False):
    """``relu(identity + psi(norm(z)))`` for an eval-mode ``norm``: the
    squeeze's per-offset maps of ``norm(z) = a z + b`` from ``z`` (one 1x1
    conv with the weights scaled by ``a``, plus a constant), the gate's
    small head, then ``relu(identity + (a z + b) w)`` in one pass, where
    the plain ops write the norm's output, the gated sum and the ReLU's in
    three passes and read the norm's output again for the squeeze. Equal to
    the plain ops up to float rounding. ``in_place``: the output
    overwrites ``z`` (the caller's temporary). Call only where
    :func:`inference_applies`."""
    height, width = z.shape[-2:]
    scale, shift = eval_affine(norm, torch.float64)
    maps = _offset_maps_of_norm(psi.offset_weights(), scale, shift, z)
    pixel_weights = psi.pixel_weights_of_patches(
        psi.patches_of_offset_maps(maps), (height, width))
    return kernels().pixel_scale_shift_add_relu(z, identity, scale, shift,
                                                pixel_weights.contiguous(),
                                                z if in_place else None)
