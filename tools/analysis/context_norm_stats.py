"""What the BN layers inside context modules learn under ``norm_eval=True``.

Fine-tunes the backbone of a detection config (``frozen_stages=1``,
``norm_eval=True``) from a stock ResNet-50 for a few SGD steps on one real
image (and its mirror image: batch 2), and prints, for every BN inside a
context module, how far its running statistics are from the statistics of
the features it actually normalises (the batch of the last step): before
training (the defaults, mean 0 / variance 1, which upstream ``norm_eval``
would keep forever) and after.

No ImageNet weights are downloaded: the stock ResNet-50 has random weights
whose BN statistics are calibrated on the image, so its features have the
scale of a pretrained network's.

    python tools/analysis/context_norm_stats.py
    python tools/analysis/context_norm_stats.py --config \
        configs/faster_rcnn_ge_r50.py --steps 20
"""
import argparse
import glob
import os
import sys
import tempfile

import numpy as np
import torch
from mmdet.models.backbones import ResNet
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, init_default_scope
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
sys.path.insert(0, ROOT)
import mmctx  # noqa: E402,F401
from mmctx.models.backbones.trainable_context import \
    CONTEXT_MODULES  # noqa: E402

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=os.path.join(
        ROOT, 'configs', 'faster_rcnn_sb_r50.py'))
    parser.add_argument('--image', default=None,
                        help='default: the first tiny_coco train image')
    parser.add_argument('--size', type=int, default=320,
                        help='long side of the image (default 320)')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--lr', type=float, default=0.02)
    return parser.parse_args()


def load_batch(path, size):
    image = Image.open(path).convert('RGB')
    scale = size / max(image.size)
    image = image.resize((round(image.width * scale),
                          round(image.height * scale)), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32))
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    x = x.permute(2, 0, 1)[None]
    return torch.cat([x, x.flip(-1)])


def stock_resnet50(batch, path):
    """A random ResNet-50 whose BN statistics fit ``batch``, saved as a
    torchvision-layout state dict."""
    torch.manual_seed(0)
    model = ResNet(50)
    model.init_weights()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = None  # cumulative average
            if module.weight is not None:  # zero-init residual: undo
                torch.nn.init.ones_(module.weight)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(batch)
    torch.save(model.state_dict(), path)


def normalised(norm, mean, var):
    """Per-channel std and mean of what ``norm`` outputs (before its affine)
    for a batch of mean ``mean`` and variance ``var``: 1 and 0 when its
    running statistics fit the batch."""
    std = (var / (norm.running_var + norm.eps)).sqrt()
    offset = (mean - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    return std, offset


def main():
    args = parse_args()
    image = args.image or sorted(glob.glob(os.path.join(
        ROOT, '..', 'shared', 'data', 'tiny_coco', 'train2017', '*.jpg')))[0]
    batch = load_batch(image, args.size)
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    backbone = cfg.model.backbone.to_dict()
    MMLogger.get_current_instance().setLevel('ERROR')
    with tempfile.TemporaryDirectory() as tmp:
        stock = os.path.join(tmp, 'resnet50.pth')
        stock_resnet50(batch, stock)
        backbone['init_cfg'] = dict(type='Pretrained', checkpoint=stock)
        model = MODELS.build(backbone)
        model.init_weights()

    norms = {}
    for name, module in model.named_modules():
        if isinstance(module, CONTEXT_MODULES):
            for sub, norm in module.named_modules(prefix=name):
                if isinstance(norm, _BatchNorm):
                    norms[sub] = norm
    seen = {}

    def record(name):
        def hook(norm, inputs):
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dims, correction=1)
            seen[name] = (mean, var)
        return hook

    for name, norm in norms.items():
        norm.register_forward_pre_hook(record(name))
    before = {n: (m.running_mean.clone(), m.running_var.clone())
              for n, m in norms.items()}
    optim = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                            weight_decay=1e-4)
    for _ in range(args.steps):
        model.train()
        optim.zero_grad()
        sum(out.mean() for out in model(batch)).backward()
        optim.step()

    print(f'{os.path.basename(args.config)}: frozen_stages='
          f'{model.frozen_stages}, norm_eval={model.norm_eval}; '
          f'{args.steps} SGD steps, batch 2 of {os.path.basename(image)} at '
          f'{tuple(batch.shape[-2:])}')
    print('What each BN inside a context module outputs (before its affine) '
          'for the last batch, median over channels: std (1 = fits) and '
          '|mean| (0 = fits); with the default statistics (what upstream '
          'norm_eval keeps) and with the ones learnt.')
    print(f'{"context norm":42s} {"mode":5s} {"std default":>11s} '
          f'{"std learnt":>10s} {"|mean| default":>14s} '
          f'{"|mean| learnt":>13s}')
    rows = []
    for name, norm in norms.items():
        mean, var = seen[name]
        learnt = normalised(norm, mean, var)
        saved = norm.running_mean.clone(), norm.running_var.clone()
        norm.running_mean.copy_(before[name][0])
        norm.running_var.copy_(before[name][1])
        default = normalised(norm, mean, var)
        norm.running_mean.copy_(saved[0])
        norm.running_var.copy_(saved[1])
        row = [default[0].median().item(), learnt[0].median().item(),
               default[1].abs().median().item(),
               learnt[1].abs().median().item()]
        rows.append(row)
        print(f'{name:42s} {"train" if norm.training else "eval":5s} '
              f'{row[0]:11.3f} {row[1]:10.3f} {row[2]:14.3f} {row[3]:13.3f}')
    medians = np.median(rows, axis=0)
    print(f'{"median":42s} {"":5s} {medians[0]:11.3f} {medians[1]:10.3f} '
          f'{medians[2]:14.3f} {medians[3]:13.3f}')


if __name__ == '__main__':
    main()
