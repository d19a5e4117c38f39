# Mask R-CNN R50-FPN 1x, COCO 2017 -- backbone: SB-ResNet-50 (Spatial Bias,
# k=3, 10x10 pooling, stages 1-3). Recipe and overrides: mask_rcnn_r50.py.
#   tools/dist_train.sh configs/mask_rcnn_sb_r50.py 8
_base_ = './mask_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
