# CIFAR-100, bottleneck CIFAR ResNet-65 (7 blocks per stage, planes
# 16/32/64, 3x3 stem, 707,188 parameters). Recipe: cifar100_r38.py.
# Paper numbers: see README.md (Configs).
#   python tools/train.py configs/cifar100_r65.py
# (3 seeds as in cifar100_r38.py)
_base_ = './cifar100_r38.py'

model = dict(backbone=dict(depth=65))
