# CIFAR-100, bottleneck CIFAR ResNet-110 (12 blocks per stage, planes
# 16/32/64, 3x3 stem, 1,275,220 parameters) with Spatial Bias (k=3, 6x6
# pooling) in stages 1-2, as cifar100_sb_r38.py. Recipe: cifar100_r38.py.
#   python tools/train.py configs/cifar100_sb_r110.py
# (3 seeds as in cifar100_r38.py)
_base_ = './cifar100_sb_r38.py'

model = dict(backbone=dict(depth=110))
