"""Gating multiplies with hand-written backward passes.

A gate ``g`` that broadcasts over a feature map ``x`` (one value per image
and channel) is what GE applies, ``x * g``. Autograd's backward of that
product materialises ``grad * x`` as a full map before summing it to the
gate's shape, and a global mean in front of the gate adds another full map
(the mean's expanded gradient) and a third pass to add it to ``x``'s
gradient. These functions compute the same gradients with the reductions
done as dot products (no full-size temporaries) and, for GE-θ⁻, ``x``'s
whole gradient in one pass. Given the block's ``identity``, they also do
the residual add in the same pass (``addcmul``); so does PSI's gate, one
weight per image and pixel (:func:`pixel_gate_add`). Results equal autograd's
up to float rounding (``tests/test_fast_paths.py``), and so do second
derivatives (``create_graph=True``: the backward passes are built from
differentiable ops on the saved inputs); traced and exported graphs use the
plain ops (``size_generic_path``).
"""
import torch
import torch.nn.functional as F

from .utils import size_generic_path


# Above this size a temporary map is a fresh allocation whose page faults
# cost more than the product (glibc serves blocks above its mmap threshold,
# at most 32 MiB, with fresh pages). Only non-contiguous (channels_last)
# maps still choose by it: contiguous ones take the batched dot products
# below, which write no temporary at all.
_TEMPORARY_LIMIT = 32 << 20

# Images per batched product in ``_channel_dots``: MKL's batched GEMM runs
# this product 2-3x slower per image from 16 images on (2 CPU threads).
_IMAGES_PER_PRODUCT = 8

# Below this many pixels per map, the kernel gradient's batched product
# costs more per call than a product and a sum.
_MIN_PIXELS_FOR_PRODUCT = 64


def _small(x):
    return x.numel() * x.element_size() <= _TEMPORARY_LIMIT


def _row_dots(a, b):
    """(R, N), (R, N) -> (R, 1, 1): each row of ``a`` dotted with the same
    row of ``b``, as one batched GEMM whose second operand is ``b`` read
    transposed in place, so that both operands have unit strides (given as
    an (N, 1) column view instead, MKL takes a path 4-9x slower:
    ``tools/analysis/fast_path_ab.py``)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(1).transpose(1, 2))


def _dot_hw(a, b):
    """sum over H, W of ``a * b``, (B, C, H, W) -> (B, C, 1, 1): batched dot
    products for contiguous maps (one read of each, no (B, C, H, W)
    temporary), else the product and a sum."""
    batch, channels = a.shape[:2]
    if a.is_contiguous() and b.is_contiguous():
        rows = batch * channels
        return _row_dots(a.view(rows, -1), b.view(rows, -1)).view(
            batch, channels, 1, 1)
    return (a * b).sum((2, 3), keepdim=True)


def _channel_dots(x, weight):
    """(B, C, H, W), (C, H, W) -> (B, C), each channel's dot product with its
    own kernel, for contiguous ``x`` and ``weight``: per channel, the
    images' rows times the kernel, a batched GEMM over channels that reads
    ``x`` and the kernels in place."""
    batch, channels = x.shape[:2]
    kernels = weight.reshape(channels, 1, -1).transpose(1, 2)  # (C, N, 1)
    maps = x.view(batch, channels, -1)
    dots = [torch.bmm(chunk.transpose(0, 1), kernels)
            for chunk in maps.split(_IMAGES_PER_PRODUCT)]  # (C, b, 1) each
    dots = dots[0] if len(dots) == 1 else torch.cat(dots, 1)
    return dots.view(channels, batch).t().contiguous()


def _channel_dot_values(x, weight):
    """``einsum('bchw,chw->bc', x, weight)``, without autograd."""
    if x.is_contiguous() and weight.is_contiguous():
        return _channel_dots(x, weight)
    if _small(x):
        return (x * weight).sum((2, 3))
    return torch.einsum('bchw,chw->bc', x, weight)


def _kernel_grad(grad, x):
    """(B, C), (B, C, H, W) -> (C, H, W): Σ_b grad[b, c] x[b, c], the
    gradient of each channel's kernel in :func:`_channel_dots`."""
    batch, channels = x.shape[:2]
    if batch == 1:
        return grad.view(-1, 1, 1) * x[0]
    if x.is_contiguous() and x[0, 0].numel() >= _MIN_PIXELS_FOR_PRODUCT:
        # per channel, the images' gradients times their rows
        return torch.bmm(grad.t().contiguous().unsqueeze(1),
                         x.view(batch, channels, -1).transpose(0, 1)).view(
                             x.shape[1:])
    if _small(x):
        return (grad[..., None, None] * x).sum(0)
    return torch.einsum('bc,bchw->chw', grad, x)


