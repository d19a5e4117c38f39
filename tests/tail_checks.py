"""Helpers shared by the tests of the fused training tails
(``test_norm_gate.py``, ``test_norm_pixel_gate.py``): random BatchNorms,
one training step's results of a tail or a backbone, and the comparison of
float32 results with float64 ones."""
import torch
import torch.nn as nn


def random_norm(channels, dtype, **kwargs):
    norm = nn.BatchNorm2d(channels, **kwargs).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if norm.running_mean is not None:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    return norm


def tail_results(tail, z, identity, norm, gate):
    z = z.detach().clone().requires_grad_()
    identity = identity.detach().clone().requires_grad_()
    norm.zero_grad()
    gate.zero_grad()
    out = tail(z, identity, norm, gate)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return [out.detach(), z.grad, identity.grad, norm.weight.grad,
            norm.bias.grad] + [p.grad for p in gate.parameters()] + [
                b.clone() for m in (norm, gate) for b in m.buffers()]


def backbone_step(net, x):
    net.zero_grad()
    x = x.clone().requires_grad_()
    outs = net(x)
    sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum()
        for o in outs).backward()
    return [o.detach() for o in outs] + [x.grad] + [
        p.grad.clone() for p in net.parameters()] + [
        b.clone() for b in net.buffers()]


def assert_as_close_as_plain(fused, plain, reference):
    """Fused results equal the plain ones: in float64 to 1e-10; in float32
    as close to the float64 ``reference`` as the plain float32 ops are, or
    within 1e-5 of the tensor's largest value (float32 sums in another
    order; how close the plain ops come depends on the CPU's kernels) or
    1e-6 of the largest value of all results (a gradient summed over a
    batch with cancellation, such as a bias's, is small but carries the
    rounding of its large terms)."""
    assert len(fused) == len(plain) == len(reference)
    largest = max(float(r.abs().max()) for r in reference
                  if r.is_floating_point())
    for a, b, r in zip(fused, plain, reference):
        if a.dtype is torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            continue
        scale = float(r.abs().max()) if r.is_floating_point() else 1
        plain_error = float((b.to(r.dtype) - r).abs().max())
        torch.testing.assert_close(a.to(r.dtype), r, rtol=0, atol=max(
            1e-5 * scale, 1e-6 * largest, 4 * plain_error))
