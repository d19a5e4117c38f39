# PSPNet, dilated ResNet-50 (output stride 8: strides (1, 2, 1, 1), dilations
# (1, 1, 2, 4), contract_dilation), ADE20K, 512x512 crops, 80k iterations --
# upstream mmseg's recipe unchanged; backbone: its ResNetV1c as mmctx's plain
# ContextResNet (deep stem), so pspnet_sb_r50_ade20k.py changes only the
# backbone type and SB's arguments.
#   tools/dist_train.sh configs/pspnet_r50_ade20k.py 4
# Overrides (`pretrained`, `data_root`): as in fpn_r50_ade20k.py.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py'

custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)

data_root = 'data/ade/ADEChallengeData2016'
pretrained = 'open-mmlab://resnet50_v1c'

model = dict(
    # upstream's model-level `pretrained` moves to the backbone's init_cfg
    pretrained=None,
    backbone=dict(
        type='ContextResNet',
        deep_stem=True,  # what ResNetV1c sets (with avg_down=False)
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
# 4 GPUs x 4 images, as upstream; with another GPU count add --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
