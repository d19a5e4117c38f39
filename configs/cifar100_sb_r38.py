# CIFAR-100, bottleneck CIFAR ResNet-38 (4 blocks per stage, planes
# 16/32/64, 3x3 stem, 463,764 parameters) with Spatial Bias (k=3, 6x6
# pooling) in stages 1-2. Recipe: cifar100_r38.py.
#   python tools/train.py configs/cifar100_sb_r38.py
# (3 seeds as in cifar100_r38.py)
_base_ = './cifar100_r38.py'

model = dict(
    backbone=dict(
        # `_delete_`: the base has sb=None, which a dict cannot merge into
        sb=dict(_delete_=True, num_bias=3, pool_size=6),
        stage_with_sb=(True, True, False)))
