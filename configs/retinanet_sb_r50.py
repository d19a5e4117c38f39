# RetinaNet R50-FPN 1x, COCO 2017 -- backbone: SB-ResNet-50 (Spatial Bias,
# k=3, 10x10 pooling, stages 1-3). Recipe and overrides: retinanet_r50.py.
#   tools/dist_train.sh configs/retinanet_sb_r50.py 8
_base_ = './retinanet_r50.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
