"""The backbones on a GPU (``pytest -m gpu``, run by ``tools/gpu/check.sh``):
forward and backward equal to the CPU, float16 and bfloat16 autocast
training steps, channels_last, and ``torch.compile`` with inductor.

The device is ``MMCTX_TEST_DEVICE`` (default ``cuda``; the tests skip where
CUDA is absent). ``tools/gpu/check.sh --cpu`` runs them with
``MMCTX_TEST_DEVICE=cpu`` so that CI proves the check itself works; there
the CPU is compared with itself, one backbone per module runs (SB alone
for autocast, bfloat16 only, and for compile, a ResNet-14 with the
``aot_eager`` backend; ``tests/test_compile.py`` covers inductor on CPU).
"""
import os

import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.benchmark import BACKBONES, SETTINGS, TrainingStep

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get('MMCTX_TEST_DEVICE', 'cuda'))
if DEVICE.type == 'cuda' and not torch.cuda.is_available():
    pytest.skip('CUDA is not available (MMCTX_TEST_DEVICE=cpu runs these '
                'tests on the CPU)', allow_module_level=True)
ON_GPU = DEVICE.type == 'cuda'

# mmctx's backbones as the cost tools build them, plus local GE gathers
# (their own pooling and interpolation back) and the CIFAR SB-ResNet.
MODELS_UNDER_TEST = {
    name: cfg for name, cfg in BACKBONES.items()
    if not name.startswith(('NL', 'GC'))}
MODELS_UNDER_TEST.update({
    'GE-θ⁻-R50 (e=4)': dict(type='GEResNet', depth=50,
                            ge=dict(variant='parameter_free', extent=4)),
    'GE-θ⁺-R50 (e=2)': dict(type='GEResNet', depth=50,
                            ge=dict(variant='depthwise_excite', extent=2)),
    # the other ResNet families: grouped conv2 (SB joins its output), deep
    # stems, average-pool shortcuts
    'SB-X50-32x4d': dict(type='SBResNeXt', depth=50, groups=32,
                         base_width=4),
    'GE-θ⁺-X50-32x4d': dict(type='GEResNeXt', depth=50, groups=32,
                            base_width=4, reference_input_size=224,
                            ge=dict(variant='depthwise_excite',
                                    extent='global')),
    'PSI-R50-V1d': dict(type='PSIResNetV1d', depth=50),
    'SB-R50-V1c': dict(type='SBResNetV1c', depth=50),
})
if not ON_GPU:  # CPU mode proves the check runs: one backbone per module
    MODELS_UNDER_TEST = {n: MODELS_UNDER_TEST[n] for n in (
        'SB-R50', 'GE-θ-R50', 'PSI-R50')}
SIZE = (2, 3, 96, 128)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off: float32 on the GPU is then comparable with the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved


def build(name, setting='detection'):
    torch.manual_seed(0)
    model = MODELS.build(dict(MODELS_UNDER_TEST[name], **SETTINGS[setting]))
    model.init_weights()
    with torch.no_grad():  # non-trivial gates, biases and norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def forward_backward(model, x):
    model.train()
    x = x.clone().requires_grad_()
    outs = model(x)
    sum(o.float().square().mean() for o in outs).backward()
    grads = {n.replace('_orig_mod.', ''): p.grad.detach().cpu()
             for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach().cpu() for o in outs], grads, x.grad.cpu()


def assert_close(a, b, what, tol=1e-4):
    scale = b.abs().max().clamp_min(1e-6)
    err = (a.float() - b.float()).abs().max() / scale
    assert err < tol, f'{what}: max |diff| / max |ref| = {err:.2e}'


def assert_grads_close(grads, ref, what, tol=1e-3):
    """All parameter gradients together, relative to their norm: another
    kernel's rounding can move a pre-activation across ReLU's 0 and change a
    few gradient sums by one pixel's share (on a 3x4 map of stage 4, a few
    percent of one bias's gradient); the whole stays within ``tol``."""
    assert set(grads) == set(ref)
    diff = torch.cat([(grads[n] - ref[n]).flatten().double() for n in ref])
    norm = torch.cat([ref[n].flatten().double() for n in ref]).norm()
    err = diff.norm() / norm
    worst = max(ref, key=lambda n: (grads[n] - ref[n]).norm())
    assert err < tol, f'{what}: |diff| / |ref| = {err:.2e} (most: {worst})'


