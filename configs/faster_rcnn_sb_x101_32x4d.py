# Faster R-CNN X-101-32x4d-FPN 1x, COCO 2017 -- backbone: SB-ResNeXt-101
# 32x4d: Spatial Bias (k=3, 10x10 pooling) in stages 1-3, its k maps joined
# to the grouped conv2's output (SBXBottleneck). Recipe and overrides:
# faster_rcnn_x101_32x4d.py.
#   tools/dist_train.sh configs/faster_rcnn_sb_x101_32x4d.py 8
_base_ = './faster_rcnn_x101_32x4d.py'

model = dict(
    backbone=dict(
        type='SBResNeXt',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
