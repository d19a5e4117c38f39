"""mmpretrain 1.2.0 without torchvision.

Nothing in mmctx imports torchvision: there is no CPU build of it for current
torch. mmpretrain 1.2.0 however imports torchvision at module level in four
modules that every ``import mmpretrain.models / .datasets / .evaluation`` goes
through. Only when torchvision is *not installed*, those four modules are
executed with a private stand-in for the few torchvision names they use (box
IoU functions in pure torch, ``pil_to_tensor``, ``InterpolationMode``); the
stand-in is never put in ``sys.modules``, and the torchvision-only features
(``torchvision/*`` transform wrappers, ``MAERandomResizedCrop``) raise a clear
error when used.
"""
import builtins
import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import torch

__all__ = ['allow_mmpretrain_without_torchvision', 'TORCHVISION_USERS']


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
