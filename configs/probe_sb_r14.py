# Long-range-context probe, Spatial Bias: the plain probe model with SB
# (k = 3 bias maps, 6x6 grid -- the paper's CIFAR setting for maps of this
# size) in stages 1-2, like the paper's CIFAR networks. See
# configs/probe_plain_r14.py.
_base_ = './probe_plain_r14.py'

model = dict(
    backbone=dict(
        type='SBResNet',
        sb=dict(num_bias=3, pool_size=6),
        stage_with_sb=(True, True, False)))
