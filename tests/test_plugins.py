"""GE, PSI and SpatialBias(fusion='add') in an unmodified upstream mmdet
config, through ``custom_imports`` and the stock backbone's ``plugins=``
only: the README's example (README.md, "The modules in anyone's config"),
run as written on Faster R-CNN X-101-32x4d (stock ``ResNeXt``) and, with its
``_base_`` swapped, R50 (stock ``ResNet``). The detector trains a step on a
tiny_coco image; every plugin outside the frozen stage learns."""
import re
from pathlib import Path

import mmdet
import pytest
import torch
from mmdet.models.backbones import ResNet, ResNeXt

from config_overrides import REPO_ROOT, det_options

X101 = 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'
R50 = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
PLUGIN_NAMES = ('gather_excite', 'patch_spatial_interaction', 'spatial_bias')


def readme_example():
    text = (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    match = re.search(r'<!-- plugins-example -->\n```python\n(.*?)```', text,
                      re.S)
    assert match, 'README.md: no plugins example'
    return match.group(1)


@pytest.mark.parametrize('base,backbone_class', [(X101, ResNeXt),
                                                 (R50, ResNet)])
def test_readme_plugins_in_an_upstream_config(base, backbone_class, tmp_path):
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import OptimWrapper
    from mmengine.registry import DATASETS, MODELS, init_default_scope
    example = readme_example()
    assert f"_base_ = '{X101}'" in example
    config = tmp_path / 'with_plugins.py'
    config.write_text(example.replace(X101, base))
    cfg = Config.fromfile(str(config))
    # the example adds exactly custom_imports and the plugins
    upstream = Config.fromfile(str(_mim_config(base)))
    assert cfg.model.backbone.type == upstream.model.backbone.type
    assert {k for k in cfg.model.backbone
            if cfg.model.backbone[k] != upstream.model.backbone.get(k)} == \
        {'plugins'}
    # tiny_coco at 320x320, no checkpoint download (data only)
    cfg.merge_from_dict(det_options(cfg, train_images=1))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    assert type(model.backbone) is backbone_class  # the stock backbone
    # (no init_weights: from scratch it zeroes bn3, which would hold the
    # after_conv3 plugins' gradient at zero for this one step; a pretrained
    # bn3 is not zero)
    blocks = [(stage, block) for stage in range(4)
              for block in getattr(model.backbone, f'layer{stage + 1}')]
    for stage, block in blocks:
        assert hasattr(block, 'gather_excite') == (stage > 0)
        assert hasattr(block, 'patch_spatial_interaction')
        assert hasattr(block, 'spatial_bias') == (stage < 3)
        if stage < 3:  # after conv2: its width (ResNeXt: groups x 4 x ...)
            assert block.spatial_bias.in_channels == \
                block.conv2.out_channels
    before = {n: p.detach().clone()
              for n, p in model.backbone.named_parameters()}
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    wrapper = OptimWrapper(torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01))
    model.train()
    log = model.train_step(pseudo_collate([dataset[0]]), wrapper)
    assert all(torch.isfinite(v).all() for v in log.values()), log
    after = dict(model.backbone.named_parameters())
    for stage, _ in blocks:
        for plugin in PLUGIN_NAMES:
            names = [n for n in after
                     if n.startswith(f'layer{stage + 1}.') and
                     f'.{plugin}.' in n]
            if not names:
                continue
            changed = [n for n in names if not torch.equal(after[n],
                                                           before[n])]
            if stage == 0:  # frozen_stages=1: frozen with its stage
                assert not changed and not any(after[n].requires_grad
                                               for n in names)
            else:
                assert changed, (stage, plugin)


def _mim_config(base):
    """The upstream config file a ``mmdet::`` path names."""
    return Path(mmdet.__file__).parent / '.mim' / 'configs' / \
        base.split('::', 1)[1]
