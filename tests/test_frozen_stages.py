"""Fine-tuning the shipped detection and segmentation backbones from a stock
ResNet-50 checkpoint: frozen stages freeze the pretrained tensors, not the
context modules (issue 8).

Each config's backbone is built, loaded from a stock ResNet-50 written here,
and trained for a few steps of SGD (momentum, weight decay) and, separately,
of AdamW (decoupled weight decay) on a small input. Then every tensor a plain
ResNet freezes (stem and frozen stages, incl. BN statistics and the
pretrained slices of SB's widened conv3 / bn2) is bit-identical, and every
context parameter (SB branch, conv3 columns and bn2 entries of the bias
channels, GE and PSI modules), frozen stages included, got gradients and
changed. Splitting the frozen layers leaves the state dict, the parameter
count, the initialisation and the outputs as they are.
"""
import copy

import pytest
import torch
from mmdet.models.backbones import ResNet
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner.checkpoint import get_state_dict, load_state_dict
from torch.nn.modules.batchnorm import _BatchNorm

import mmctx  # noqa: F401
from config_overrides import DET_CONFIGS, SEG_CONFIGS, load_config
from mmctx.models import SpatialBias
from mmctx.models.backbones.pretrained_slices import is_split
from mmctx.models.backbones.trainable_context import CONTEXT_MODULES

STEPS = 3
INPUT = (2, 3, 32, 32)
OPTIMIZERS = {  # foreach: the same updates, several times faster on CPU
    'SGD': lambda params: torch.optim.SGD(
        params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True),
    'AdamW': lambda params: torch.optim.AdamW(
        params, lr=1e-3, weight_decay=0.05, foreach=True),
}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # Tiny inputs: on a shared 2-core CPU a second thread costs 5-10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backbone_cfg(name, **overrides):
    cfg = load_config(name)
    init_default_scope(cfg.default_scope)
    return dict(cfg.model.backbone.to_dict(), **overrides)


@pytest.fixture(scope='module')
def stock_checkpoints(tmp_path_factory):
    """A stock ResNet-50 and ResNetV1c-50 (deep stem: what the segmentation
    configs start from), random weights and BN statistics, saved as bare
    torchvision-layout state dicts (with the classifier)."""
    root = tmp_path_factory.mktemp('stock')
    gen = torch.Generator().manual_seed(0)
    paths = {}
    for deep_stem in (False, True):
        torch.manual_seed(0)
        model = ResNet(50, deep_stem=deep_stem)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    n = module.num_features
                    module.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                    module.running_mean.copy_(
                        0.1 * torch.randn(n, generator=gen))
                    module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        state = dict(model.state_dict(), **{
            'fc.weight': torch.randn(1000, 2048, generator=gen) * 0.01,
            'fc.bias': torch.zeros(1000)})
        paths[deep_stem] = str(root / f'resnet50_deep{int(deep_stem)}.pth')
        torch.save(state, paths[deep_stem])
    return paths


def stock_of(cfg, checkpoints):
    return checkpoints[cfg.get('deep_stem', False)]


_STOCK = {}


def stock_state(path):
    if path not in _STOCK:
        _STOCK[path] = torch.load(path)
    return _STOCK[path]


_LAST_BUILT = {}


def build_pretrained(cfg, checkpoints):
    """The backbone of ``cfg`` started from the stock checkpoint (the last
    one built is kept: the tests of one config share it)."""
    key = repr(sorted(cfg.items()))
    if key not in _LAST_BUILT:
        _LAST_BUILT.clear()
        torch.manual_seed(0)
        model = MODELS.build(dict(cfg, init_cfg=dict(
            type='Pretrained', checkpoint=stock_of(cfg, checkpoints))))
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel('ERROR')  # the long lists of newly initialised keys
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
        _LAST_BUILT[key] = model
    return copy.deepcopy(_LAST_BUILT[key])


