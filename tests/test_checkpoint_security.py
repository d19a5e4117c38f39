"""Checkpoints are untrusted input (mmctx.compat.checkpoint).

Every crafted checkpoint below is loaded in a fresh subprocess through the
real entry points -- mmengine's ``_load_checkpoint`` (``Runner.resume`` and
``Runner.load_checkpoint``: ``--resume``, ``load_from``, ``tools/test.py``),
``load_checkpoint`` into a model, ``PretrainedInit`` (``init_cfg``), and the
mmctx backbones' stock-checkpoint reader -- so that a crash (segmentation
fault) fails the test instead of killing pytest. Each must be refused with a
CheckpointError naming the file, and leave the process state (HistoryBuffer's
class attributes and statistics table, the registries, torch's allowlist)
unchanged. A legitimate checkpoint built by the same crafting code must load,
which shows the refusals come from the checks and not from the crafting.
"""
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_crafting import (GETATTR, HB, NDARRAY, NP, REBUILD_FROM_TYPE,
                                 Build, Call, Global, New, array, dtype, f8,
                                 hb_state, history_buffer, i8,
                                 mmengine_checkpoint, scalar, statistic,
                                 write_checkpoint)

O8_STATE = (3, '|', None, None, None, -1, -1, 63)  # numpy's object dtype
POINTERS = struct.pack('<2Q', 0x4141414141414141, 0x10)

ATTACKS = {
    # the common pickle attacks
    'os_system': Call(Global('posix', 'system'), ('touch {marker}', )),
    'builtins_eval': Call(Global('builtins', 'eval'),
                          ("__import__('os').system('touch {marker}')", )),
    'builtins_exec': Call(Global('builtins', 'exec'),
                          ("open('{marker}', 'w')", )),
    # numpy: object / void memory, forged dtypes, arrays from raw bytes
    'object_dtype_array': array((2, ), dtype('O8', O8_STATE), POINTERS),
    'object_scalar': scalar(dtype('O8', O8_STATE), POINTERS[:8]),
    'forged_dtype_refcount_flag': array(
        (2, ), dtype('f8', (3, '<', None, None, None, -1, -1, 1)), POINTERS),
    'forged_dtype_itemsize': array(
        (2, ), dtype('f8', (3, '<', None, None, None, 64, 1, 0)), POINTERS),
    'structured_dtype_with_object_field': array(
        (1, ), dtype('V16', (3, '|', None, ('a', 'b'), {
            'a': (dtype('O8', O8_STATE), 0),
            'b': (dtype('O8', O8_STATE), 8)
        }, 16, 8, 63)), POINTERS),
    'void_dtype': array((2, ), dtype('V8', (3, '|', None, None, None, 8, 1,
                                            16)), POINTERS),
    'array_larger_than_its_bytes': array((1 << 40, ), dtype('f8'),
                                         b'\0' * 8),
    'array_negative_shape': array((-1, ), dtype('f8'), b''),
    'ndarray_new_on_foreign_buffer': New(
        NDARRAY, ((4, ), dtype('f8'), b'\0' * 8, 0, (-8, ))),
    'ndarray_called_directly': Call(NDARRAY, ((1 << 20, ), )),
    'scalar_short_bytes': scalar(dtype('f8'), b'\0'),
    'reconstruct_other_class': Call(Global(NP, '_reconstruct'),
                                    (HB, (0, ), b'b')),
    # HistoryBuffer: statistics table poisoning and state tampering
    'hb_swap_mean_and_max': history_buffer(hb_state(statistics_methods={
        'mean': statistic('max'),
        'max': statistic('min')
    })),
    'hb_add_method_then_fail': [
        history_buffer(hb_state(statistics_methods={
            'evil': statistic('mean')
        })),
        Call(Global('posix', 'system'), ('touch {marker}', )),
    ],
    'hb_object_history': history_buffer(hb_state(
        _log_history=array((2, ), dtype('O8', O8_STATE), POINTERS))),
    'hb_history_with_forged_refcount_dtype': history_buffer(hb_state(
        _log_history=array((2, ), dtype('f8', (3, '<', None, None, None, -1,
                                               -1, 1)), POINTERS))),
    'hb_unequal_histories': history_buffer(hb_state(_count_history=i8(1))),
    'hb_negative_max_length': history_buffer(hb_state(max_length=-1)),
    'hb_history_not_an_array': history_buffer(hb_state(
        _log_history=['a', 'b'])),
    'hb_extra_attribute': history_buffer(
        dict(hb_state(), _statistics_methods={'mean': statistic('max')})),
    'hb_without_state': New(HB, ()),
    'hb_called': Call(HB, ()),
    # getattr on private or state-changing attributes
    'getattr_register_statistics': Call(GETATTR,
                                        (HB, 'register_statistics')),
    'getattr_private_table': Call(GETATTR, (HB, '_statistics_methods')),
    'getattr_dunder_init': Call(GETATTR, (HB, '__init__')),
    'getattr_reaching_globals': Call(GETATTR,
                                     (statistic('mean'), '__globals__')),
    'getattr_on_other_object': Call(
        GETATTR, (Global('collections', 'OrderedDict'), '__setitem__')),
    # torch's own rebuild helpers calling what the allowlist returns
    'rebuild_hb_with_poisoned_state': Call(REBUILD_FROM_TYPE, (
        HB, HB, (), hb_state(statistics_methods={'mean': statistic('max')}))),
    'rebuild_calls_register_statistics': Call(REBUILD_FROM_TYPE, (
        Call(GETATTR, (HB, 'register_statistics')), HB,
        (statistic('mean'), ), {})),
    'rebuild_array_with_object_dtype': Call(REBUILD_FROM_TYPE, (
        Global(NP, '_reconstruct'), NDARRAY, (NDARRAY, (0, ), b'b'),
        (1, (2, ), dtype('O8', O8_STATE), False, POINTERS))),
    'rebuild_dtype_with_forged_state': Call(REBUILD_FROM_TYPE, (
        Global('numpy', 'dtype'), Global('numpy', 'dtype'),
        ('f8', False, True), (3, '<', None, None, None, -1, -1, 1))),
    'rebuild_statistic_on_forged_buffer': Call(REBUILD_FROM_TYPE, (
        statistic('mean'), NDARRAY, (history_buffer(), ), {})),
    # combinations: an otherwise valid checkpoint with one bad part
    'valid_hb_plus_object_scalar_in_runtime_info': 'runtime_info',
}