class _ChannelGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(x, gate)
        return x * gate

    @staticmethod
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors
        grad_x = (grad * gate).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        grad_gate = _dot_hw(grad.contiguous(), x.to(grad.dtype)).to(
            gate.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_gate


class _ChannelGateAdd(torch.autograd.Function):
    """``identity + x * gate``: the gate and the block's residual add in one
    pass over the map (``addcmul``) instead of a product and an add."""

    @staticmethod
    def forward(ctx, x, gate, identity):
        ctx.save_for_backward(x, gate)
        return torch.addcmul(identity, x, gate)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_gate = _ChannelGate.backward(ctx, grad)
        return grad_x, grad_gate, grad if ctx.needs_input_grad[2] else None


class _PixelGateAdd(_ChannelGateAdd):
    """``identity + x * weights`` with one weight per image and pixel,
    (B, 1, H, W) (PSI); the forward is ``_ChannelGateAdd``'s. Autograd's
    ``addcmul`` backward forms ``x * value`` (value = 1) as a full map
    before multiplying it by the gradient: a pass over the map that
    computes nothing. This one takes the products straight from the saved
    inputs."""

    @staticmethod
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * weights).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weights = (grad * x).sum(1, keepdim=True).to(weights.dtype)
        return grad_x, grad_weights, grad if ctx.needs_input_grad[2] else None


class _ChannelDot(torch.autograd.Function):
    """(B, C, H, W) x (C, H, W) -> (B, C): each channel's dot product with
    its own kernel, i.e. a depthwise conv whose kernel covers the map. The
    input's gradient comes out contiguous (autograd's einsum backward gives
    a channel-major one, which every layer below then pays for)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _channel_dot_values(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad[..., None, None] * weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _kernel_grad(grad.to(x.dtype), x)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight


class _GlobalMeanGate(torch.autograd.Function):
    """``x * sigmoid(mean_HW(x))``, plus ``identity`` if one is given (the
    block's residual add in the same pass)."""

    @staticmethod
    def forward(ctx, x, identity=None):
        gate = x.mean((2, 3), keepdim=True).sigmoid()
        ctx.save_for_backward(x, gate)
        if identity is None:
            return x * gate
        return torch.addcmul(identity, x, gate)

    @staticmethod
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph (double backward): the saved gate was computed
            # without autograd, so rebuild it from x for its own gradient.
            gate = x.mean((2, 3), keepdim=True).sigmoid()
        area = x.shape[2] * x.shape[3]
        # d/dx_i of x_i * s(m) with m = mean(x): s(m) + <grad, x> s'(m) / area
        # for every pixel i of the channel.
        grad = grad.contiguous()
        grad_mean = _dot_hw(grad, x.to(grad.dtype)) * (
            gate * (1 - gate)) / area
        grad_x = channel_scale_shift(grad, gate, grad_mean).to(x.dtype)
        return grad_x, grad if ctx.needs_input_grad[1] else None


def channel_scale_shift(x, scale, shift):
    """``shift + x * scale`` for a (B, C, H, W) map and (B, C, 1, 1)
    ``scale`` and ``shift`` (or (1, C, 1, 1) ``shift``).

    ``addcmul`` with a broadcast first operand runs 2-3x slower on CPU than
    a plain per-channel multiply-add (``tools/analysis/fast_path_ab.py``).
    For contiguous float maps on CPU, outside autograd and autocast, this
    is therefore PyTorch's inference batch-norm kernel over the (1, B * C,
    H, W) view with mean 0, variance 1 and eps 0: per row, ``x * weight +
    bias`` with the scale as weight and the shift as bias (1 / sqrt(1 + 0)
    is exactly 1). Equal to ``addcmul`` up to float rounding."""
    if x.dim() != 4 or x.device.type != 'cpu' or not x.is_contiguous() \
            or x.dtype not in (torch.float32, torch.float64) \
            or scale.dtype != x.dtype or shift.dtype != x.dtype \
            or torch.is_autocast_enabled('cpu') or size_generic_path(x) \
            or torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
                t.requires_grad for t in (x, scale, shift))):
        return torch.addcmul(shift, x, scale)
    batch, channels, height, width = x.shape
    rows = batch * channels
    weight = scale.expand(batch, channels, 1, 1).reshape(rows)
    bias = shift.expand(batch, channels, 1, 1).reshape(rows)
    return F.batch_norm(x.view(1, rows, height, width), x.new_zeros(rows),
                        x.new_ones(rows), weight, bias, False, 0., 0.).view(
                            batch, channels, height, width)


