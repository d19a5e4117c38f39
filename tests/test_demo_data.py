"""The synthetic demo data: deterministic, and loadable by mmdet's
CocoDataset and mmseg's ADE20KDataset with full pipelines."""
import filecmp
import json
import os

import numpy as np
import pytest

from mmctx.datasets.demo_data import (_CLASS_COLORS, DEMO_DET_CLASSES,
                                      generate_demo_ade20k,
                                      generate_demo_coco)


def _tree(root):
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)


@pytest.mark.parametrize('gen', [generate_demo_coco, generate_demo_ade20k])
def test_deterministic(tmp_path, gen):
    gen(str(tmp_path / 'a'), num_images=6, seed=3)
    gen(str(tmp_path / 'b'), num_images=6, seed=3)
    gen(str(tmp_path / 'c'), num_images=6, seed=4)
    files = _tree(tmp_path / 'a')
    assert files and files == _tree(tmp_path / 'b')
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path / 'a', tmp_path / 'b', files, shallow=False)
    assert not mismatch and not errors
    _, mismatch, _ = filecmp.cmpfiles(
        tmp_path / 'a', tmp_path / 'c', files, shallow=False)
    assert mismatch  # another seed gives other data


def test_coco_layout_and_loading(tmp_path):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    root = tmp_path / 'coco'
    ann_files = generate_demo_coco(str(root), num_images=10, seed=0)
    train = json.load(open(ann_files['train']))
    val = json.load(open(ann_files['val']))
    assert len(train['images']) == 8 and len(val['images']) == 2
    assert [c['name'] for c in train['categories']] == list(DEMO_DET_CLASSES)
    sizes = {(i['height'], i['width']) for i in train['images']}
    assert len(sizes) > 1  # varied image sizes
    for ann in train['annotations']:
        assert ann['iscrowd'] == 0 and ann['area'] > 0
        assert len(ann['segmentation'][0]) >= 6

    ds = CocoDataset(
        data_root=str(root),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes=DEMO_DET_CLASSES),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs'),
        ])
    assert len(ds) == 8
    n_inst = 0
    for i in range(len(ds)):
        out = ds[i]
        sample = out['data_samples']
        img = out['inputs'].permute(1, 2, 0).numpy()  # BGR uint8, HxWx3
        h, w = sample.ori_shape
        assert img.shape[:2] == (h, w)
        gt = sample.gt_instances
        assert len(gt) > 0
        boxes = gt.bboxes.tensor.numpy()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() \
            and (boxes[:, 3] <= h).all()
        masks = gt.masks.to_ndarray()
        assert masks.shape == (len(gt), h, w)
        for box, mask, label in zip(boxes, masks, gt.labels.tolist()):
            ys, xs = np.nonzero(mask)
            assert len(ys) > 20
            # the mask sits in its box ...
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
            # ... and covers pixels painted in its class colour
            mean = img[mask.astype(bool)].reshape(-1, 3).mean(0)
            dist = np.linalg.norm(_CLASS_COLORS - mean, axis=1)
            assert dist.argmin() == label, (mean, label)
            n_inst += 1
    assert n_inst == len(train['annotations'])


def test_ade20k_layout_and_loading(tmp_path):
    from mmseg.datasets import ADE20KDataset
    from mmseg.utils import register_all_modules
    register_all_modules()
    root = tmp_path / 'ade'
    counts = generate_demo_ade20k(str(root), num_images=10, seed=0)
    assert counts == {'training': 8, 'validation': 2}
    for split in ('training', 'validation'):
        imgs = sorted(os.listdir(root / 'images' / split))
        anns = sorted(os.listdir(root / 'annotations' / split))
        assert [f[:-4] for f in imgs] == [f[:-4] for f in anns]
        assert all(f.endswith('.jpg') for f in imgs)
        assert all(f.endswith('.png') for f in anns)

    ds = ADE20KDataset(
        data_root=str(root),
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='RandomCrop', crop_size=(128, 128)),
            dict(type='PackSegInputs'),
        ])
    assert len(ds) == 8
    seen = set()
    for i in range(len(ds)):
        out = ds[i]
        seg = out['data_samples'].gt_sem_seg.data
        assert tuple(seg.shape[-2:]) == tuple(out['inputs'].shape[-2:])
        seen |= set(seg.unique().tolist())
    # reduce_zero_label: "other" -> 255, shape classes 1..4 -> 0..3
    assert seen <= {0, 1, 2, 3, 255} and 255 in seen and len(seen) > 2
