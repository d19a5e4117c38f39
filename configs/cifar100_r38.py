# CIFAR-100, bottleneck CIFAR ResNet-38 (4 blocks per stage, planes
# 16/32/64, 3x3 stem, 428,980 parameters).
# Paper numbers: see README.md (Configs).
#
# Recipe (paper): batch 64 on one GPU, SGD lr 0.25 (momentum 0.9), divided by
# 10 every 75 epochs, 300 epochs; the paper reports the mean of 3 seeds:
#   for seed in 0 1 2; do
#     python tools/train.py configs/cifar100_r38.py --work-dir \
#       work_dirs/cifar100_r38_s$seed --cfg-options randomness.seed=$seed
#   done
# Weight decay is not given in the paper; 1e-4 is that of the bottleneck
# CIFAR ResNet code (PyramidNet / CutMix) this network follows. Data pipeline
# (random crop 32 with 4 padding, flip) from mmpretrain's cifar100_bs16.
# With another batch size add `--auto-scale-lr` (lr = 0.25 * batch / 64).
# `data_root`: holds cifar-100-python/ (not downloaded at run time: put it
# there); edit it here or override
# `{train,val,test}_dataloader.dataset.data_root`.
_base_ = 'mmpretrain::resnet/resnet50_8xb16_cifar100.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/cifar100'

model = dict(
    backbone=dict(
        _delete_=True,
        type='CifarResNet',
        depth=38,
        sb=None,
        # trained from scratch
        init_cfg=None),
    head=dict(num_classes=100, in_channels=256))

# download=False: nothing is fetched at run time (upstream would download)
train_dataloader = dict(
    batch_size=64, dataset=dict(data_root=data_root, download=False))
val_dataloader = dict(
    batch_size=64, dataset=dict(data_root=data_root, download=False))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.25, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    _delete_=True,
    type='MultiStepLR',
    by_epoch=True,
    milestones=[75, 150, 225],
    gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
# 1 GPU x 64 images (lr 0.25)
auto_scale_lr = dict(enable=False, base_batch_size=64)
