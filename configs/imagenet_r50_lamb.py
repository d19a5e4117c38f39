# ImageNet-1k classification, recipe (a) of the paper -- backbone: plain
# ResNet-50 (ContextResNet = mmdet ResNet). Siblings inherit this.
# Paper (Go & Ryu, "Spatial Bias"): top-1 76.05 (which of the two recipes
# is not stated; see README.md (Configs)).
#
# LAMB lr 8e-3 for 512 images per iteration, cosine decay (5 linear warm-up
# epochs), 100 epochs: the lr/optimiser/schedule of mmpretrain's "ResNet
# strikes back" A3 recipe, which this inherits as is (wd 0.02, RandAugment,
# Mixup 0.1 / CutMix 1.0, BCE loss, no weight decay on norms and biases,
# SyncBN), except the paper's total batch of 512 instead of 2048:
# 8 GPUs x 64 images:
#   tools/dist_train.sh configs/imagenet_r50_lamb.py 8
# With another total batch size add `--auto-scale-lr`
# (lr = 8e-3 * batch / 512).
# `data_root`: ImageNet in mmpretrain's layout (train/, val/, meta/); edit it
# here or override `{train,val,test}_dataloader.dataset.data_root`.
_base_ = 'mmpretrain::resnet/resnet50_8xb256-rsb-a3-100e_in1k.py'

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
    batch_size=64, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(type='Lamb', lr=8e-3))
# 8 GPUs x 64 images = 512 (lr 8e-3)
auto_scale_lr = dict(enable=False, base_batch_size=512)
