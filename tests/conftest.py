"""Shared fixtures for the mmctx tests (all on CPU).

* ``repo_root`` -- the repository root;
* ``shared_data`` -- ``<repo>/../shared/data`` (the real COCO / ADE20K
  samples); fails clearly when it is missing;
* ``run`` -- run a command (list) with the repo and the probe hooks on
  PYTHONPATH, fail with its output tail when it exits non-zero;
* ``demo_coco`` -- a small synthetic COCO-format data set (session scoped);
* ``tiny_det_config`` -- write a small Faster R-CNN R18 config on
  ``demo_coco`` (derived from ``configs/demo_faster_rcnn_r50.py``) that
  trains in a few seconds per iteration on CPU.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / '..' / 'shared' / 'data').resolve()


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: runs on MMCTX_TEST_DEVICE (default cuda; skipped '
        'without CUDA); `pytest -m gpu` in tools/gpu/check.sh')

# A hook imported through the configs' custom_imports: records, per rank,
# what the training run looked like from the inside (after resume).
PROBE_HOOKS = '''
import json, os, sys
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class ProbeHook(Hook):
    priority = 'VERY_LOW'

    def before_train(self, runner):
        rank = get_rank()
        loader = runner.train_dataloader
        info = dict(
            rank=rank,
            world_size=get_world_size(),
            backend=(torch.distributed.get_backend()
                     if torch.distributed.is_initialized() else None),
            iter=runner.iter,
            message_hub_iter=runner.message_hub.get_info('iter'),
            dataset_len=len(loader.dataset),
            sampler_len=len(loader.sampler),
            sampler_indices=[int(i) for i in iter(loader.sampler)],
            mmctx_imported='mmctx' in sys.modules,
            torchvision_imported='torchvision' in sys.modules,
            model_wrapper=type(runner.model).__name__,
            norm_types=sorted({type(m).__name__ for m in runner.model.modules()
                               if 'Norm' in type(m).__name__}),
        )
        os.makedirs(runner.work_dir, exist_ok=True)
        with open(os.path.join(runner.work_dir,
                               f'probe_rank{rank}.json'), 'w') as f:
            json.dump(info, f)
        if rank == 0:
            torch.save(runner.optim_wrapper.state_dict(),
                       os.path.join(runner.work_dir, 'probe_optim.pth'))
'''


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f'shared sample data not found at {SHARED_DATA} '
                    '(expected <repo>/../shared/data with tiny_coco/ and '
                    'ade20k_sample/)')
    for sub in ('tiny_coco', 'ade20k_sample'):
        if not (SHARED_DATA / sub).is_dir():
            pytest.fail(f'{SHARED_DATA / sub} is missing')
    return SHARED_DATA


@pytest.fixture(scope='session')
def probe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('probe')
    (d / 'mmctx_probe_hooks.py').write_text(PROBE_HOOKS)
    return d


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's master)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def run(probe_dir):

    def _run(cmd, cwd=REPO_ROOT, env=None, timeout=600):
        full_env = dict(os.environ)
        full_env['PYTHONPATH'] = os.pathsep.join(
            [str(REPO_ROOT), str(probe_dir)] +
            ([full_env['PYTHONPATH']] if full_env.get('PYTHONPATH') else []))
        full_env['PYTHON'] = sys.executable  # tools/dist_*.sh use it
        full_env.update(env or {})
        proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd),
                              env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f'command failed ({proc.returncode}): '
                        f'{" ".join(map(str, cmd))}\n'
                        f'--- output tail ---\n{proc.stdout[-6000:]}')
        return proc.stdout

    return _run


@pytest.fixture(scope='session')
def demo_coco(tmp_path_factory) -> Path:
    from mmctx.datasets import generate_demo_coco
    out = tmp_path_factory.mktemp('demo') / 'coco_shapes'
    generate_demo_coco(str(out), num_images=10, seed=0)  # 8 train, 2 val
    return out


TINY_CONFIG = '''
_base_ = {base!r}
custom_imports = dict(imports=['mmctx', 'mmctx_probe_hooks'],
                      allow_failed_imports=False)
data_root = {data_root!r}
img_scale = (128, 128)
# a slim Faster R-CNN: R18, 64-channel FPN, small heads, few samples
model = dict(
    backbone=dict(depth=18, norm_cfg={norm_cfg!r}),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=128)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(score_thr=0.0, max_per_img=20)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    batch_sampler=None,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval={ckpt_interval}, max_keep_ckpts=-1))
custom_hooks = [dict(type='ProbeHook')]
randomness = dict(seed=0)
'''


@pytest.fixture
def tiny_det_config(repo_root, demo_coco, tmp_path):
    """Factory: write a tiny detection config into tmp_path, return path."""

    def _make(name='tiny.py', max_iters=2, ckpt_interval=None,
              norm_cfg=None):
        text = TINY_CONFIG.format(
            base=str(repo_root / 'configs' / 'demo_faster_rcnn_r50.py'),
            data_root=str(demo_coco) + '/',
            norm_cfg=norm_cfg or dict(type='BN', requires_grad=True),
            max_iters=max_iters,
            ckpt_interval=ckpt_interval or max_iters)
        path = tmp_path / name
        path.write_text(text)
        return path

    return _make
