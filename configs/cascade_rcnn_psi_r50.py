# Cascade R-CNN R50-FPN 1x, COCO 2017 -- backbone: PSI-ResNet-50: Patch
# Spatial Interaction (16x16 patch grid) in all blocks. Recipe and overrides:
# cascade_rcnn_r50.py. Paper: not reported for this combination.
#   tools/dist_train.sh configs/cascade_rcnn_psi_r50.py 2
_base_ = './cascade_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True, True),
        # patch grid of a 256 input; other sizes are average-pooled to it
        reference_input_size=256))
