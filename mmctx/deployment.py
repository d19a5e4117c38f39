"""Export mmctx backbones to ONNX with dynamic batch, height and width, and
check the exported graph against PyTorch.

The modules' one forward exports as it is (their adaptive pooling is built
for run-time sizes, :func:`mmctx.models.utils.adaptive_avg_pool2d`):
:func:`export_program` is ``torch.export`` with dynamic batch, height and
width, and one program serves every input size; :func:`export_onnx` writes
that program to ONNX; :func:`verify_onnx` runs a file in onnxruntime and
compares it with the eager model.

Only backbones are exported: a detector's or segmentor's test-time
post-processing (mmcv's NMS op, data samples, variable box counts, resizing
to the original image) is not a traceable tensor program without mmdeploy's
rewriters, which do not support the installed OpenMMLab versions.
"""
import contextlib
import copy

import torch

__all__ = ['build_backbone', 'export_program', 'export_onnx', 'verify_onnx',
           'size_oblivious', 'dynamic_shapes', 'reference_shape',
           'input_channels']

INPUT_NAME = 'input'
DYNAMIC_DIMS = {0: 'batch', 2: 'height', 3: 'width'}


class _TupleOutputs(torch.nn.Module):
    """A backbone returning a tuple of maps, as a module that exporters and
    onnxruntime see with stable output names."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input):  # noqa: A002 (the ONNX input's name)
        outs = self.backbone(input)
        return tuple(outs) if isinstance(outs, (tuple, list)) else (outs, )


def _backbone_cfg(config):
    from mmengine.config import Config
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    model = cfg.get('model')
    if model is None:
        raise ValueError(f'{config}: the config has no "model"')
    backbone = copy.deepcopy(model.get('backbone', None))
    if backbone is None:
        raise ValueError(f'{config}: model has no "backbone" to export')
    return cfg, backbone


def reference_shape(config, default=224):
    """The input (H, W) a config's backbone is built for:
    ``reference_input_size`` if it has one, else ``default``."""
    _, backbone = _backbone_cfg(config)
    size = backbone.get('reference_input_size', default)
    return (size, size) if isinstance(size, int) else tuple(size)


def build_backbone(config, checkpoint=None):
    """Build ``model.backbone`` of a detection, segmentation or
    classification config, in eval mode.

    The backbone's ``init_cfg`` / ``pretrained`` (an ImageNet file that may
    not exist here) are dropped: nothing is initialised from them. With
    ``checkpoint``, its weights are loaded with mmengine's
    ``load_checkpoint`` (whole-model checkpoints keep the backbone under
    ``backbone.``); a checkpoint sharing no tensor with the backbone is an
    error.
    """
    from mmengine.registry import MODELS, init_default_scope
    import mmctx  # noqa: F401  (registers the backbones)
    cfg, backbone_cfg = _backbone_cfg(config)
    backbone_cfg.pop('pretrained', None)
    backbone_cfg['init_cfg'] = None
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    backbone = MODELS.build(backbone_cfg)
    if checkpoint is not None:
        _load_backbone_weights(backbone, checkpoint)
    return backbone.eval()


def _load_backbone_weights(backbone, checkpoint):
    from mmengine.runner import load_checkpoint
    ckpt = load_checkpoint(
        backbone, checkpoint, map_location='cpu', strict=False,
        revise_keys=[(r'^module\.', ''), (r'^backbone\.', '')])
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    names = {k[len('module.'):] if k.startswith('module.') else k
             for k in state}
    names = {k[len('backbone.'):] if k.startswith('backbone.') else k
             for k in names}
    if not names & set(backbone.state_dict()):
        raise ValueError(
            f'checkpoint {checkpoint!r} holds no tensor of this backbone '
            '(expected keys like "backbone.conv1.weight" or "conv1.weight")')


@contextlib.contextmanager
def size_oblivious():
    """Let ``torch.export`` reason about sizes as it does for data-dependent
    ones: a size that could be 1 (a strided conv's output, a pooled map)
    does not become a guard.

    Without it torch.export refuses dynamic sizes for which some map can
    shrink to 1 -- any ResNet, stock ones included, fails for inputs below
    33 px, and a GE gather of extent 8 in stage 4 needs inputs above 256 px
    -- only because of memory-layout checks that do not change the graph.
    The program then checks at run time what it assumed: PSI's squeeze
    (a 1x1 conv to one map) needs maps of more than one pixel, i.e. inputs
    of at least 33 px.
    """
    from torch.fx.experimental import _config
    if not hasattr(_config, 'backed_size_oblivious'):  # older torch
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


def dynamic_shapes(max_batch=1024, max_side=16384):
    """``torch.export`` dynamic shapes for one NCHW input: batch, height and
    width dynamic (from 1)."""
    dims = {
        0: torch.export.Dim('batch', min=1, max=max_batch),
        2: torch.export.Dim('height', min=1, max=max_side),
        3: torch.export.Dim('width', min=1, max=max_side),
    }
    return {INPUT_NAME: dims}


def input_channels(backbone):
    """Channels of the backbone's input (its first conv's)."""
    channels = getattr(backbone, 'in_channels', None)
    if isinstance(channels, int):
        return channels
    for module in backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return 3


def _example(backbone, shape, batch):
    channels = input_channels(backbone)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, *shape, generator=gen)


def export_program(backbone, shape=(224, 224), batch=1):
    """``torch.export`` of the backbone (eval mode) with dynamic batch,
    height and width; the program's module returns a tuple of maps."""
    module = _TupleOutputs(backbone.eval())
    example = _example(backbone, shape, batch)
    with size_oblivious():
        return torch.export.export(module, (example, ),
                                   dynamic_shapes=dynamic_shapes())


