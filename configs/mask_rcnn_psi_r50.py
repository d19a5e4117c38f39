# Mask R-CNN R50-FPN 1x, COCO 2017 -- backbone: PSI-ResNet-50 (Patch Spatial
# Interaction, 16x16 patch grid, patch sizes fixed at 256 inputs as in
# faster_rcnn_psi_r50.py). Recipe and overrides: mask_rcnn_r50.py.
#   tools/dist_train.sh configs/mask_rcnn_psi_r50.py 8
_base_ = './mask_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True, True),
        reference_input_size=256))
