# Faster R-CNN R50-FPN 1x, COCO 2017 -- backbone: SB-GCNet: SB-ResNet-50
# (faster_rcnn_sb_r50.py) plus GCNet ContextBlocks (ratio 1/16, after conv3,
# stages 2-4, as mmdet's gcnet configs). Paper: not reported for this one.
#   tools/dist_train.sh configs/faster_rcnn_sb_gc_r50.py 2
_base_ = './faster_rcnn_sb_r50.py'

model = dict(
    backbone=dict(plugins=[
        dict(
            cfg=dict(type='ContextBlock', ratio=1. / 16),
            stages=(False, True, True, True),
            position='after_conv3')
    ]))
