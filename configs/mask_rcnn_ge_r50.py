# Mask R-CNN R50-FPN 1x, COCO 2017 -- backbone: GE-ResNet-50, GE-theta+
# (depthwise global gather, SE excite) in every block, its kernels sized for
# 224 inputs as in faster_rcnn_ge_r50.py. Recipe and overrides:
# mask_rcnn_r50.py.
#   tools/dist_train.sh configs/mask_rcnn_ge_r50.py 8
_base_ = './mask_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global', reduction=16),
        stage_with_ge=(True, True, True, True),
        reference_input_size=224))
