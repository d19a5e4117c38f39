# Faster R-CNN X-101-32x4d-FPN 1x, COCO 2017 -- backbone: plain ResNeXt-101
# 32x4d (ContextResNeXt = mmdet's ResNeXt reading every checkpoint layout),
# the twin of faster_rcnn_sb_x101_32x4d.py. Upstream mmdet's recipe
# unchanged: 8 GPUs x 2 images, SGD lr 0.02, 12 epochs, frozen stem +
# stage 1, frozen BN, open-mmlab's ImageNet ResNeXt-101-32x4d.
#   tools/dist_train.sh configs/faster_rcnn_x101_32x4d.py 8
# With another GPU count or batch size add --auto-scale-lr (lr scaled by
# total batch / 16). Overrides (`pretrained`, `data_root`): as in
# faster_rcnn_r50.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/coco/'
pretrained = 'open-mmlab://resnext101_32x4d'

model = dict(
    backbone=dict(
        type='ContextResNeXt',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
auto_scale_lr = dict(enable=False, base_batch_size=16)
