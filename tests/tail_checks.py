"""Helpers shared by the tests of the fused training tails
(``test_norm_gate.py``, ``test_norm_pixel_gate.py``): random BatchNorms,
one training step's results of a tail or a backbone, and the comparison of
float32 results with float64 ones."""
import copy

import torch
import torch.nn as nn
from mmengine.registry import MODELS

from mmctx.models.utils import size_generic


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


def gated_backbone(gate_name, gate_std, **cfg):
    """A depth-14 gated ResNet (``cfg``: type, its gate's dict, more
    arguments) for 32x32 inputs in float64, with real weights (bn3 and the
    gates start at zero): BN weights in [0.5, 1.5], biases in [-0.2, 0.2],
    the gate modules (``gate_name`` in their parameter names) N(0,
    ``gate_std``)."""
    torch.manual_seed(0)
    net = MODELS.build(dict(dict(depth=14, reference_input_size=32,
                                 norm_eval=False), **cfg))
    net.init_weights()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if 'bn' in name or 'norm' in name:
                p.uniform_(0.5, 1.5) if name.endswith('weight') else \
                    p.uniform_(-0.2, 0.2)
            elif gate_name in name:
                p.normal_(0, gate_std)
    return net.double()


def count_calls(monkeypatch, module, name):
    """A list that gets one entry per call of ``module.name``."""
    calls = []
    function = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *args: calls.append(1) or function(*args))
    return calls


def assert_fused_backbone_matches_plain(net, module, fused_name, with_cp,
                                        monkeypatch):
    """``net`` (training, 4 gated blocks) takes ``module``'s fused tail
    (``module.fused_name`` where ``module.applies``) in every block and
    gives the plain blocks' outputs, gradients and BN statistics, at the
    reference size (32) and another one (40)."""
    state = copy.deepcopy(net.state_dict())
    applies = module.applies
    for size in (32, 40):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        results = []
        for fused in (True, False):
            net.load_state_dict(state)
            calls = count_calls(monkeypatch, module, fused_name)
            monkeypatch.setattr(module, 'applies',
                                applies if fused else lambda *args: False)
            results.append(backbone_step(net, x))
            monkeypatch.undo()
            # with_cp runs each block's forward again in the backward
            assert len(calls) == (4 * (1 + with_cp) if fused else 0)
        # float64; the fused variance is E[z²] - E[z]², which loses digits
        # of float64 maps (not of float32 ones, summed in float64)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def assert_plain_where_fused_tail_does_not_apply(backbone, gate_name, calls):
    """Backbones from ``backbone(**kwargs)`` (4 gated blocks, float64)
    take the fused tail (``calls``: one entry per fused call) in training
    with BN updating, and the plain ops with eval-mode BN, hooks on bn3,
    the ReLU or the gate (``gate_name``), channels-last maps, the
    size-generic path, another plugin after the gate, GroupNorm or
    autocast."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(net, x=x):
        calls.clear()
        backbone_step(net, x)
        return len(calls)

    assert run(backbone().train()) == 4
    assert run(backbone(norm_eval=True).train()) == 0
    net = backbone().train()
    net.layer1[0].bn3.register_forward_hook(lambda *args: None)
    net.layer2[0].relu.register_forward_hook(lambda *args: None)
    getattr(net.layer3[0], gate_name).register_forward_pre_hook(
        lambda *args: None)
    assert run(net) == 1
    # 64 pixels: layer4's map is 2x2 (a 1x1 map is contiguous either way)
    assert run(backbone().train(), torch.randn(
        2, 3, 64, 64, dtype=torch.float64).to(
            memory_format=torch.channels_last)) == 0
    with size_generic():
        assert run(backbone().train()) == 0
    net = backbone(plugins=[dict(
        cfg=dict(type='ContextBlock', ratio=1. / 4), position='after_conv3',
        stages=(True, False, False, False))]).train()
    assert run(net) == 3
    assert run(backbone(norm_cfg=dict(type='GN', num_groups=4))
               .train()) == 0
    net = backbone().float().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert run(net, x.float()) == 0
    return run
