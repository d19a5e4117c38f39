# Faster R-CNN R50-FPN 1x, COCO 2017 -- backbone: PSI-ResNet-50: Patch Spatial
# Interaction (16x16 patch grid) in all blocks. Recipe and overrides:
# faster_rcnn_r50.py. Paper: not reported for this combination.
#   tools/dist_train.sh configs/faster_rcnn_psi_r50.py 2
_base_ = './faster_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True, True),
        # patch grid built for 256x256 inputs (maps 64/32/16/8) as in the
        # reference; other sizes are average-pooled to that grid first
        reference_input_size=256))