def frozen_prefixes(model):
    """State-dict prefixes of what upstream ResNet freezes: stem + stages."""
    if model.frozen_stages < 0:
        return ()
    stem = ('stem.', ) if model.deep_stem else ('conv1.', 'bn1.')
    return stem + tuple(f'layer{i}.'
                        for i in range(1, model.frozen_stages + 1))


def pretrained_slices(state, stock):
    """Per stock key: the leading slice of ``state[key]`` of the stock
    shape (the pretrained part of what SB widened, all of the rest)."""
    return {
        key: state[key][tuple(slice(0, n) for n in value.shape)]
        for key, value in stock.items() if key in state
    }


def context_entries(model):
    """Every mmctx context parameter, and the conv3 columns and bn2 entries
    of SB's bias channels: label -> (state-dict key, (dim, start) of the
    slice or None, function returning its current gradient)."""
    entries = {}
    for name, module in model.named_modules():
        if isinstance(module, CONTEXT_MODULES):
            for pname, p in module.named_parameters():
                entries[f'{name}.{pname}'] = (f'{name}.{pname}', None,
                                              lambda p=p: p.grad)
        spatial_bias = getattr(module, 'spatial_bias', None)
        if not isinstance(spatial_bias, SpatialBias) \
                or spatial_bias.fusion != 'concat':
            continue  # only SB blocks widen conv3 and bn2
        for layer, dim, pnames in (('conv3', 1, ('weight', )),
                                   (module.norm2_name, 0, ('weight', 'bias'))):
            sub, start = getattr(module, layer), module.planes
            for pname in pnames:
                key = f'{name}.{layer}.{pname}'
                if is_split(sub):
                    p = getattr(sub, f'{pname}_context')
                    grad = (lambda p=p: p.grad)
                else:
                    p = getattr(sub, pname)
                    grad = (lambda p=p, dim=dim, start=start: None
                            if p.grad is None else p.grad.narrow(
                                dim, start, p.shape[dim] - start))
                entries[f'{key}[bias channels]'] = (key, (dim, start), grad)
    return entries


def entry_value(state, entry):
    key, part, _ = entry
    if part is None:
        return state[key]
    dim, start = part
    return state[key].narrow(dim, start, state[key].shape[dim] - start)


def context_norms(model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and any(
                isinstance(model.get_submodule(name[:i]), CONTEXT_MODULES)
                for i in range(len(name)) if name[i] == '.')]


def loss_of(outs):
    return sum(out.mean() for out in outs)


_FINDINGS = {}


def fine_tune_findings(name, checkpoints):
    """Per optimizer, what a few training steps of the config's backbone
    did (computed once per distinct backbone config)."""
    cfg = backbone_cfg(name)
    key = repr(sorted(cfg.items()))
    if key in _FINDINGS:
        return _FINDINGS[key]
    stock = stock_state(stock_of(cfg, checkpoints))
    findings = {}
    for optimizer, make in OPTIMIZERS.items():
        model = build_pretrained(cfg, checkpoints)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        entries = context_entries(model)
        optim = make(model.parameters())
        got_grad, norms_in_train_mode = set(), set()
        x = torch.randn(INPUT, generator=torch.Generator().manual_seed(1))
        for _ in range(STEPS):
            model.train()  # as the runner does; re-applies frozen_stages
            norms_in_train_mode |= {
                n for n, m in context_norms(model) if m.training}
            optim.zero_grad()
            loss = loss_of(model(x))
            assert torch.isfinite(loss)
            loss.backward()
            # BN in training mode on 2 values per channel (segmentation
            # backbones, stage 4 of a 32x32 input) blows gradients up (norm
            # ~1e7 at PSI's MLP): one unclipped SGD step saturates its gates.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            for label, (_, _, grad) in entries.items():
                g = grad()
                if g is not None and g.abs().sum() > 0:
                    got_grad.add(label)
            optim.step()
        after = model.state_dict()
        prefixes = frozen_prefixes(model)
        old, new = pretrained_slices(before, stock), pretrained_slices(
            after, stock)
        frozen = [k for k in old if k.startswith(prefixes)]
        trainable = [k for k in old if not k.startswith(prefixes)
                     and 'running_' not in k and 'num_batches' not in k]
        findings[optimizer] = dict(
            frozen=frozen,
            frozen_changed=[k for k in frozen
                            if not torch.equal(old[k], new[k])],
            trainable=trainable,
            trainable_unchanged=[k for k in trainable
                                 if torch.equal(old[k], new[k])],
            context=sorted(entries),
            context_without_grad=sorted(set(entries) - got_grad),
            context_unchanged=[
                label for label, entry in entries.items()
                if torch.equal(entry_value(before, entry),
                               entry_value(after, entry))
            ],
            context_norms=[n for n, _ in context_norms(model)],
            context_norms_in_train_mode=sorted(norms_in_train_mode),
            context_norm_stats_unchanged=[
                n for n, _ in context_norms(model)
                if torch.equal(before[f'{n}.running_var'],
                               after[f'{n}.running_var'])
            ])
    _FINDINGS[key] = findings
    return findings


