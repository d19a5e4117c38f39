"""Compatibility fixes that let the OpenMMLab 2.x stack (mmengine 0.10.7,
mmcv 2.1.0, mmdet 3.3.0, mmseg 1.2.2, mmpretrain 1.2.0) run on current torch
and on machines without CUDA.

Applied once when ``mmctx`` is imported -- by our ``tools/*.py`` and also by
the stock mmdet/mmseg/mmpretrain tools when a config says
``custom_imports = dict(imports=['mmctx'])`` (the config is parsed, and mmctx
imported, before the ``Runner`` initialises distributed training or loads a
checkpoint). Every fix is idempotent and as narrow as possible:

1. :func:`allow_mmengine_checkpoint_globals` -- torch >= 2.6 loads with
   ``weights_only=True`` by default, and mmengine checkpoints contain a few
   non-tensor objects (``HistoryBuffer`` in the message hub, numpy arrays and
   scalars in the logged history). We add exactly those types to torch's
   weights-only allowlist; ``weights_only`` itself is left alone.
2. :func:`patch_cpu_distributed` -- only when ``torch.cuda.is_available()`` is
   False: mmengine's launchers call ``torch.cuda.set_device`` and default to
   NCCL, DDP gets ``device_ids=[LOCAL_RANK]`` and ``SyncBatchNorm`` refuses
   CPU tensors. We init with gloo, skip ``set_device``, build DDP with
   ``device_ids=None`` and revert SyncBN to BN under CPU DDP.
3. :func:`allow_mmpretrain_without_torchvision` -- nothing here (or in
   mmctx) imports torchvision: there is no CPU build of it for current torch,
   so configs must not use ``torchvision://`` weights. mmpretrain 1.2.0
   however imports torchvision at module level in four modules that every
   ``import mmpretrain.models / .datasets / .evaluation`` goes through. Only
   when torchvision is *not installed*, those four modules are executed with
   a private stand-in for the few torchvision names they use (box IoU
   functions in pure torch, ``pil_to_tensor``, ``InterpolationMode``); the
   stand-in is never put in ``sys.modules``, and the torchvision-only
   features (``torchvision/*`` transform wrappers, ``MAERandomResizedCrop``)
   raise a clear error when used.
"""
import builtins
import contextlib
import enum
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

import torch

__all__ = [
    'apply', 'allow_mmengine_checkpoint_globals', 'patch_cpu_distributed',
    'mmengine_checkpoint_globals', 'allow_mmpretrain_without_torchvision'
]

_APPLIED = False
_PATCH_FLAG = '_mmctx_cpu_patched'


