"""Upstream semantics: hooks on every submodule fire as in the plain ResNet,
and a researcher who edits a context module's forward sees the effect (the
module that is read is the module that runs)."""
from collections import Counter

import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.models import GatherExcite, PatchSpatialInteraction, SpatialBias

SMALL = dict(depth=14, base_channels=16)
PLAIN = dict(type='mmdet.ResNet', depth=50, base_channels=16)


def _ge(variant):
    return dict(type='GEResNet', **SMALL, reference_input_size=64,
                ge=dict(variant=variant, extent='global', reduction=4),
                plugins=[dict(cfg=dict(type='GatherExcite', variant=variant,
                                       extent=2, reduction=4, postfix='_e2'),
                              stages=(True, True, False, False),
                              position='after_conv3')])


BACKBONES = {
    'R': dict(type='ContextResNet', **SMALL),
    'SB': dict(type='SBResNet', **SMALL, sb=dict(num_bias=3, pool_size=4)),
    'GE-θ⁻': _ge('parameter_free'),
    'GE-θ': _ge('depthwise'),
    'GE-θ⁺': _ge('depthwise_excite'),
    'PSI': dict(type='PSIResNet', **SMALL, reference_input_size=64,
                psi=dict(grid_size=4)),
    'CIFAR-SB': dict(type='CifarResNet', depth=11,
                     sb=dict(num_bias=3, pool_size=4)),
}


def build(name, **kwargs):
    """The backbone, initialised, then every parameter moved a little: at
    init the residual branches are zero (``zero_init_residual``) and so is
    every context module's effect."""
    torch.manual_seed(0)
    model = MODELS.build(dict(BACKBONES[name], **kwargs))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def not_in_place(model):
    """ReLUs that do not write over their input: a full backward hook
    cannot wrap a tensor that is later modified in place (upstream too)."""
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    return model


def count_hook_calls(model, x):
    """Forward and full backward hook calls per submodule name over one
    forward + backward of ``model`` on ``x``."""
    forward, backward = Counter(), Counter()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: forward.update([name])))
        handles.append(module.register_full_backward_hook(
            lambda m, gi, go, name=name: backward.update([name])))
    try:
        outs = model(x)
        sum(o.float().square().mean() for o in outs).backward()
    finally:
        for handle in handles:
            handle.remove()
    return forward, backward


@pytest.mark.parametrize('name', list(BACKBONES))
def test_every_hook_fires_as_upstream(name):
    """A forward hook and a full backward hook on every submodule: each
    fires once per call of its module; every layer the context backbone
    shares with the plain ResNet (the same depth and widths) fires as often
    as there, and every context submodule fires once per forward."""
    model = not_in_place(build(name)).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    forward, backward = count_hook_calls(model, x)
    # (containers that are never called, as in upstream ResNet: ModuleList)
    names = {n for n, m in model.named_modules() if n and not isinstance(
        m, (torch.nn.ModuleList, torch.nn.ModuleDict))}
    # every submodule ran, and backward reached every one that ran
    assert set(forward) == names, sorted(names - set(forward))
    assert set(backward) == set(forward), sorted(set(forward) -
                                                 set(backward))
    assert forward == backward
    if name == 'CIFAR-SB':
        plain = MODELS.build(dict(type='CifarResNet', depth=11, sb=None))
    else:
        plain = MODELS.build(dict(type='ContextResNet', **SMALL))
    plain_forward, _ = count_hook_calls(not_in_place(plain).train(), x)
    for layer, calls in plain_forward.items():
        assert forward[layer] == calls, (layer, forward[layer], calls)
    context_types = (SpatialBias, GatherExcite, PatchSpatialInteraction)
    for layer, module in model.named_modules():
        if isinstance(module, context_types):
            assert forward[layer] == 1, layer
            for sub, piece in module.named_modules():
                if sub and not isinstance(piece, torch.nn.ModuleList):
                    # each piece of the module runs once
                    assert forward[f'{layer}.{sub}'] == 1, (layer, sub)


def test_plain_layers_match_mmdet_resnet_calls():
    """The mmctx base backbone calls its layers exactly as mmdet's ResNet
    (the reference for 'as upstream')."""
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ours, _ = count_hook_calls(not_in_place(MODELS.build(
        dict(PLAIN, type='ContextResNet'))).train(), x)
    upstream = not_in_place(MODELS.build(PLAIN))
    upstream.train()  # (upstream's train() returns None)
    with pytest.raises(RuntimeError, match='modified inplace'):
        # upstream's `out += identity`: full backward hooks fail on bn3
        count_hook_calls(upstream, x)
    theirs = Counter()
    for name, module in upstream.named_modules():
        if name:
            module.register_forward_hook(
                lambda m, i, o, name=name: theirs.update([name]))
    upstream(x)
    assert ours == theirs


def _scaled(module, factor=2.0):
    """Replace ``module``'s forward by one that scales its output, as a
    researcher editing the module would."""
    original = module.forward

    def forward(*args, **kwargs):
        return original(*args, **kwargs) * factor

    module.forward = forward


@pytest.mark.parametrize('name', list(BACKBONES)[1:])
@pytest.mark.parametrize('training', [True, False])
def test_editing_a_module_changes_the_backbone(name, training):
    """Each context module's forward, edited (its output scaled), changes
    the backbone's output, in CPU training and in inference."""
    x = torch.randn(2, 3, 64, 64)
    model = build(name).train(training)
    context_types = (SpatialBias, GatherExcite, PatchSpatialInteraction)
    edited = [m for m in model.modules() if isinstance(m, context_types)]
    assert edited
    for module in edited:
        if isinstance(module, SpatialBias):
            # the bias maps only (the concatenated map also holds conv2's)
            original = module.spatial_bias
            module.spatial_bias = lambda *a, f=original: f(*a) * 2.0
        else:
            _scaled(module)
    with torch.set_grad_enabled(training):
        reference = build(name).train(training)(x)
        out = model(x)
    for got, expected in zip(out, reference):
        assert got.shape == expected.shape
    assert any(not torch.allclose(g, e) for g, e in zip(out, reference))


def test_doubling_the_bias_maps_changes_sb_in_training_and_inference():
    """The issue's own example: doubling the bias maps in SpatialBias
    changes SB-ResNet's CPU outputs."""
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        model = build('SB').train(training)
        with torch.set_grad_enabled(training):
            before = model(x)
            original = SpatialBias.spatial_bias
            try:
                SpatialBias.spatial_bias = \
                    lambda self, *a: original(self, *a) * 2
                after = model(x)
            finally:
                SpatialBias.spatial_bias = original
        assert not torch.allclose(before[-1], after[-1])
