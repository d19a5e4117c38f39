# PSPNet, dilated SB-ResNet-50 (Spatial Bias k=3, 10x10 pooling, stages 1-3;
# the dilated stages 3-4 keep the 1/8 map), ADE20K. Recipe and overrides:
# pspnet_r50_ade20k.py.
#   tools/dist_train.sh configs/pspnet_sb_r50_ade20k.py 4
_base_ = './pspnet_r50_ade20k.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
