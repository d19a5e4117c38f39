# Demo: semantic FPN with the SB-ResNet-50 backbone on the synthetic
# ADE20K-layout "shapes" data set (4 classes + "other" = 0, read with
# reduce_zero_label=True like ADE20K) -- configs/fpn_sb_r50_ade20k.py shrunk
# to a few minutes on a 2-core CPU: from scratch (no ImageNet weights, no
# downloads), plain BN, 256x256 crops, 40 iterations, mIoU on the val split:
#
#   python tools/generate_demo_data.py --out data/demo
#   python tools/train.py configs/demo_fpn_sb_r50.py \
#       --work-dir work_dirs/demo_seg
_base_ = './fpn_sb_r50_ade20k.py'

data_root = 'data/demo/ade_shapes'
classes = ('rectangle', 'ellipse', 'triangle', 'star')
metainfo = dict(
    classes=classes,
    palette=[(220, 40, 40), (40, 60, 220), (40, 200, 40), (230, 200, 20)])
crop_size = (256, 256)
max_iters = 40
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(num_classes=len(classes), norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=(512, 256),
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 256), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# ADE20KDataset insists on ADE20K's 150 class names: use the generic
# segmentation data set with the ADE20K file layout instead.
seg_dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(
        seg_dataset,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(
        seg_dataset,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(
        type='PolyLR',
        power=0.9,
        eta_min=0.0,
        begin=10,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
auto_scale_lr = dict(enable=False, base_batch_size=4)
