# ImageNet-1k classification, recipe (b) (SGD, imagenet_r50_sgd.py) --
# backbone: GE-ResNet-50, GE-theta+ (depthwise gather, global extent, SE
# excite). Paper numbers: see README.md (Configs).
#   tools/dist_train.sh configs/imagenet_ge_r50_sgd.py 8
_base_ = './imagenet_r50_sgd.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global', reduction=16),
        stage_with_ge=(True, True, True, True),
        # global gather kernels span the 56/28/14/7 stage maps of a 224 input
        reference_input_size=224))
