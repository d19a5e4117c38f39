# UPerNet, SB-ResNet-50-V1c (Spatial Bias k=3, 10x10 pooling, stages 1-3),
# ADE20K. Recipe and overrides: upernet_r50_ade20k.py.
#   tools/dist_train.sh configs/upernet_sb_r50_ade20k.py 4
_base_ = './upernet_r50_ade20k.py'

model = dict(
    backbone=dict(
        type='SBResNetV1c',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
