# Faster R-CNN R50-FPN 1x, COCO 2017 -- backbone: SB-NLNet: SB-ResNet-50
# (faster_rcnn_sb_r50.py) plus non-local blocks (mmcv NonLocal2d, embedded
# Gaussian, reduction 2) after conv3 in every block of stage 3 (res4/C4, where
# Wang et al. put them for COCO). Paper: not reported for this combination.
#   tools/dist_train.sh configs/faster_rcnn_sb_nl_r50.py 2
_base_ = './faster_rcnn_sb_r50.py'

model = dict(
    backbone=dict(plugins=[
        dict(
            cfg=dict(
                type='NonLocal2d',
                reduction=2,
                use_scale=True,
                mode='embedded_gaussian'),
            stages=(False, False, True, False),
            position='after_conv3')
    ]))
