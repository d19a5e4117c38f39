# Long-range-context probe, plain model (see mmctx/probe.py and
# tools/analysis/context_probe.py): a synthetic dense-prediction task in
# which every pixel >= 56 px away from a marker in a corner takes the class
# given by the marker's colour (nearer pixels are not scored) -- out of
# reach of this model: a marker pixel influences the plain model's output at
# most 46 px away (computed exactly by mmctx.probe.cue_reach; one output
# pixel sees a 59 px box), so a plain ResNet can only guess the class, while
# SB / GE / PSI see the whole image.
#
# The same small ResNet-14 for all four probe configs: bottleneck [1, 1, 1]
# (three stages, strides 1/2/2, base width 16 -> 64/128/256 channels), the
# standard 7x7 stem with max pool; an FCN head with 1x1 convs on the three
# stage outputs resized to stride 4 and concatenated (it adds no spatial
# context of its own). 128x128 images generated on the fly from the seed.
#
#   python tools/train.py configs/probe_plain_r14.py
#   python tools/analysis/context_probe.py        # all four + the table
default_scope = 'mmseg'
custom_imports = dict(
    imports=['mmctx', 'mmctx.probe'], allow_failed_imports=False)

image_size = 128
num_classes = 3  # the three marker colours
max_iters = 600
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[128.0, 128.0, 128.0],
        std=[64.0, 64.0, 64.0],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(image_size, image_size)),
    backbone=dict(
        type='ContextResNet',
        depth=14,
        num_stages=3,
        strides=(1, 2, 2),
        dilations=(1, 1, 1),
        out_indices=(0, 1, 2),
        base_channels=16,
        stem_channels=16,
        style='pytorch',
        norm_cfg=norm_cfg,
        norm_eval=False,
        # mmdet's default (True) zero-initialises every bn3: then no context
        # parameter, nor SB's conv3 bias columns, gets any gradient in the
        # first step (the modules sit behind bn3 or feed conv3's zero
        # columns); torchvision's default, as in the SB / GE reference code
        zero_init_residual=False,
        init_cfg=None),
    decode_head=dict(
        type='FCNHead',
        in_channels=[128, 256],
        in_index=[1, 2],
        input_transform='resize_concat',
        channels=64,
        num_convs=1,
        kernel_size=1,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

probe_data = dict(
    type='ContextProbeDataset',
    seed=0,
    image_size=image_size,
    marker_size=12,
    min_cue_distance=56,
    max_shapes=4,
    pipeline=[dict(type='PackSegInputs')])
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(probe_data, split='train', num_samples=8000))
val_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(probe_data, split='val', num_samples=64, test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999),
                   weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=20,
         end=max_iters)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=max_iters,
        max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=8)