def _fused(x, *tensors):
    """Whether to use the hand-written backward: only when autograd records
    (eager, 4-D maps; traced and exported graphs, FLOP counters included,
    keep the plain ops)."""
    return torch.is_grad_enabled() and x.dim() == 4 \
        and any(t.requires_grad for t in (x, *tensors)) \
        and not size_generic_path(x) and not torch.jit.is_tracing()


def channel_gate(x, gate):
    """``x * gate`` for a (B, C, H, W) map and a (B, C, 1, 1) gate."""
    if _fused(x, gate) and gate.shape == (*x.shape[:2], 1, 1):
        return _ChannelGate.apply(x, gate)
    return x * gate


def channel_gate_add(x, gate, identity):
    """``identity + x * gate`` (a (B, C, 1, 1) gate), in one pass."""
    if _fused(x, gate, identity) and gate.shape == (*x.shape[:2], 1, 1):
        return _ChannelGateAdd.apply(x, gate, identity)
    return torch.addcmul(identity, x, gate)


def pixel_gate_add(x, weights, identity):
    """``identity + x * weights`` for (B, 1, H, W) ``weights``, in one pass,
    with a backward that skips autograd's extra pass (``_PixelGateAdd``)."""
    if _fused(x, weights, identity) \
            and weights.shape == (x.shape[0], 1, *x.shape[2:]):
        return _PixelGateAdd.apply(x, weights, identity)
    return torch.addcmul(identity, x, weights)


def channel_dot(x, weight):
    """``einsum('bchw,chw->bc', x, weight)`` with contiguous gradients.
    Under autocast, einsum itself: autocast runs it (like the depthwise conv
    it stands for) in the low-precision dtype, while the product and sum
    inside the hand-written one would promote to float32 and carry float32
    through the gate into the block's output. Inference (nothing to
    record) takes the same batched dot products without autograd."""
    if x.dim() != 4 or weight.shape != x.shape[1:] \
            or torch.is_autocast_enabled(x.device.type) \
            or size_generic_path(x) or torch.jit.is_tracing():
        return torch.einsum('bchw,chw->bc', x, weight)
    if _fused(x, weight):
        return _ChannelDot.apply(x, weight)
    if dot_loops_apply(x, weight):
        # one vectorised read of the map, about twice as fast as the
        # batched GEMV at stage 1 of 224 b8 (0.41 vs 0.78 ms)
        from .norm_gate import kernels
        return kernels().channel_dots(x, weight, None).to(x.dtype)
    return _channel_dot_values(x, weight)


def dot_loops_apply(x, weight):
    """Whether :func:`channel_dot` without autograd runs as C++ loops
    (``norm_gate.kernels().channel_dots``): contiguous float32 / float64
    CPU maps and kernels of one dtype, the loops compiled."""
    from .norm_gate import kernels
    return (x.device.type == 'cpu' and x.is_contiguous()
            and weight.is_contiguous() and weight.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float64)
            and kernels() is not None)


def global_mean_gate(x, identity=None):
    """``x * sigmoid(mean_HW(x))`` (GE-θ⁻ with a global extent), plus
    ``identity`` in the same pass if given."""
    if _fused(x, *(() if identity is None else (identity, ))):
        return _GlobalMeanGate.apply(x, identity)
    gate = x.mean((2, 3), keepdim=True).sigmoid()
    return x * gate if identity is None else torch.addcmul(identity, x, gate)
