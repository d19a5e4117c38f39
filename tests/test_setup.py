"""Stack sanity: versions, compiled mmcv ops, imports, no torchvision, and
the weights-only allowlist in place with torch.load's default untouched."""
import importlib.metadata as md
import os
import pickle
import subprocess
import sys

import pytest
import torch


def test_versions():
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    import mmseg
    assert mmcv.__version__ == '2.1.0'
    assert mmengine.__version__ == '0.10.7'
    assert mmdet.__version__ == '3.3.0'
    assert mmseg.__version__ == '1.2.2'
    assert mmpretrain.__version__ == '1.2.0'
    assert md.version('mmctx') == '0.1.0'  # pip install -e . was run
    for dep in ('ftfy', 'regex', 'pycocotools'):
        md.version(dep)


def test_mmcv_ops_compiled_on_cpu():
    from mmcv.ops import RoIAlign, nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.],
                          [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert dets.shape == (2, 5)
    feat = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    rois = torch.tensor([[0., 0., 0., 7., 7.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(feat, rois)
    assert out.shape == (1, 1, 2, 2)
    assert torch.isfinite(out).all()


def test_openmmlab_packages_import():
    import mmctx  # noqa: F401  (lets mmpretrain import without torchvision)
    import mmctx.datasets  # noqa: F401
    import mmdet.datasets  # noqa: F401
    import mmdet.evaluation  # noqa: F401
    import mmdet.models  # noqa: F401
    import mmpretrain.datasets  # noqa: F401
    import mmpretrain.evaluation  # noqa: F401
    import mmpretrain.models  # noqa: F401
    import mmseg.datasets  # noqa: F401
    import mmseg.evaluation  # noqa: F401
    import mmseg.models  # noqa: F401


def test_mmpretrain_works_without_torchvision():
    import importlib.util
    if importlib.util.find_spec('torchvision') is not None:
        pytest.skip('torchvision is installed: mmpretrain uses it as is')
    import numpy as np
    from mmengine.registry import init_default_scope
    from PIL import Image

    import mmctx  # noqa: F401
    from mmpretrain.datasets.transforms import PackInputs
    from mmpretrain.models.utils.box_utils import (box_iou,
                                                   generalized_box_iou)
    from mmpretrain.registry import MODELS, TRANSFORMS
    a = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 15.]])
    b = torch.tensor([[0., 0., 10., 10.], [0., 0., 5., 5.]])
    assert torch.allclose(box_iou(a, b),
                          torch.tensor([[1., .25], [25 / 175, 0.]]))
    assert generalized_box_iou(a, b)[1, 1] == pytest.approx(-100 / 225)
    assert not [k for k in TRANSFORMS.module_dict if 'torchvision' in k]
    packed = PackInputs()(dict(img=Image.fromarray(
        np.arange(24, dtype=np.uint8).reshape(2, 4, 3))))
    assert packed['inputs'].shape == (3, 2, 4)
    assert packed['inputs'][:, 1, 2].tolist() == [18, 19, 20]
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(type='ImageClassifier',
             backbone=dict(type='ResNet', depth=18),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=10,
                       in_channels=512)))
    assert model(torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 10)
    assert 'torchvision' not in sys.modules


def test_mmctx_does_not_import_torchvision():
    code = ('import sys, mmctx, mmdet.models, mmseg.models, '
            'mmpretrain.models, mmpretrain.datasets; '
            'print("torchvision" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == 'False'


def test_weights_only_allowlist_and_default_untouched(tmp_path):
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    import mmctx.compat as compat
    safe = torch.serialization.get_safe_globals()
    flat = [g[0] if isinstance(g, tuple) else g for g in safe]
    assert HistoryBuffer in flat
    assert np.ndarray in flat and np.dtype in flat

    # the default stays weights_only=True and torch.load is torch's own
    assert torch.load.__module__ == 'torch.serialization'
    assert torch.serialization._default_to_weights_only(None) is True
    assert not os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')

    # mmengine-style content loads with the default (weights_only=True) ...
    buf = HistoryBuffer()
    buf.update(np.float64(1.5))
    buf.update(2.0)
    path = tmp_path / 'hub.pth'
    torch.save({'hub': buf, 'arr': np.arange(3, dtype=np.int64),
                'scalar': np.float32(0.5)}, path)
    obj = torch.load(path)
    assert obj['hub'].mean() == pytest.approx(1.75)
    # ... while arbitrary objects are still refused
    torch.save({'x': compat._PATCH_FLAG, 'obj': _Unsafe()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


class _Unsafe:
    pass


def test_compat_idempotent_and_cpu_only():
    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    from mmengine.runner import Runner

    import mmctx.compat as compat
    before = (dist_utils._init_dist_pytorch,
              MMDistributedDataParallel.__init__, Runner.wrap_model)
    compat.apply()
    compat.patch_cpu_distributed()
    compat.allow_mmengine_checkpoint_globals()
    after = (dist_utils._init_dist_pytorch,
             MMDistributedDataParallel.__init__, Runner.wrap_model)
    assert before == after
    if not torch.cuda.is_available():
        for fn in after:
            assert getattr(fn, compat._PATCH_FLAG, False)
        # a patched function wraps the original only once
        assert not getattr(dist_utils._init_dist_pytorch.__wrapped__,
                           compat._PATCH_FLAG, False)
