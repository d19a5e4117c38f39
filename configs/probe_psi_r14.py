# Long-range-context probe, Patch Spatial Interaction after conv3 of every
# block: 16x16 patch grid (patches 2/1/1 on the 32/16/8 maps of a 128x128
# input; the 8x8 map is its own grid), MLP hidden ratio 1/2. See
# configs/probe_plain_r14.py.
_base_ = './probe_plain_r14.py'

model = dict(
    backbone=dict(
        type='PSIResNet',
        psi=dict(grid_size=16, hidden_ratio=0.5),
        stage_with_psi=(True, True, True),
        reference_input_size=128))