def export_onnx(backbone, out, shape=(224, 224), batch=1, opset=18,
                program=None):
    """Write the backbone to ONNX file ``out`` with dynamic batch, height
    and width, exported at ``shape`` through :func:`export_program` (pass
    ``program`` to reuse one); return the output names. The file's input
    must have symbolic batch, height and width, else ValueError (no
    silently fixed size).
    """
    import onnx
    backbone = backbone.eval()
    module = _TupleOutputs(backbone)
    example = _example(backbone, shape, batch)
    with torch.no_grad():
        num_outputs = len(module(example))
    output_names = [f'out{i}' for i in range(num_outputs)]
    if program is None:
        program = export_program(backbone, shape, batch)
    with size_oblivious():
        torch.onnx.export(program, (example, ), out,
                          dynamo=True, input_names=[INPUT_NAME],
                          output_names=output_names, opset_version=opset,
                          verbose=False)
    dims = onnx.load(out, load_external_data=False).graph.input[0] \
        .type.tensor_type.shape.dim
    fixed = [DYNAMIC_DIMS[i] for i in DYNAMIC_DIMS if not dims[i].dim_param]
    if fixed:
        raise ValueError(f'{out}: the exported input has a fixed {fixed} '
                         f'({[d.dim_param or d.dim_value for d in dims]})')
    return output_names


def verify_onnx(backbone, onnx_file, shapes, batch=1, seed=0):
    """Run ``onnx_file`` in onnxruntime and the backbone in PyTorch (eval,
    eager) on the same random inputs of each (H, W) in ``shapes``; return
    ``{(H, W): (max abs difference, max abs PyTorch output)}`` over all
    outputs. Differing output counts or shapes give a difference of inf."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_file),
                                   providers=['CPUExecutionProvider'])
    backbone = backbone.eval()
    module = _TupleOutputs(backbone)
    gen = torch.Generator().manual_seed(seed)
    channels = input_channels(backbone)
    results = {}
    for shape in shapes:
        shape = tuple(shape)
        x = torch.randn(batch, channels, *shape, generator=gen)
        with torch.no_grad():
            expected = module(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        diff = 0.0 if len(got) == len(expected) else float('inf')
        for e, g in zip(expected, got):
            if tuple(e.shape) != tuple(g.shape):
                diff = float('inf')
                break
            diff = max(diff, float((e - torch.from_numpy(g)).abs().max()))
        scale = max(float(e.abs().max()) for e in expected)
        results[shape] = (diff, scale)
    return results
