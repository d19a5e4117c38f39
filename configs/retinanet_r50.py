# RetinaNet R50-FPN 1x, COCO 2017 -- backbone: plain ResNet-50
# (ContextResNet), the twin of retinanet_sb_r50.py. Upstream mmdet's recipe
# unchanged: 8 GPUs x 2 images, SGD lr 0.01, 12 epochs, frozen stem + stage 1,
# frozen BN.
#   tools/dist_train.sh configs/retinanet_r50.py 8
# With another GPU count or batch size add --auto-scale-lr (lr scaled by
# total batch / 16). Overrides (`pretrained`, `data_root`): as in
# faster_rcnn_r50.py.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/coco/'
pretrained = 'torchvision://resnet50'

model = dict(
    backbone=dict(
        type='ContextResNet',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
auto_scale_lr = dict(enable=False, base_batch_size=16)
