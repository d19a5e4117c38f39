# Semantic FPN, ADE20K (150 classes), 512x512 crops, 40k iterations --
# backbone: PSI-ResNet-50 (16x16 patch grid, all blocks).
# Recipe and overrides: fpn_r50_ade20k.py. Paper numbers: README.md (Configs).
#   tools/dist_train.sh configs/fpn_psi_r50_ade20k.py 2
_base_ = './fpn_r50_ade20k.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True, True),
        # patch grid of a 256 input, as the reference; other sizes are
        # average-pooled to that grid first
        reference_input_size=256))
