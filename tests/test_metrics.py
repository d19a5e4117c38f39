"""mmdet CocoMetric and mmseg IoUMetric on the real shared samples, loaded
through the real dataset classes: ground truth as prediction scores
perfectly, perturbed predictions score lower."""
import copy

import numpy as np
import pytest
import torch


@pytest.fixture(scope='module')
def coco_dataset(shared_data):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    root = shared_data / 'tiny_coco'
    ds = CocoDataset(
        data_root=str(root),
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        test_mode=True,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape')),
        ])
    assert len(ds) == 16
    return ds


def _coco_eval(ds, shared_data, perturb=None):
    from mmdet.evaluation import CocoMetric
    metric = CocoMetric(
        ann_file=str(shared_data / 'tiny_coco' / 'annotations' /
                     'instances_train2017.json'),
        metric='bbox')
    metric.dataset_meta = ds.metainfo
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        sample = ds[i]['data_samples']
        gt = sample.gt_instances
        boxes = gt.bboxes.tensor.clone()  # crowd boxes are not in gt

        if perturb is not None:
            boxes = perturb(boxes, rng)
        pred = dict(
            bboxes=boxes,
            scores=torch.ones(len(boxes)),
            labels=gt.labels.clone())
        metric.process({}, [dict(img_id=sample.img_id,
                                 ori_shape=sample.ori_shape,
                                 pred_instances=pred)])
    return metric.evaluate(len(ds))


def test_coco_metric_gt_is_perfect(coco_dataset, shared_data):
    n_gt = sum(len(coco_dataset[i]['data_samples'].gt_instances)
               for i in range(len(coco_dataset)))
    assert n_gt > 150  # the crowd instance goes to ignored_instances
    res = _coco_eval(coco_dataset, shared_data)
    assert res['coco/bbox_mAP'] == pytest.approx(1.0)
    assert res['coco/bbox_mAP_50'] == pytest.approx(1.0)


def test_coco_metric_perturbed_is_lower(coco_dataset, shared_data):

    def shift(boxes, rng):
        wh = boxes[:, 2:] - boxes[:, :2]
        off = torch.from_numpy(rng.uniform(0.15, 0.35, size=(len(boxes), 2))
                               ).float() * wh
        return boxes + off.repeat(1, 2)

    res = _coco_eval(coco_dataset, shared_data, perturb=shift)
    assert 0.0 < res['coco/bbox_mAP'] < 0.7
    assert res['coco/bbox_mAP'] < res['coco/bbox_mAP_50']


@pytest.fixture(scope='module')
def ade_samples(shared_data):
    from mmseg.datasets import ADE20KDataset
    from mmseg.utils import register_all_modules
    register_all_modules()
    ds = ADE20KDataset(
        data_root=str(shared_data / 'ade20k_sample'),
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs'),
        ])
    assert len(ds) == 3 and len(ds.metainfo['classes']) == 150
    return ds, [ds[i]['data_samples'] for i in range(len(ds))]


def _iou_eval(ds, samples, make_pred):
    from mmseg.evaluation import IoUMetric
    metric = IoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = ds.metainfo
    for s in samples:
        d = copy.deepcopy(s).to_dict()
        d['pred_sem_seg'] = dict(data=make_pred(d['gt_sem_seg']['data']))
        metric.process({}, [d])
    return metric.evaluate(len(samples))


def test_iou_metric_gt_is_perfect(ade_samples):
    ds, samples = ade_samples
    for s in samples:  # real labels, reduce_zero_label applied
        vals = set(s.gt_sem_seg.data.unique().tolist())
        assert 255 in vals or len(vals) > 1
        assert max(v for v in vals if v != 255) < 150
    res = _iou_eval(ds, samples, lambda gt: gt.clone())
    assert res['mIoU'] == pytest.approx(100.0)
    assert res['aAcc'] == pytest.approx(100.0)


def test_iou_metric_other_is_lower(ade_samples):
    ds, samples = ade_samples
    # shift the label map by a quarter of its width
    res = _iou_eval(ds, samples,
                    lambda gt: torch.roll(gt, gt.shape[-1] // 4, dims=-1))
    assert 0.0 <= res['mIoU'] < 90.0
    res0 = _iou_eval(ds, samples, lambda gt: torch.zeros_like(gt))
    assert res0['mIoU'] < 10.0
