# ImageNet-1k classification, recipe (a) (LAMB, imagenet_r50_lamb.py) --
# backbone: SB-ResNet-50 (Spatial Bias k=3, 10x10 pooling, stages 1-3).
# Paper (Go & Ryu): top-1 76.86, plain R50 76.05 (see README.md (Configs)).
#   tools/dist_train.sh configs/imagenet_sb_r50_lamb.py 8
_base_ = './imagenet_r50_lamb.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