@pytest.mark.parametrize('optimizer', sorted(OPTIMIZERS))
@pytest.mark.parametrize('name', DET_CONFIGS + SEG_CONFIGS)
def test_frozen_pretrained_tensors_stay_and_context_trains(
        name, optimizer, stock_checkpoints):
    cfg = backbone_cfg(name)
    detection = name in DET_CONFIGS
    # detection: mmdet's frozen_stages=1 and norm_eval; segmentation: neither
    assert (cfg.get('frozen_stages', -1), cfg['norm_eval']) == \
        ((1, True) if detection else (-1, False))
    found = fine_tune_findings(name, stock_checkpoints)[optimizer]

    # stem (6 tensors) + stage 1 (60): weights, BN affine and statistics,
    # pretrained slices of SB's conv3 / bn2 -- all bit-identical
    assert len(found['frozen']) == (66 if detection else 0)
    assert found['frozen_changed'] == []
    # while every other pretrained weight trained
    assert found['trainable'] and found['trainable_unchanged'] == []

    if cfg['type'] == 'ContextResNet':  # the plain ResNet
        assert found['context'] == []
        return
    assert any(k.startswith('layer1.') for k in found['context'])
    assert found['context_without_grad'] == []
    assert found['context_unchanged'] == []
    if detection:
        # norm_eval: context norms normalise with running statistics (eval
        # mode) and still learn them from the batches
        assert found['context_norms_in_train_mode'] == []
        assert found['context_norm_stats_unchanged'] == []


def distinct_backbones(names, **overrides):
    seen, distinct = set(), []
    for name in names:
        key = repr(sorted(backbone_cfg(name, **overrides).items()))
        if key not in seen:
            seen.add(key)
            distinct.append(name)
    return distinct


def layout(state):
    return [(key, tuple(value.shape)) for key, value in state.items()]


@pytest.mark.parametrize('name', distinct_backbones(DET_CONFIGS))
def test_layout_and_parameter_count_as_without_frozen_stages(name):
    torch.manual_seed(0)
    frozen = MODELS.build(backbone_cfg(name, init_cfg=None))
    plain = MODELS.build(backbone_cfg(name, init_cfg=None, frozen_stages=-1))
    assert frozen.frozen_stages == 1
    assert layout(frozen.state_dict()) == layout(plain.state_dict())
    assert layout(get_state_dict(frozen)) == layout(plain.state_dict())
    assert sum(p.numel() for p in frozen.parameters()) == \
        sum(p.numel() for p in plain.parameters())
    if name.endswith('_sb_r50'):
        state = frozen.state_dict()
        assert state['layer1.0.conv3.weight'].shape == (256, 67, 1, 1)
        assert state['layer1.0.bn2.weight'].shape == (67, )


