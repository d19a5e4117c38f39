# Semantic FPN, ADE20K (150 classes), 512x512 crops, 40k iterations --
# backbone: GE-ResNet-50, GE-theta+ (global extent), see faster_rcnn_ge_r50.py.
# Recipe and overrides: fpn_r50_ade20k.py. Paper numbers: README.md (Configs).
#   tools/dist_train.sh configs/fpn_ge_r50_ade20k.py 2
_base_ = './fpn_r50_ade20k.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global', reduction=16),
        stage_with_ge=(True, True, True, True),
        # global gather kernels of a 224 input (ImageNet GE-R50 weights load
        # 1:1); larger maps are average-pooled to that grid first
        reference_input_size=224))
