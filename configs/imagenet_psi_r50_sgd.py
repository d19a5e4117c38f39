# ImageNet-1k classification, recipe (b) (SGD, imagenet_r50_sgd.py) --
# backbone: PSI-ResNet-50 (16x16 patch grid, all blocks).
# Paper numbers: see README.md (Configs).
#   tools/dist_train.sh configs/imagenet_psi_r50_sgd.py 8
_base_ = './imagenet_r50_sgd.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True, True),
        # The reference patch grid is built for 256 inputs (maps 64/32/16/8,
        # patches 4/2/1/1); 224 maps are average-pooled to it. A grid built
        # for 224 (56 is no multiple of 16) would be per-pixel: a 3136-wide
        # MLP in every stage-1 block (~30M extra parameters).
        reference_input_size=256))