def randomize_context(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (key, part, _) in context_entries(model).items():
            tensor = dict(model.named_parameters()).get(key)
            if tensor is None:  # split: the trainable slice
                module, pname = key.rsplit('.', 1)
                tensor = getattr(model.get_submodule(module),
                                 f'{pname}_context')
            elif part is not None:
                tensor = tensor.narrow(part[0], part[1],
                                       tensor.shape[part[0]] - part[1])
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)


def assert_same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    'name', ['faster_rcnn_sb_r50', 'faster_rcnn_ge_r50', 'faster_rcnn_psi_r50'])
def test_frozen_and_unfrozen_load_each_other_and_compute_the_same(
        name, stock_checkpoints):
    cfg = backbone_cfg(name)
    frozen = build_pretrained(cfg, stock_checkpoints)
    randomize_context(frozen, seed=1)  # context off its start values
    plain = MODELS.build(dict(cfg, init_cfg=None, frozen_stages=-1))
    plain.load_state_dict(frozen.state_dict())
    assert_same_state(plain.state_dict(), frozen.state_dict())
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        for ours, theirs in zip(frozen.eval()(x), plain.eval()(x)):
            assert torch.equal(ours, theirs)

    # and back, also through mmengine's loader (checkpoints, load_from)
    randomize_context(plain, seed=2)
    state = get_state_dict(plain)
    fresh = MODELS.build(dict(cfg, init_cfg=None))
    load_state_dict(fresh, state, strict=True)
    frozen.load_state_dict(state)
    for model in (frozen, fresh):
        assert_same_state(model.state_dict(), plain.state_dict())
    with torch.no_grad():
        for ours, theirs in zip(frozen.eval()(x), plain.eval()(x)):
            assert torch.equal(ours, theirs)


def test_misfit_tensor_is_reported_under_its_own_key():
    model = MODELS.build(dict(type='SBResNet', depth=14, frozen_stages=1))
    state = model.state_dict()
    state['layer1.0.conv3.weight'] = torch.zeros(256, 66, 1, 1)
    del state['layer1.0.bn2.bias']
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert 'size mismatch for layer1.0.conv3.weight' in message
    assert '"layer1.0.bn2.bias"' in message  # missing, by its own name
    assert 'weight_pretrained' not in message


def test_init_weights_treats_split_layers_as_whole_ones():
    """Default (Kaiming) init, SB's conv3 bias columns included, with and
    without frozen stages: the same tensors."""
    states = []
    for frozen_stages in (-1, 2):
        torch.manual_seed(0)
        model = MODELS.build(dict(type='SBResNet', depth=14,
                                  frozen_stages=frozen_stages))
        model.init_weights()
        states.append(model.state_dict())
    assert_same_state(*states)
    conv3 = states[1]['layer2.0.conv3.weight']
    assert conv3.shape[1] == 131
    assert conv3[:, 128:].std() > 0.5 * conv3[:, :128].std() > 0


def test_context_norm_statistics_under_norm_eval():
    """Training with norm_eval: context norms normalise with running
    statistics that the first batch sets (a batch of one value per channel
    leaves them); inference leaves them too."""
    model = MODELS.build(dict(
        type='GEResNet', depth=14, frozen_stages=1, norm_eval=True,
        ge=dict(variant='depthwise_excite', extent='global')))
    norm = model.layer1[0].gather_excite.gather_norms[0]
    seen = []
    norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model.train()
    assert not norm.training
    model(torch.randn(1, 3, 64, 64))  # global gather: (1, C, 1, 1)
    assert not norm.running_mean.any() and norm.running_var.eq(1).all()
    model(torch.randn(2, 3, 64, 64))
    var, mean = torch.var_mean(seen[-1], (0, 2, 3), correction=1)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    stats = [b.clone() for b in model.buffers()]
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