def build_attack(name, marker):

    def fill(node):  # put the marker path into command strings
        if isinstance(node, str):
            return node.replace('{marker}', marker)
        if isinstance(node, tuple):
            return tuple(fill(x) for x in node)
        if isinstance(node, list):
            return [fill(x) for x in node]
        if isinstance(node, dict):
            return {fill(k): fill(v) for k, v in node.items()}
        if isinstance(node, (Call, New, Build)):
            return type(node)(*(fill(getattr(node, f))
                                 for f in node.__dataclass_fields__))
        return node

    if name == 'valid_hb_plus_object_scalar_in_runtime_info':
        return mmengine_checkpoint(
            history_buffer(),
            runtime_info={'iter': 2,
                          'lr': scalar(dtype('O8', O8_STATE), POINTERS[:8])})
    return mmengine_checkpoint(fill(ATTACKS[name]))


LIBRARY_ENTRIES = ('resume', 'load_from', 'init_cfg', 'mmctx_backbone')
DRIVER = Path(__file__).with_name('checkpoint_load_driver.py')


def load_in_subprocesses(paths, out_file):
    """Every path through every entry point, each in its own child process
    of one driver (tests/checkpoint_load_driver.py): a crash is recorded."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(out_file), *map(str, paths)],
        capture_output=True, text=True, timeout=900,
        cwd=str(DRIVER.parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out_file.read_text())
    for path, record in records.items():
        assert 'crashed' not in record, (
            f'loading {path} crashed its process: {record["crashed"]}')
    return records


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
    """All crafted, damaged and missing files of this module, loaded once."""
    root = tmp_path_factory.mktemp('crafted')
    paths = {}
    for name in ATTACKS:
        paths[name] = write_checkpoint(
            root / f'{name}.pth', build_attack(name,
                                               str(root / f'{name}.pth.pwned')))
    for damage, make in DAMAGES.items():
        paths[damage] = root / f'{damage}.pth'
        make(paths[damage])
    paths['legit'] = write_checkpoint(root / 'legit.pth', LEGIT)
    paths['missing'] = root / 'nowhere.pth'
    records = load_in_subprocesses(paths.values(), root / 'records.json')
    return {name: (path, records[str(path)]) for name, path in paths.items()}


@pytest.mark.parametrize('name', sorted(ATTACKS))
def test_crafted_checkpoint_is_refused_everywhere(name, loaded):
    path, out = loaded[name]
    assert not out['marker'], 'the checkpoint ran a command'
    for entry in LIBRARY_ENTRIES:
        kind, message = out['results'][entry]
        assert kind == 'CheckpointError', (entry, kind, message)
        assert str(path) in message, (entry, message)
        assert 'refused' in message or 'damaged' in message, message
    # a user's own torch.load keeps torch's defaults
    assert out['results']['plain_torch_load'][0] == 'UnpicklingError'
    assert out['after'] == out['before']


LEGIT = mmengine_checkpoint(
    history_buffer(), runtime_info={
        'iter': 2,
        'lr': scalar(dtype('f8'), struct.pack('<d', 0.5)),
        'flag': scalar(dtype('b1', byteorder='|'), b'\x01'),
        'big_endian': array((2, ), dtype('i4', byteorder='>'),
                            struct.pack('>2i', 7, 8)),
    })


def test_legitimate_crafted_checkpoint_loads(loaded):
    """The crafting code writes what mmengine writes: such a file loads at
    every mmctx-scoped entry, into a real HistoryBuffer with plain arrays."""
    path, out = loaded['legit']
    for entry in LIBRARY_ENTRIES:
        assert out['results'][entry][0] == 'loaded', out['results'][entry]
    assert out['results']['plain_torch_load'][0] == 'UnpicklingError'
    assert out['extra'] == dict(type='HistoryBuffer', mean=2.0, max=3.0,
                                state=['_count_history', '_log_history',
                                       'max_length'],
                                log_type='ndarray', dtype='float64')
    # a successful load adds mmengine's four default statistics to the
    # class-wide table, as mmengine does for any new HistoryBuffer
    after = dict(out['after'])
    methods = after.pop('methods')
    assert {k: v for k, v in out['before'].items() if k != 'methods'} == after
    assert methods == {
        name: f'mmengine.logging.history_buffer.HistoryBuffer.{name}'
        for name in ('min', 'max', 'current', 'mean')
    }

    from mmctx.compat import load_checkpoint_file
    info = load_checkpoint_file(path)['message_hub']['runtime_info']
    assert type(info['lr']) is np.float64 and info['lr'] == 0.5
    assert type(info['flag']) is np.bool_ and bool(info['flag'])
    assert type(info['big_endian']) is np.ndarray
    assert info['big_endian'].tolist() == [7, 8]


def test_a_real_mmengine_checkpoint_round_trips(tmp_path):
    """What mmengine itself pickles (numpy 2 names, real HistoryBuffer
    state) loads into objects equal to the saved ones."""
    import mmctx  # noqa: F401
    from mmctx.compat import load_checkpoint_file
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('mmctx_round_trip')
    for i in range(5):
        hub.update_scalar('train/loss', 1.0 / (i + 1))
        hub.update_scalar('train/lr', np.float32(0.02), count=2)
    hub.update_info('iter', 5)
    hub.update_info('np_value', np.int64(7))
    path = tmp_path / 'hub.pth'
    torch.save({'message_hub': hub.state_dict(), 'meta': {'iter': 5}}, path)
    loaded = load_checkpoint_file(path)['message_hub']
    for key, buf in hub.log_scalars.items():
        got = loaded['log_scalars'][key]
        assert type(got) is type(buf)
        for attr in ('_log_history', '_count_history'):
            assert np.array_equal(getattr(got, attr), getattr(buf, attr))
            assert getattr(got, attr).dtype == getattr(buf, attr).dtype
        assert got.max_length == buf.max_length
        assert got.mean() == buf.mean() and got.max() == buf.max()
    assert loaded['runtime_info']['np_value'] == 7
    assert type(loaded['runtime_info']['np_value']) is np.int64


# --------------------------------------------------------------------------
# damaged and missing files
# --------------------------------------------------------------------------
def _cut_checkpoint(path, keep):
    torch.save({'state_dict': {'conv.weight': torch.randn(64, 3, 7, 7)},
                'meta': {'iter': 1}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


DAMAGES = {
    'empty': lambda p: p.write_bytes(b''),
    'truncated': lambda p: _cut_checkpoint(p, lambda n: 3000),
    'cut_in_half': lambda p: _cut_checkpoint(p, lambda n: n // 2),
    'not_a_checkpoint': lambda p: p.write_text('hello, this is text\n' * 50),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_checkpoint_names_the_file(damage, loaded):
    path, out = loaded[damage]
    for entry in LIBRARY_ENTRIES:
        kind, message = out['results'][entry]
        assert kind == 'CheckpointError', (entry, kind, message)
        assert str(path) in message and 'damaged' in message, message


def test_missing_checkpoint_names_the_file(loaded):
    path, out = loaded['missing']
    for entry in LIBRARY_ENTRIES:
        kind, message = out['results'][entry]
        assert kind in ('CheckpointNotFoundError', 'FileNotFoundError'), (
            entry, kind)
        assert str(path) in message and 'not found' in message


# --------------------------------------------------------------------------
# the command-line entry points
# --------------------------------------------------------------------------
def _with_pretrained(cfg, checkpoint):
    """A config over ``cfg`` whose backbone starts from ``checkpoint``."""
    path = cfg.with_name('pretrained.py')
    path.write_text(
        f'_base_ = {str(cfg)!r}\n'
        'model = dict(backbone=dict(init_cfg=dict(\n'
        f'    _delete_=True, type="Pretrained", checkpoint={str(checkpoint)!r})))\n')
    return path


TOOL_CASES = [
    ('train_resume', 'object_dtype_array'),
    ('train_resume', 'hb_swap_mean_and_max'),
    ('train_resume', 'empty'),
    ('train_load_from', 'truncated'),
    ('train_init_cfg', 'rebuild_array_with_object_dtype'),
    ('train_init_cfg', 'empty'),
    ('test', 'object_scalar'),
    ('test', 'cut_in_half'),
]


@pytest.mark.parametrize('entry,case', TOOL_CASES)
def test_tools_refuse_bad_checkpoints(entry, case, probe_dir, repo_root,
                                      tiny_det_config, tmp_path):
    cfg = tiny_det_config()
    path = tmp_path / f'{case}.pth'
    if case in DAMAGES:
        DAMAGES[case](path)
    else:
        write_checkpoint(path, build_attack(case, str(tmp_path / 'pwned')))
    tools = repo_root / 'tools'
    train = [sys.executable, tools / 'train.py', cfg, '--work-dir',
             tmp_path / 'work']
    cmd = {
        'train_resume': train + ['--resume', path],
        'train_load_from': train + ['--cfg-options', f'load_from={path}'],
        'train_init_cfg': [sys.executable, tools / 'train.py',
                           _with_pretrained(cfg, path), '--work-dir',
                           tmp_path / 'work'],
        'test': [sys.executable, tools / 'test.py', cfg, path, '--work-dir',
                 tmp_path / 'work'],
    }[entry]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo_root), str(probe_dir)]))  # the config imports probe hooks
    proc = subprocess.run([str(c) for c in cmd], cwd=str(repo_root), env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode > 0, (proc.returncode, out[-3000:])
    assert re.search(r'CheckpointError: checkpoint .*' + re.escape(str(path)),
                     out), out[-3000:]
    word = 'damaged' if case in DAMAGES else 'refused'
    assert word in out.split('CheckpointError')[-1], out[-3000:]
    assert not (tmp_path / 'pwned').exists()
    assert 'Iter(train)' not in out  # refused before the first iteration


def test_resume_with_nothing_to_resume_warns(run, repo_root, tiny_det_config,
                                             tmp_path):
    cfg = tiny_det_config(max_iters=1)
    out = run([sys.executable, repo_root / 'tools' / 'train.py', cfg,
               '--work-dir', tmp_path / 'empty_work', '--resume',
               '--no-validate'])
    assert 'WARNING: --resume: nothing to resume in' in out
    assert 'FROM SCRATCH' in out


# --------------------------------------------------------------------------
# real checkpoints of short mmdet, mmseg and mmpretrain trainings
# --------------------------------------------------------------------------
def _same(a, b, where='checkpoint'):
    """Deep equality of two loaded checkpoints (tensors, arrays, numpy
    scalars, HistoryBuffers by their histories)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, HistoryBuffer):
        assert a.max_length == b.max_length, where
        for attr in ('_log_history', '_count_history'):
            _same(getattr(a, attr), getattr(b, attr), f'{where}.{attr}')
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f'{where}[{i}]')
    else:
        assert a == b, (where, a, b)