# --------------------------------------------------------------------------
# 1. torch.load(weights_only=True) of mmengine checkpoints
# --------------------------------------------------------------------------
def _history_buffer_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` in weights-only loads.

    ``HistoryBuffer.__getstate__`` pickles its ``statistics_methods`` (plain
    functions such as ``HistoryBuffer.mean``), which pickle protocol 2
    (torch.save's) writes as ``getattr(HistoryBuffer, 'mean')``. Allowing the
    real ``getattr`` would let a checkpoint reach any attribute of any
    allowed object; this one only hands out methods of ``HistoryBuffer``.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if (isinstance(obj, type) and issubclass(obj, HistoryBuffer)
            and isinstance(name, str) and not name.startswith('_')
            and callable(getattr(obj, name, None))):
        return getattr(obj, name)
    import pickle
    raise pickle.UnpicklingError(
        f'weights-only load: getattr({obj!r}, {name!r}) is not allowed '
        '(mmctx only allows HistoryBuffer methods)')


def mmengine_checkpoint_globals() -> list:
    """The non-tensor globals found in mmengine (mmdet/mmseg/mmpretrain)
    training checkpoints, in the form ``torch.serialization.add_safe_globals``
    takes (objects, or ``(object, 'pickled.name')`` for objects pickled under
    another name, e.g. numpy 1.x's ``numpy.core`` vs numpy 2.x's
    ``numpy._core``).

    Found empirically with ``torch.serialization.
    get_unsafe_globals_in_checkpoint`` on checkpoints of short mmdet/mmseg
    trainings: ``message_hub.log_scalars`` holds ``HistoryBuffer`` objects
    whose buffers are numpy arrays (pickled through ``_reconstruct``,
    ``ndarray`` and a ``dtype``) and whose statistics methods are pickled
    through ``getattr(HistoryBuffer, name)`` (mapped to a restricted getattr,
    see :func:`_history_buffer_getattr`); logged values may be numpy scalars
    (``multiarray.scalar`` and a ``dtype``).
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core import multiarray as _multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as _multiarray

    safe = [
        HistoryBuffer, np.ndarray, np.dtype,
        (_history_buffer_getattr, 'builtins.getattr'),
    ]
    # both spellings, so checkpoints written under numpy 1.x and 2.x load
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        safe.append((_multiarray._reconstruct, f'{mod}._reconstruct'))
        safe.append((_multiarray.scalar, f'{mod}.scalar'))
    # numpy >= 1.25 pickles dtypes as their own classes (Float64DType, ...)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                safe.append(obj)
    return safe


def allow_mmengine_checkpoint_globals() -> bool:
    """Add :func:`mmengine_checkpoint_globals` to torch's weights-only
    allowlist (torch >= 2.4; a no-op before). Returns whether it did."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return False
    add(mmengine_checkpoint_globals())
    return True


# --------------------------------------------------------------------------
# 2. distributed training on CPU (gloo)
# --------------------------------------------------------------------------
def _cuda_missing() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def _no_cuda_set_device():
    """mmengine's launchers unconditionally call ``torch.cuda.set_device``,
    which raises on CPU-only torch. Skip it for the duration of the init."""
    orig = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = orig


def _cpu_launcher(orig):

    @functools.wraps(orig)
    def init(backend='gloo', *args, **kwargs):
        if not _cuda_missing():
            return orig(backend, *args, **kwargs)
        if backend in (None, 'nccl'):
            from mmengine.logging import print_log
            print_log(
                'mmctx: CUDA is not available: distributed training uses '
                'the gloo backend instead of nccl', logger='current',
                level=logging.INFO)
            backend = 'gloo'
        with _no_cuda_set_device():
            return orig(backend, *args, **kwargs)

    setattr(init, _PATCH_FLAG, True)
    return init


def _patch_ddp(cls):
    """DDP on CPU modules needs ``device_ids=None`` (mmengine passes
    ``[LOCAL_RANK]``)."""
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        if _cuda_missing():
            kwargs['device_ids'] = None
            kwargs.pop('output_device', None)
        orig(self, *args, **kwargs)

    setattr(__init__, _PATCH_FLAG, True)
    cls.__init__ = __init__


def _patch_wrap_model(runner_cls):
    """Under CPU DDP, ``SyncBatchNorm`` (used by e.g. mmseg configs) raises
    on CPU tensors: revert it to plain BN, as mmengine already does for
    non-distributed runs, and ignore ``cfg.sync_bn``."""
    orig = runner_cls.wrap_model

    @functools.wraps(orig)
    def wrap_model(self, model_wrapper_cfg, model):
        if not (_cuda_missing() and self.distributed):
            return orig(self, model_wrapper_cfg, model)
        from mmengine.model import is_model_wrapper, revert_sync_batchnorm
        if not is_model_wrapper(model):
            model = revert_sync_batchnorm(model)
        sync_bn = self.cfg.get('sync_bn', None)
        if sync_bn is not None:
            self.cfg.pop('sync_bn')
            self.logger.warning(f'cfg.sync_bn={sync_bn!r} ignored: SyncBN '
                                'needs CUDA; using BN on this CPU machine.')
        try:
            return orig(self, model_wrapper_cfg, model)
        finally:
            if sync_bn is not None:
                self.cfg['sync_bn'] = sync_bn

    setattr(wrap_model, _PATCH_FLAG, True)
    runner_cls.wrap_model = wrap_model


def patch_cpu_distributed() -> bool:
    """Patch mmengine for gloo/CPU distributed training. Only when CUDA is
    not available; idempotent. Returns whether the patches are in place."""
    if not _cuda_missing():
        return False
    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    from mmengine.runner import Runner

    for name in ('_init_dist_pytorch', '_init_dist_slurm', '_init_dist_mpi'):
        fn = getattr(dist_utils, name)
        if not getattr(fn, _PATCH_FLAG, False):
            setattr(dist_utils, name, _cpu_launcher(fn))
    if not getattr(MMDistributedDataParallel.__init__, _PATCH_FLAG, False):
        _patch_ddp(MMDistributedDataParallel)
    if not getattr(Runner.wrap_model, _PATCH_FLAG, False):
        _patch_wrap_model(Runner)
    return True


# --------------------------------------------------------------------------
# 3. mmpretrain without torchvision
# --------------------------------------------------------------------------
# The mmpretrain 1.2.0 modules that import torchvision at module level.
TORCHVISION_USERS = frozenset({
    'mmpretrain.datasets.transforms.formatting',
    'mmpretrain.datasets.transforms.processing',
    'mmpretrain.evaluation.metrics.visual_grounding_eval',
    'mmpretrain.models.utils.box_utils',
})


def _needs_torchvision(what):

    def fail(*args, **kwargs):
        raise ImportError(f'{what} needs torchvision, which is not installed '
                          '(mmctx runs mmpretrain without it).')

    return fail


def _make_torchvision_standin() -> types.ModuleType:
    """A private module tree with the torchvision names mmpretrain's
    module-level code touches (never registered in ``sys.modules``)."""

    def _upcast(t):
        if t.is_floating_point():
            return t if t.dtype in (torch.float32, torch.float64) \
                else t.float()
        return t if t.dtype in (torch.int32, torch.int64) else t.int()

    def box_area(boxes):
        boxes = _upcast(boxes)
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def _box_inter_union(boxes1, boxes2):
        area1, area2 = box_area(boxes1), box_area(boxes2)
        lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
        rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
        wh = _upcast(rb - lt).clamp(min=0)
        inter = wh[:, :, 0] * wh[:, :, 1]
        return inter, area1[:, None] + area2 - inter

    def box_iou(boxes1, boxes2):
        inter, union = _box_inter_union(boxes1, boxes2)
        return inter / union

    def generalized_box_iou(boxes1, boxes2):
        inter, union = _box_inter_union(boxes1, boxes2)
        iou = inter / union
        lti = torch.min(boxes1[:, None, :2], boxes2[:, :2])
        rbi = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
        whi = _upcast(rbi - lti).clamp(min=0)
        areai = whi[:, :, 0] * whi[:, :, 1]
        return iou - (areai - union) / areai

    def pil_to_tensor(pic):
        import numpy as np
        img = torch.as_tensor(np.array(pic, copy=True))
        img = img.view(pic.size[1], pic.size[0], -1)
        return img.permute((2, 0, 1))

    class InterpolationMode(enum.Enum):
        NEAREST = 'nearest'
        NEAREST_EXACT = 'nearest-exact'
        BILINEAR = 'bilinear'
        BICUBIC = 'bicubic'
        BOX = 'box'
        HAMMING = 'hamming'
        LANCZOS = 'lanczos'

    class RandomResizedCrop:  # base class of MAERandomResizedCrop
        __init__ = _needs_torchvision('torchvision.transforms.'
                                      'RandomResizedCrop')

    def module(name, **attrs):
        mod = types.ModuleType(f'mmctx.compat.<no torchvision>.{name}')
        mod.__dict__.update(attrs)
        return mod

    boxes = module('ops.boxes', box_area=box_area, box_iou=box_iou,
                   generalized_box_iou=generalized_box_iou, _upcast=_upcast)
    functional = module('transforms.functional', pil_to_tensor=pil_to_tensor)
    functional.__getattr__ = lambda name: _needs_torchvision(
        f'torchvision.transforms.functional.{name}')
    transforms_mod = module('transforms.transforms',
                            InterpolationMode=InterpolationMode,
                            RandomResizedCrop=RandomResizedCrop)
    # dir() empty: mmpretrain registers no ``torchvision/*`` transforms
    transforms = module('transforms', functional=functional,
                        transforms=transforms_mod,
                        InterpolationMode=InterpolationMode,
                        RandomResizedCrop=RandomResizedCrop,
                        __dir__=lambda: [])
    return module('', ops=module('ops', boxes=boxes), transforms=transforms)


def _standin_import(standin):
    """An ``__import__`` that resolves ``torchvision[.x]`` to ``standin``."""

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == 'torchvision'
                           or name.startswith('torchvision.')):
            mod = standin
            if fromlist:  # ``from torchvision.a.b import c`` -> module a.b
                for part in name.split('.')[1:]:
                    mod = getattr(mod, part)
            return mod
        return builtins.__import__(name, globals, locals, fromlist, level)

    return __import__


class _TorchvisionFreeLoader(importlib.machinery.SourceFileLoader):

    def exec_module(self, module):
        module.__dict__['__builtins__'] = _TorchvisionFreeFinder.builtins
        super().exec_module(module)


class _TorchvisionFreeFinder(importlib.abc.MetaPathFinder):
    builtins = None

    def find_spec(self, fullname, path, target=None):
        if fullname not in TORCHVISION_USERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(
                spec.loader, importlib.machinery.SourceFileLoader):
            return None
        spec.loader = _TorchvisionFreeLoader(spec.loader.name,
                                             spec.loader.path)
        return spec


def allow_mmpretrain_without_torchvision() -> bool:
    """Let mmpretrain import when torchvision is not installed (no-op when
    it is). Idempotent. Returns whether the import hook is in place."""
    if importlib.util.find_spec('torchvision') is not None:
        return False
    if any(isinstance(f, _TorchvisionFreeFinder) for f in sys.meta_path):
        return True
    custom = dict(vars(builtins))
    custom['__import__'] = _standin_import(_make_torchvision_standin())
    _TorchvisionFreeFinder.builtins = custom
    sys.meta_path.insert(0, _TorchvisionFreeFinder())
    return True


def apply() -> None:
    """Apply all fixes (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    allow_mmengine_checkpoint_globals()
    patch_cpu_distributed()
    allow_mmpretrain_without_torchvision()
    _APPLIED = True


apply()
