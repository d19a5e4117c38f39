# UPerNet R50, ADE20K, 512x512 crops, 80k iterations -- upstream mmseg's
# recipe unchanged (4 GPUs x 4 images, SGD lr 0.01, poly schedule, SyncBN);
# backbone: its ResNetV1c as mmctx's ContextResNetV1c (deep stem), the twin
# of upernet_sb_r50_ade20k.py.
#   tools/dist_train.sh configs/upernet_r50_ade20k.py 4
# Overrides (`pretrained`, `data_root`): as in fpn_r50_ade20k.py.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/ade/ADEChallengeData2016'
pretrained = 'open-mmlab://resnet50_v1c'

model = dict(
    # upstream's model-level `pretrained` moves to the backbone's init_cfg
    pretrained=None,
    backbone=dict(
        type='ContextResNetV1c',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
# 4 GPUs x 4 images, as upstream; with another GPU count add --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
