# Demo: Faster R-CNN with the SB-ResNet-50 backbone (Spatial Bias k=3, 10x10
# pooling, stages 1-3) on the synthetic "shapes" data set -- the same demo as
# configs/demo_faster_rcnn_r50.py with only the backbone changed, so the two
# runs compare plain vs. SB directly (both from scratch, no downloads):
#
#   python tools/generate_demo_data.py --out data/demo
#   python tools/train.py configs/demo_faster_rcnn_sb_r50.py \
#       --work-dir work_dirs/demo_sb
_base_ = './demo_faster_rcnn_r50.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=10),
        stage_with_sb=(True, True, True, False)))
