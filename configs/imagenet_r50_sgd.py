# ImageNet-1k classification, recipe (b) of the paper -- backbone: plain
# ResNet-50 (ContextResNet = mmdet ResNet). Siblings inherit this.
# Paper (Go & Ryu, "Spatial Bias"): top-1 76.05 (which of the two recipes
# is not stated; see README.md (Configs)).
#
# SGD (momentum 0.9, wd 1e-4), lr 0.1 for 256 images per iteration, divided
# by 10 at epochs 30, 60 and 80, 90 epochs, 224 crops; 8 GPUs x 32 images:
#   tools/dist_train.sh configs/imagenet_r50_sgd.py 8
# With another total batch size add `--auto-scale-lr` (lr = 0.1 * batch / 256).
# `data_root`: ImageNet in mmpretrain's layout (train/, val/, meta/); edit it
# here or override `{train,val,test}_dataloader.dataset.data_root`.
# Its checkpoints initialise the detection / segmentation backbones as they
# are: `--cfg-options model.backbone.init_cfg.checkpoint=.../epoch_90.pth`.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/imagenet'

model = dict(
    backbone=dict(
        type='ContextResNet',
        # mmdet's ResNet defaults to frozen BN statistics (norm_eval=True);
        # classification training needs them updated
        norm_eval=False,
        frozen_stages=-1,
        # trained from scratch (this IS the ImageNet pre-training); to start
        # from a checkpoint: init_cfg=dict(type='Pretrained', checkpoint=PATH)
        init_cfg=None))

train_dataloader = dict(
    batch_size=32, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[30, 60, 80], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=90, val_interval=1)
# 8 GPUs x 32 images = 256 (lr 0.1)
auto_scale_lr = dict(enable=False, base_batch_size=256)
