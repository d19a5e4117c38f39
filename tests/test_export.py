"""Export at any size: one ONNX file / torch.export program / jit trace per
backbone serves every input size and equals the eager model there (the
modules have one forward: what is exported is what runs eagerly)."""
import os.path as osp
import subprocess
import sys
import warnings

import pytest
import torch
from mmengine.registry import MODELS

import mmctx  # noqa: F401
from mmctx.deployment import (_TupleOutputs, export_onnx, export_program,
                              verify_onnx)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_modules import randomize  # noqa: E402

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

REF = 64  # reference input size of the small test backbones
# the reference size, a non-square one, one smaller than the reference
# (odd: partial GE windows, PSI patches cut by the border), a larger one
SIZES = [(REF, REF), (48, 80), (33, 45)]
ONNX_SIZES = SIZES + [(96, 72)]
ATOL = 1e-4


def _ge_plugin(variant, extent, stages):
    return dict(cfg=dict(type='GatherExcite', variant=variant,
                         extent=extent, reduction=4, postfix=f'_e{extent}'),
                stages=stages, position='after_conv3')


def ge_backbone(variant):
    """GE-ResNet-14 with every extent of one variant: the global gather of
    GEResNet in all stages plus extent-2/4/8 plugins in two stages each."""
    return dict(
        type='GEResNet', depth=14, base_channels=16, reference_input_size=REF,
        ge=dict(variant=variant, extent='global', reduction=4),
        plugins=[_ge_plugin(variant, 2, (True, True, False, False)),
                 _ge_plugin(variant, 4, (False, True, True, False)),
                 _ge_plugin(variant, 8, (False, False, True, True))])


BACKBONES = {
    'SB': dict(type='SBResNet', depth=14, base_channels=16,
               sb=dict(num_bias=3, pool_size=4)),
    'GE-parameter_free': ge_backbone('parameter_free'),
    'GE-depthwise': ge_backbone('depthwise'),
    'GE-depthwise_excite': ge_backbone('depthwise_excite'),
    # stage maps 16/8/4/2 at 64: patches 4/2/1/1 on grids 4/4/4/2
    'PSI': dict(type='PSIResNet', depth=14, base_channels=16,
                reference_input_size=REF, psi=dict(grid_size=4)),
}


def build(name):
    torch.manual_seed(0)
    return randomize(MODELS.build(BACKBONES[name]))


def inputs(size, batch=2, seed=1):
    return torch.randn(batch, 3, *size,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module', params=list(BACKBONES))
def exported(request, tmp_path_factory):
    """A backbone, its torch.export program (dynamic batch, H, W) and the
    ONNX file exported from that program."""
    model = build(request.param)
    program = export_program(model, shape=(REF, REF))
    out = tmp_path_factory.mktemp('onnx') / f'{request.param}.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        export_onnx(model, str(out), shape=(REF, REF), program=program)
    return request.param, model, program, out


def max_diff(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == tuple(e.shape)
    return max(float((g - e).abs().max()) for g, e in zip(got, expected))


def test_onnx_dynamo_any_size(exported):
    """One file, dynamic axes: onnxruntime equals eager PyTorch at the
    reference size, a non-square, a smaller and a larger size."""
    name, model, _, out = exported
    results = verify_onnx(model, out, ONNX_SIZES, batch=2)
    results.update(verify_onnx(model, out, [(40, 56)], batch=1))
    for size, (diff, scale) in results.items():
        assert diff <= ATOL, (name, size, diff, scale)
        assert scale > 1e-2  # outputs are not trivially small


def test_torch_export_any_size(exported):
    name, model, program, _ = exported
    module = program.module()
    # the smallest: 1-pixel maps in stage 4 (PSI's program asks for 2+:
    # its squeeze's 1x1 conv to one map needs an area above 1 under
    # size-oblivious export)
    tiny = (33, 41) if name == 'PSI' else (17, 23)
    with torch.no_grad():
        for size in SIZES + [tiny]:
            x = inputs(size, batch=1 if size == tiny else 2)
            diff = max_diff(module(x), _TupleOutputs(model)(x))
            assert diff <= 1e-5, (name, size, diff)


@pytest.mark.parametrize('name', list(BACKBONES))
def test_jit_trace_at_reference_size_generalises(name):
    model = _TupleOutputs(build(name))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(model, inputs((REF, REF)),
                                 check_trace=False)
    with torch.no_grad():
        for size in SIZES:
            x = inputs(size, seed=2)
            diff = max_diff(traced(x), model(x))
            assert diff <= 1e-5, (name, size, diff)


# ------------------------------------------------------------------- the CLI
def test_export_onnx_cli_with_checkpoint(tmp_path):
    """A detection-style config whose init_cfg names a missing ImageNet file
    and a whole-model checkpoint (``backbone.`` keys): the tool exports,
    loads the weights and verifies at the given size."""
    cfg = dict(BACKBONES['GE-depthwise_excite'],
               init_cfg=dict(type='Pretrained',
                             checkpoint=str(tmp_path / 'missing_r50.pth')))
    config = tmp_path / 'ge_detector.py'
    config.write_text(
        "default_scope = 'mmdet'\n"
        "custom_imports = dict(imports=['mmctx'], "
        'allow_failed_imports=False)\n'
        f"model = dict(type='FasterRCNN', backbone={cfg!r})\n")
    model = build('GE-depthwise_excite')
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state['neck.lateral.weight'] = torch.zeros(1)
    torch.save(dict(state_dict=state, meta=dict()), tmp_path / 'model.pth')
    out = tmp_path / 'ge.onnx'
    proc = subprocess.run(
        [sys.executable, 'tools/deployment/export_onnx.py', str(config),
         str(tmp_path / 'model.pth'), '--out', str(out), '--shape', '48',
         '80', '--verify-shape', '33', '45'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'at 48x80: max abs diff' in proc.stdout
    assert 'at 33x45: max abs diff' in proc.stdout
    assert 'FAILED' not in proc.stdout
    # the file holds the checkpoint's weights: it equals `model`
    for size, (diff, _) in verify_onnx(model, out, [(REF, REF), (50, 30)],
                                       batch=2).items():
        assert diff <= ATOL, (size, diff)
