# Long-range-context probe, Gather-Excite GE-θ⁺ (depthwise gather with global
# extent + SE-style excite) after conv3 of every block. The global kernels
# cover the stage maps of a 128x128 input (32/16/8). See
# configs/probe_plain_r14.py.
_base_ = './probe_plain_r14.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge=dict(variant='depthwise_excite', extent='global'),
        stage_with_ge=(True, True, True),
        reference_input_size=128))
