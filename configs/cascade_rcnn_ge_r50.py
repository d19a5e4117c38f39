# Cascade R-CNN R50-FPN 1x, COCO 2017 -- backbone: GE-ResNet-50: GE-theta+
# (depthwise gather, global extent, SE excite). Recipe and overrides:
# cascade_rcnn_r50.py. Paper: not reported for this combination.
#   tools/dist_train.sh configs/cascade_rcnn_ge_r50.py 2
_base_ = './cascade_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global', reduction=16),
        stage_with_ge=(True, True, True, True),
        # gather kernels of a 224 input, see faster_rcnn_ge_r50.py
        reference_input_size=224))
