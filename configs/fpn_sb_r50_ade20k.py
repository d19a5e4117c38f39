# Semantic FPN, ADE20K (150 classes), 512x512 crops, 40k iterations --
# backbone: SB-ResNet-50 (Spatial Bias k=3, 10x10 pooling, stages 1-3).
# Recipe and overrides: fpn_r50_ade20k.py. Paper numbers: README.md (Configs).
#   tools/dist_train.sh configs/fpn_sb_r50_ade20k.py 2
_base_ = './fpn_r50_ade20k.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