def _det_cfg(tmp_path, request):
    from mmengine.config import Config
    return Config.fromfile(str(request.getfixturevalue('tiny_det_config')(
        max_iters=2)), import_custom_modules=False)


def _seg_cfg(tmp_path, request):
    from config_overrides import load_config, seg_options
    cfg = load_config('fpn_r50_ade20k')
    cfg.merge_from_dict(seg_options(cfg, crop=64, scale=(128, 64)))
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return cfg


def _cls_cfg(tmp_path, request):
    from config_overrides import cls_options, load_config, make_imagenet
    cfg = load_config('imagenet_r50_sgd')
    cfg.merge_from_dict(cls_options(cfg, make_imagenet(tmp_path / 'inet'),
                                    crop=32))
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return cfg


@pytest.mark.parametrize('toolbox,make_cfg', [('mmdet', _det_cfg),
                                              ('mmseg', _seg_cfg),
                                              ('mmpretrain', _cls_cfg)])
def test_real_checkpoints_load_exactly_and_resume(toolbox, make_cfg,
                                                  tmp_path, request):
    import mmctx  # noqa: F401
    from config_overrides import find_checkpoint
    from mmctx.compat import load_checkpoint_file, mmengine_checkpoint_globals
    from mmengine.runner import Runner
    cfg = make_cfg(tmp_path, request)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.launcher = 'none'
    cfg.experiment_name = f'{toolbox}_{tmp_path.name}'
    cfg.custom_hooks = []
    cfg.custom_imports = dict(imports=['mmctx'], allow_failed_imports=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    ckpt = find_checkpoint(cfg.work_dir)

    # exactly the globals the allowlist names, nothing more
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    allowed = {name for _, name in mmengine_checkpoint_globals()}
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in found
    assert found <= allowed, found - allowed

    # loads into objects equal to what a full (trusted) unpickling gives
    trusted = torch.load(ckpt, map_location='cpu', weights_only=False)
    _same(load_checkpoint_file(ckpt), trusted)

    # and the runner resumes from it
    iters = runner.iter
    cfg.resume, cfg.load_from = True, str(ckpt)
    cfg.experiment_name += '_resumed'
    resumed = Runner.from_cfg(cfg)
    resumed._train_loop = resumed.build_train_loop(resumed._train_loop)
    resumed.optim_wrapper = resumed.build_optim_wrapper(resumed.optim_wrapper)
    resumed.load_or_resume()
    assert resumed.iter == iters
    for key, buf in runner.message_hub.log_scalars.items():
        if key in trusted['message_hub']['log_scalars']:
            got = resumed.message_hub.log_scalars[key]
            assert np.array_equal(got._log_history,
                                  trusted['message_hub']['log_scalars'][key]
                                  ._log_history)
