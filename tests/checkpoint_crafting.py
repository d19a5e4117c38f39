"""Writing crafted checkpoints for tests/test_checkpoint_security.py.

A payload is described as a tree of :class:`Global`, :class:`Call`
(REDUCE), :class:`New` (NEWOBJ), :class:`Build` (BUILD) and plain Python
values; :func:`write_checkpoint` serialises it with protocol-2 opcodes (what
``torch.save`` writes) into the ``data.pkl`` of a real torch zip checkpoint,
so ``torch.load`` reads it exactly as it reads a saved file.
"""
import io
import struct
import zipfile
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: object
    args: tuple


@dataclass(frozen=True)
class New:
    cls: object
    args: tuple


@dataclass(frozen=True)
class Build:
    obj: object
    state: object


def _emit(node, out):
    if node is None:
        out += b'N'
    elif node is True or node is False:
        out += b'\x88' if node else b'\x89'
    elif isinstance(node, int):
        if -2**31 <= node < 2**31:
            out += b'J' + struct.pack('<i', node)
        else:
            data = node.to_bytes((node.bit_length() + 8) // 8, 'little',
                                 signed=True)
            out += b'\x8a' + bytes([len(data)]) + data
    elif isinstance(node, float):
        out += b'G' + struct.pack('>d', node)
    elif isinstance(node, str):
        data = node.encode('utf-8')
        out += b'X' + struct.pack('<I', len(data)) + data
    elif isinstance(node, bytes):  # protocol 2 writes bytes this way
        _emit(Call(Global('_codecs', 'encode'),
                   (node.decode('latin1'), 'latin1')), out)
    elif isinstance(node, tuple):
        out += b'('
        for item in node:
            _emit(item, out)
        out += b't'
    elif isinstance(node, list):
        out += b']('
        for item in node:
            _emit(item, out)
        out += b'e'
    elif isinstance(node, dict):
        out += b'}('
        for key, value in node.items():
            _emit(key, out)
            _emit(value, out)
        out += b'u'
    elif isinstance(node, Global):
        out += b'c' + f'{node.module}\n{node.name}\n'.encode()
    elif isinstance(node, Call):
        _emit(node.func, out)
        _emit(tuple(node.args), out)
        out += b'R'
    elif isinstance(node, New):
        _emit(node.cls, out)
        _emit(tuple(node.args), out)
        out += b'\x81'
    elif isinstance(node, Build):
        _emit(node.obj, out)
        _emit(node.state, out)
        out += b'b'
    else:
        raise TypeError(f'cannot emit {node!r}')


def pickle_bytes(node):
    out = bytearray(b'\x80\x02')
    _emit(node, out)
    return bytes(out + b'.')


def write_checkpoint(path, node):
    """A torch zip checkpoint whose object is ``node``."""
    template = io.BytesIO()
    torch.save({}, template)
    with zipfile.ZipFile(io.BytesIO(template.getvalue())) as zin, \
            zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith('/data.pkl'):
                data = pickle_bytes(node)
            zout.writestr(info.filename, data)
    return path


# --------------------------------------------------------------------------
# the pieces real mmengine checkpoints are made of
# --------------------------------------------------------------------------
NP = 'numpy._core.multiarray'
HB = Global('mmengine.logging.history_buffer', 'HistoryBuffer')
GETATTR = Global('builtins', 'getattr')
REBUILD_FROM_TYPE = Global('torch._tensor', '_rebuild_from_type_v2')
NDARRAY = Global('numpy', 'ndarray')


def dtype(code, state=None, byteorder='<'):
    state = state or (3, byteorder, None, None, None, -1, -1, 0)
    return Build(Call(Global('numpy', 'dtype'), (code, False, True)), state)


def array(shape, dt, raw, fortran=False):
    return Build(Call(Global(NP, '_reconstruct'), (NDARRAY, (0, ), b'b')),
                 (1, shape, dt, fortran, raw))


def scalar(dt, raw):
    return Call(Global(NP, 'scalar'), (dt, raw))


def statistic(name):
    return Call(GETATTR, (HB, name))


def f8(*values):
    return array((len(values), ), dtype('f8'), struct.pack(
        f'<{len(values)}d', *values))


def i8(*values):
    return array((len(values), ), dtype('i8'), struct.pack(
        f'<{len(values)}q', *values))


def hb_state(**changes):
    state = {
        'max_length': 1000000,
        '_log_history': f8(1.0, 3.0),
        '_count_history': i8(1, 1),
        'statistics_methods': {
            name: statistic(name)
            for name in ('min', 'max', 'current', 'mean')
        },
    }
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def history_buffer(state=None):
    return Build(New(HB, ()), hb_state() if state is None else state)


def mmengine_checkpoint(payload, runtime_info=None):
    """An mmengine-shaped checkpoint with ``payload`` among the logged
    scalars of its message hub (where real ones keep their HistoryBuffers)."""
    return {
        'meta': {'epoch': 0, 'iter': 2},
        'state_dict': {},
        'message_hub': {
            'log_scalars': {'train/loss': payload},
            'runtime_info': runtime_info or {'iter': 2},
            'resumed_keys': {'iter': True},
        },
    }
