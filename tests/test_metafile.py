"""configs/metafile.yml (OpenMMLab model-index format) and the per-method
model-zoo pages (issue 10 part 5): the YAML parses, every config it names
exists, every experiment config is listed (``demo_*`` / ``probe_*`` are not
experiments), the fields OpenMMLab's model index uses are present, the
paper's numbers are the paper's, and every stated parameter count is the
built model's.
"""
import re

import pytest
import yaml

from config_overrides import CONFIG_DIR, REPO_ROOT, load_config

METAFILE = CONFIG_DIR / 'metafile.yml'
TASKS = {
    'Object Detection': ('COCO', 'box AP'),
    'Semantic Segmentation': ('ADE20K', 'mIoU'),
    'Image Classification': (('ImageNet-1k', 'CIFAR-100'), 'Top 1 Accuracy'),
}
# Go & Ryu, arXiv 2302.12505 (the only paper numbers for these experiments)
PAPER = {
    'faster_rcnn_r50': 39.0, 'faster_rcnn_sb_r50': 40.0,
    'cascade_rcnn_r50': 41.9, 'cascade_rcnn_sb_r50': 42.8,
    'imagenet_r50_sgd': 76.05, 'imagenet_sb_r50_sgd': 76.86,
    'imagenet_r50_lamb': 76.05, 'imagenet_sb_r50_lamb': 76.86,
}
PAGES = {
    'SpatialBias': ('docs/model_zoo/spatial_bias.md', '2302.12505'),
    'GatherExcite': ('docs/model_zoo/gather_excite.md', '1810.12348'),
    'PatchSpatialInteraction': (
        'docs/model_zoo/patch_spatial_interaction.md', 'forums.fast.ai'),
}


@pytest.fixture(scope='module')
def index():
    return yaml.safe_load(METAFILE.read_text(encoding='utf-8'))


def _models(index):
    return {m['Name']: m for m in index['Models']}


def test_model_index_points_at_metafile():
    root = yaml.safe_load((REPO_ROOT / 'model-index.yml').read_text())
    assert root == {'Import': ['configs/metafile.yml']}


def test_collections(index):
    names = [c['Name'] for c in index['Collections']]
    assert sorted(names) == sorted(PAGES)
    for coll in index['Collections']:
        meta = coll['Metadata']
        for key in ('Training Data', 'Training Techniques',
                    'Training Resources', 'Architecture'):
            assert meta.get(key), (coll['Name'], key)
        assert coll['Paper']['Title'] and coll['Paper']['URL']
        page, ref = PAGES[coll['Name']]
        assert coll['README'] == page
        assert ref in coll['Paper']['URL']
        assert coll['Code']['URL'] and coll['Code']['Version']
        assert (REPO_ROOT / coll['Code']['URL']).is_file()


def test_every_experiment_config_is_listed_once(index):
    names = [m['Name'] for m in index['Models']]
    assert len(names) == len(set(names))
    configs = sorted(p.stem for p in CONFIG_DIR.glob('*.py')
                     if not p.stem.startswith(('demo_', 'probe_')))
    assert sorted(names) == configs
    for model in index['Models']:
        assert model['Config'] == f"configs/{model['Name']}.py"
        assert (REPO_ROOT / model['Config']).is_file()


def test_required_fields(index):
    collections = {c['Name'] for c in index['Collections']}
    for m in index['Models']:
        name = m['Name']
        assert m['In Collection'] in collections, name
        if '_ge_' in name:
            assert m['In Collection'] == 'GatherExcite'
        elif '_psi_' in name:
            assert m['In Collection'] == 'PatchSpatialInteraction'
        else:
            assert m['In Collection'] == 'SpatialBias'
        meta = m['Metadata']
        for key in ('Training Data', 'Training Techniques',
                    'Training Resources', 'Batch Size', 'Parameters',
                    'FLOPs', 'FLOPs input size', 'Architecture'):
            assert key in meta and meta[key] is not None, (name, key)
        assert isinstance(meta['Parameters'], int) and meta['Parameters'] > 0
        assert isinstance(meta['FLOPs'], int) and meta['FLOPs'] > 0
        assert re.fullmatch(r'\d+x\d+', meta['FLOPs input size'])
        assert ('Epochs' in meta) != ('Iterations' in meta), name
        assert 'Weights' in m and m['Weights'] is None  # none published yet
        assert len(m['Results']) == 1
        result = m['Results'][0]
        dataset, metric = TASKS[result['Task']]
        assert result['Dataset'] in (
            dataset if isinstance(dataset, tuple) else (dataset, ))
        assert result['Dataset'] == meta['Training Data']
        assert list(result['Metrics']) == [metric], name
        # the paper's numbers where it reports them, nothing else
        assert result['Metrics'][metric] == PAPER.get(name), name


def test_schedule_matches_config(index):
    for m in index['Models']:
        cfg = load_config(m['Name'])
        meta = m['Metadata']
        if 'Epochs' in meta:
            assert meta['Epochs'] == cfg.train_cfg.max_epochs
        else:
            assert meta['Iterations'] == cfg.train_cfg.max_iters
        gpus = int(meta['Training Resources'].split('x')[0])
        assert meta['Batch Size'] == gpus * cfg.train_dataloader.batch_size


def test_parameters_are_the_built_models(index):
    """Every stated count equals the model the config builds."""
    import mmctx  # noqa: F401
    from mmengine.registry import MODELS, init_default_scope
    for name, m in sorted(_models(index).items()):
        cfg = load_config(name, {'model.backbone.init_cfg': None})
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        n = sum(p.numel() for p in model.parameters())
        assert m['Metadata']['Parameters'] == n, (name, n)


def test_flops_measurement_reproduces(index):
    """The FLOPs column is what tools/analysis/make_metafile.py measures
    (checked on the cheap CIFAR models)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'make_metafile', REPO_ROOT / 'tools' / 'analysis' / 'make_metafile.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    count_flops = tool._complexity_module().count_flops
    models = _models(index)
    for name in ('cifar100_r38', 'cifar100_sb_r38'):
        _, params, flops, _ = tool.measure(name, count_flops)
        assert models[name]['Metadata']['Parameters'] == params
        assert models[name]['Metadata']['FLOPs'] == flops


@pytest.mark.parametrize('collection', sorted(PAGES))
def test_method_page(index, collection):
    page, ref = PAGES[collection]
    text = (REPO_ROOT / page).read_text(encoding='utf-8')
    assert ref in text
    assert '## Abstract' in text and '## Results' in text
    assert '## Citation' in text and '```bibtex' in text
    # every model of the collection is in the page's results table
    for m in index['Models']:
        if m['In Collection'] == collection:
            assert f"`{m['Name']}.py`" in text or f"{m['Name']}.py" in text, \
                (page, m['Name'])
            value = list(m['Results'][0]['Metrics'].values())[0]
            if value is not None:
                row = next(line for line in text.splitlines()
                           if f"{m['Name']}.py" in line)
                assert f'{value:g}' in row, row
