# Cascade R-CNN R50-FPN 1x, COCO 2017 -- backbone: plain ResNet-50
# (ContextResNet = mmdet's ResNet reading every checkpoint layout).
# The family's recipe: the other *_r50.py configs inherit it.
# Paper (Go & Ryu, "Spatial Bias"): box AP 41.9.
#
# Recipe (paper): ImageNet-pretrained ResNet-50, SGD lr 0.02 / momentum 0.9 /
# wd 1e-4, 1x schedule (12 epochs, lr / 10 after epochs 8 and 11), images
# resized to 1333x800, 2 GPUs x 8 images per GPU = 16 images per iteration:
#   tools/dist_train.sh configs/cascade_rcnn_r50.py 2
# lr 0.02 belongs to 16 images per iteration (auto_scale_lr.base_batch_size);
# with another GPU count or batch size add `--auto-scale-lr` (lr is scaled by
# total batch / 16), e.g. 8 GPUs x 8 images:
#   tools/dist_train.sh configs/cascade_rcnn_r50.py 8 --auto-scale-lr
#
# Overrides (see README.md (Configs)):
# - `pretrained`: the ImageNet ResNet-50 to start from; like upstream,
#   torchvision's weights by name (downloaded once into torch's hub cache
#   when training starts; building, testing and inference never read it).
#   Any local path (`~` allowed), http(s) URL, `torchvision://NAME` or
#   `open-mmlab://NAME` works (torchvision, mmdet or mmpretrain layout).
#   Offline: pass
#   `--cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50.pth`
#   (`pretrained=...` on the command line would not reach the backbone: config
#   variables are substituted when this file is read). From scratch:
#   `--cfg-options model.backbone.init_cfg=None`.
# - `data_root`: COCO 2017 (annotations/instances_{train,val}2017.json,
#   train2017/, val2017/). Edit it here, or override the dataloaders'
#   `dataset.data_root` and the evaluators' `ann_file`.
_base_ = 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/coco/'
pretrained = 'torchvision://resnet50'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ContextResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

# 2 GPUs x 8 images (paper); lr 0.02 is for base_batch_size = 16 images.
train_dataloader = dict(batch_size=8, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
auto_scale_lr = dict(enable=False, base_batch_size=16)