@pytest.mark.parametrize('setting', ['detection', 'segmentation'])
@pytest.mark.parametrize('name', list(MODELS_UNDER_TEST))
def test_forward_backward_on_device_equals_cpu(name, setting):
    if setting == 'segmentation' and name not in ('SB-R50', 'PSI-R50'):
        pytest.skip('training BN: SB and PSI cover it')  # keeps CI short
    model = build(name, setting)
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(1))
    ref_outs, ref_grads, ref_xg = forward_backward(model, x)
    model.zero_grad(set_to_none=True)
    model.to(DEVICE)
    outs, grads, xg = forward_backward(model, x.to(DEVICE))
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(o, r, f'stage {i} output')
    assert_grads_close(grads, ref_grads, 'parameter gradients')
    assert_grads_close({'x': xg}, {'x': ref_xg}, 'input gradient')


# (CPU mode: bfloat16 only, the CPU's autocast type)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16]
                         if ON_GPU else [torch.bfloat16],
                         ids=['fp16', 'bf16'] if ON_GPU else ['bf16'])
@pytest.mark.parametrize('name', list(MODELS_UNDER_TEST) if ON_GPU
                         else ['SB-R50'])  # bf16 convs are slow on CPUs
def test_autocast_training_steps(name, dtype):
    """Four SGD steps under autocast (with a GradScaler for float16, as
    mmengine's AmpOptimWrapper): outputs in the autocast dtype, finite
    losses, a finite gradient for every trainable parameter, and the loss
    goes down."""
    model = build(name).to(DEVICE)
    model.train()  # mmdet's ResNet.train() returns None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type,
                                  enabled=dtype == torch.float16)
    x = torch.randn(*SIZE, device=DEVICE)
    targets, losses = None, []
    for _ in range(4):
        with torch.autocast(DEVICE.type, dtype=dtype):
            outs = model(x)
            if targets is None:
                targets = [torch.rand_like(o, dtype=torch.float32)
                           for o in outs]
            loss = sum((o.float() - t).square().mean()
                       for o, t in zip(outs, targets))
        assert all(o.dtype == dtype for o in outs)
        assert torch.isfinite(loss)
        losses.append(float(loss))
        opt.zero_grad()
        scaler.scale(loss).backward()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in zip(names, trainable):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        scaler.step(opt)
        scaler.update()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize('name', list(MODELS_UNDER_TEST))
def test_channels_last_equals_contiguous(name):
    model = build(name).to(DEVICE)
    x = torch.randn(*SIZE, device=DEVICE)
    ref_outs, ref_grads, _ = forward_backward(model, x)
    model.zero_grad(set_to_none=True)
    model.to(memory_format=torch.channels_last)
    outs, grads, _ = forward_backward(
        model, x.contiguous(memory_format=torch.channels_last))
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(o, r, f'stage {i} output')
    assert_grads_close(grads, ref_grads, 'parameter gradients')
    # a training step as the cost tools time it
    TrainingStep(model, autocast=ON_GPU)(
        x.contiguous(memory_format=torch.channels_last))


# torch.compile: R50-sized backbones with inductor on the GPU; in CPU mode
# a ResNet-14 with aot_eager (inductor's CPU code generation takes minutes).
COMPILED = ['SB-R50', 'GE-θ⁺-R50 (e=2)', 'PSI-R50'] if ON_GPU else ['SB-R50']


def build_for_compile(name):
    if ON_GPU:
        return build(name, 'segmentation').to(DEVICE)
    cfg = dict(MODELS_UNDER_TEST[name], depth=14, base_channels=8)
    if cfg['type'] == 'SBResNet':
        cfg['sb'] = dict(num_bias=3, pool_size=4)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize('name', COMPILED)
def test_compile_on_device_equals_eager(name):
    """One graph (fullgraph), dynamic H and W: a second size compiles
    nothing new; inference and a training forward + backward equal eager."""
    torch._dynamo.reset()
    model = build_for_compile(name)
    # PSI and GE-θ's references are set at build time; inputs large enough
    # that no map is a single pixel (a guard on size 1 would recompile)
    sizes = [(2, 3, 128, 160), (2, 3, 160, 96)]
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend='inductor' if ON_GPU else 'aot_eager')
    tol = 1e-3 if ON_GPU else 1e-5
    model.eval()
    with torch.no_grad():
        for i, size in enumerate(sizes):
            x = torch.randn(*size, device=DEVICE)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                outs = compiled(x)
            for o, r in zip(outs, model(x)):
                assert_close(o, r, f'{size} compiled output', tol)
    x = torch.randn(*sizes[0], device=DEVICE)
    ref_outs, ref_grads, _ = forward_backward(model, x)
    model.zero_grad(set_to_none=True)
    outs, grads, _ = forward_backward(compiled, x)
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, 'compiled training output', tol)
    assert_grads_close(grads, ref_grads, 'compiled parameter gradients',
                       tol * 10)
