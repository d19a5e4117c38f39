# Faster R-CNN R50-FPN 1x, COCO 2017 -- backbone: SB-ResNet-50: Spatial Bias
# (k=3 bias channels, 10x10 pooling) in stages 1-3. Recipe and overrides:
# faster_rcnn_r50.py. Paper (Go & Ryu, "Spatial Bias"): box AP 40.0 (R50 39.0).
#   tools/dist_train.sh configs/faster_rcnn_sb_r50.py 2
_base_ = './faster_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
