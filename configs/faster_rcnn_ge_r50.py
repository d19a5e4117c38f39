# Faster R-CNN R50-FPN 1x, COCO 2017 -- backbone: GE-ResNet-50: GE-theta+
# (depthwise gather, global extent, SE excite). Recipe and overrides:
# faster_rcnn_r50.py. Paper: not reported for this combination.
#   tools/dist_train.sh configs/faster_rcnn_ge_r50.py 2
_base_ = './faster_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global', reduction=16),
        stage_with_ge=(True, True, True, True),
        # The global gather kernel spans the stage maps of a 224 input (56/28/
        # 14/7), as in the ImageNet GE-R50 (configs/imagenet_ge_r50_*.py), so
        # those weights load 1:1; larger detection maps are average-pooled to
        # that grid first. (A kernel spanning 800x1333 maps would add ~117M
        # parameters and fit no ImageNet checkpoint.)
        reference_input_size=224))
