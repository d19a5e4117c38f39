# Semantic FPN, ADE20K (150 classes), 512x512 crops, 40k iterations --
# backbone: plain ResNet-50 (ContextResNet = mmdet ResNet). The family's
# recipe: the other fpn_*_ade20k.py configs inherit it.
# Paper numbers: see README.md (Configs).
#
# Recipe (paper): ImageNet-pretrained ResNet-50, 2 GPUs x 14 images per GPU
# (28 images per iteration), 40k iterations, AdamW, polynomial lr decay:
#   tools/dist_train.sh configs/fpn_r50_ade20k.py 2
# lr / weight decay are not given in the paper; we use those of the PVT /
# PoolFormer semantic-FPN recipe the 40k-AdamW-poly schedule comes from
# (AdamW lr 2e-4, wd 1e-4, poly power 0.9 to 0). lr belongs to 28 images per
# iteration (auto_scale_lr.base_batch_size); with another GPU count add
# `--auto-scale-lr`. Everything else (data pipeline, FPN, head, SyncBN, whole-
# image test) is upstream mmseg's sem_fpn config.
#
# Backbone: like upstream mmseg (ResNetV1c) a deep 3x3 stem (`deep_stem=True`),
# so `pretrained` must be a V1c ResNet-50 checkpoint (open-mmlab's
# resnet50_v1c, as upstream, or mmpretrain's resnetv1c50_8xb32_in1k). For a
# standard-stem checkpoint (torchvision, or our configs/imagenet_*_r50_*.py)
# add `--cfg-options model.backbone.deep_stem=False`.
#
# Overrides (see README.md (Configs)):
# - `pretrained`: like upstream, open-mmlab's resnet50_v1c by name
#   (downloaded once into torch's hub cache when training starts; building,
#   testing and inference never read it). Offline, pass
#   `--cfg-options model.backbone.init_cfg.checkpoint=/path/to/ckpt.pth`
#   (or `model.backbone.init_cfg=None` to train from scratch).
# - `data_root`: ADEChallengeData2016 (images/{training,validation},
#   annotations/{training,validation}). Edit it here, or override the
#   dataloaders' `dataset.data_root`.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/ade/ADEChallengeData2016'
pretrained = 'open-mmlab://resnet50_v1c'
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    # upstream's model-level `pretrained` moves to the backbone's init_cfg
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ContextResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
        deep_stem=True,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

# 2 GPUs x 14 images (paper); lr is for base_batch_size = 28 images.
train_dataloader = dict(batch_size=14, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=1e-4),
    clip_grad=None)
param_scheduler = [
    dict(
        type='PolyLR',
        power=0.9,
        eta_min=0.0,
        begin=0,
        end=40000,
        by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))
auto_scale_lr = dict(enable=False, base_batch_size=28)
