"""Checkpoints as untrusted input: weights-only loading of mmengine checkpoints.

torch >= 2.6 loads with ``weights_only=True``, which refuses every global that
is not a tensor type. Besides tensors, a checkpoint written by mmengine's
Runner (mmdet, mmseg and mmpretrain training alike; checked on real ones in
``tests/test_checkpoint_security.py``) holds exactly these globals, all in
``message_hub`` (the logged history that ``--resume`` restores):

=============================================  ==============================
pickled global                                 why it is there
=============================================  ==============================
``mmengine.logging.history_buffer.HistoryBuffer``  one per logged scalar
``builtins.getattr``                           ``getattr(HistoryBuffer, 'mean')``:
                                               the statistics methods a
                                               HistoryBuffer pickles
``numpy.core.multiarray._reconstruct``         a HistoryBuffer's two
(``numpy._core`` under numpy 2)                histories are numpy arrays
``numpy.ndarray``                              (class argument of the above)
``numpy.dtype``                                dtype of arrays and scalars
``numpy.core.multiarray.scalar``               numpy scalars among the logged
(``numpy._core`` under numpy 2)                values
=============================================  ==============================

None of the real objects is handed to the unpickler. Each name maps to a
stand-in that accepts exactly what mmengine and numpy write and refuses
anything else, so nothing can describe object or void memory (object,
structured and void dtypes, forged dtype flags, arrays on raw memory) and no
callable that changes state is reachable (``HistoryBuffer.__setstate__``
would add the pickled methods to the class-wide method table, and
``register_statistics`` is a public classmethod; neither is reachable):

- ``numpy.dtype`` -> :func:`_dtype`: plain numeric dtypes only, and the state
  BUILD gives it must be numpy's own state for that dtype;
- ``_reconstruct`` / ``numpy.ndarray`` -> :func:`_reconstruct` /
  :class:`_Array`: an array is made only from a checked numeric dtype and a
  byte string of exactly ``prod(shape) * itemsize`` bytes, and copied;
- ``scalar`` -> :func:`_scalar`: a checked dtype and exactly ``itemsize``
  bytes;
- ``HistoryBuffer`` -> :class:`_HistoryBuffer`: cannot be called; its BUILD
  takes only ``max_length`` and two equal-length 1-D numeric histories, checks
  that the pickled statistics methods are the ones already registered (they
  are dropped: the class-wide table is never written), then becomes a real
  ``HistoryBuffer``;
- ``getattr`` -> :func:`_statistic_method`: only ``getattr(HistoryBuffer,
  NAME)`` for a statistics method already registered under NAME.

After the load, :func:`_finish` swaps the remaining stand-ins for the real
objects and refuses a stand-in that was never completed (e.g. a
HistoryBuffer created without its state).

The allowlist is scoped: it is in force only inside mmengine's
``CheckpointLoader.load_checkpoint`` (every resume, ``load_from``,
``init_cfg`` Pretrained and test-time load goes through it) and
:func:`load_checkpoint_file`; a user's own ``torch.load`` keeps torch's
defaults. Every file is read with an explicit ``weights_only=True``, which
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn off: local ones, and
``http(s)://`` / ``torchvision://`` / ``open-mmlab://`` ones, which are
downloaded once into torch's hub cache first (``torchvision://`` names are
resolved from the URL table mmengine ships, without importing torchvision).
Every failure raises :class:`CheckpointError` naming the file and saying
whether it is missing, damaged (empty, truncated, not a checkpoint), refused
(unsafe content) or could not be downloaded.
"""
import contextlib
import functools
import json
import math
import os
import os.path as osp
import pickle
import threading
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'load_checkpoint_file',
    'torchvision_model_urls', 'mmengine_checkpoint_globals',
    'patch_mmengine_loading', 'warn_if_nothing_to_resume'
]

_PATCH_FLAG = '_mmctx_checkpoint_patched'
# Never produced by unpickling: only this module can create stand-ins.
_TOKEN = object()
# numpy's codes for plain numeric dtypes (bool, ints, uints, floats, complex).
_NUMERIC_CODES = frozenset(
    ['b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8',
     'c8', 'c16'])
_MAX_NDIM = 32


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def _refuse(why):
    raise pickle.UnpicklingError(f'mmctx weights-only load: {why}')


# --------------------------------------------------------------------------
# numpy dtypes, arrays, scalars
# --------------------------------------------------------------------------
class _DType:
    """A numpy dtype being unpickled: ``dtype(code, False, True)`` then BUILD
    with numpy's state. Usable only once that state checked out."""
    __slots__ = ('code', 'dtype')

    def __new__(cls, token=None, code=None):
        if token is not _TOKEN:
            _refuse('numpy dtypes are made only by numpy.dtype(...)')
        self = object.__new__(cls)
        self.code, self.dtype = code, None
        return self

    def __setstate__(self, state):
        if self.dtype is not None:
            _refuse('a numpy dtype was given its state twice')
        if not (type(state) is tuple and len(state) == 8):
            _refuse(f'malformed numpy dtype state {state!r}')
        byteorder = state[1]
        single = self.code in ('b1', 'i1', 'u1')
        if byteorder not in (('|', ) if single else ('<', '>')):
            _refuse(f'byte order {byteorder!r} for dtype {self.code!r}')
        dtype = np.dtype(self.code if single else byteorder + self.code)
        # numpy's own state for this dtype, nothing else: forged flags,
        # sizes, fields or subarrays (object/void memory) are refused
        if state != dtype.__reduce__()[2]:
            _refuse(f'forged state {state!r} for numpy dtype {self.code!r}')
        self.dtype = dtype

    def checked(self):
        if self.dtype is None:
            _refuse(f'numpy dtype {self.code!r} without its state')
        return self.dtype


def _dtype(code, align=False, copy=True):
    """Stand-in for ``numpy.dtype`` in a pickle: plain numeric codes only."""
    if not (type(code) is str and code in _NUMERIC_CODES and align is False
            and copy is True):
        _refuse(f'numpy dtype {code!r} (only plain numeric dtypes: '
                f'{", ".join(sorted(_NUMERIC_CODES))})')
    return _DType(_TOKEN, code)


def _checked_dtype(dtype):
    if type(dtype) is not _DType:
        _refuse(f'expected a numpy dtype, got {type(dtype).__name__}')
    return dtype.checked()


class _Array:
    """A numpy array being unpickled: ``_reconstruct(ndarray, (0,), b'b')``
    then BUILD with ``(1, shape, dtype, is_fortran, rawdata)``."""
    __slots__ = ('array', )

    def __new__(cls, token=None):
        if token is not _TOKEN:
            _refuse('numpy arrays are made only by _reconstruct(...)')
        self = object.__new__(cls)
        self.array = None
        return self

    def __setstate__(self, state):
        if self.array is not None:
            _refuse('a numpy array was given its state twice')
        if not (type(state) is tuple and len(state) == 5 and state[0] == 1):
            _refuse('malformed numpy array state')
        _, shape, dtype, fortran, raw = state
        dtype = _checked_dtype(dtype)
        if not (type(shape) is tuple and len(shape) <= _MAX_NDIM and all(
                type(d) is int and d >= 0 for d in shape)):
            _refuse(f'numpy array shape {shape!r}')
        if type(fortran) is not bool or type(raw) is not bytes:
            _refuse('numpy array data must be bytes')
        if math.prod(shape) * dtype.itemsize != len(raw):
            _refuse(f'numpy array of shape {shape} and dtype {dtype} needs '
                    f'{math.prod(shape) * dtype.itemsize} bytes, got '
                    f'{len(raw)}')
        self.array = np.frombuffer(raw, dtype=dtype).reshape(
            shape, order='F' if fortran else 'C').copy()

    def checked(self):
        if self.array is None:
            _refuse('numpy array without its state')
        return self.array


def _reconstruct(cls, shape, typecode):
    """Stand-in for numpy's ``_reconstruct``: only the call ndarray pickles
    make; the array itself comes from the checked BUILD state."""
    if not (cls is _Array and shape == (0, ) and typecode == b'b'):
        _refuse(f'_reconstruct({cls!r}, {shape!r}, {typecode!r})')
    return _Array(_TOKEN)


def _scalar(dtype, data):
    """Stand-in for numpy's ``scalar``: a checked dtype and its exact bytes."""
    dtype = _checked_dtype(dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        _refuse(f'numpy scalar of dtype {dtype} needs {dtype.itemsize} '
                'bytes')
    return np.frombuffer(data, dtype=dtype)[0]


# --------------------------------------------------------------------------
# mmengine HistoryBuffer
# --------------------------------------------------------------------------
def _history_buffer_cls():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


_DEFAULT_STATISTICS = ('min', 'max', 'current', 'mean')


def _known_statistics():
    """Statistics methods by name: mmengine's four defaults (which it puts
    into the class-wide table when the first HistoryBuffer is made) and
    whatever the process registered itself. Read, never written."""
    real = _history_buffer_cls()
    known = {name: getattr(real, name) for name in _DEFAULT_STATISTICS}
    known.update(real._statistics_methods)
    return known


class _HistoryBuffer:
    """A HistoryBuffer being unpickled (``HistoryBuffer.__new__`` then BUILD).

    Unlike ``HistoryBuffer.__setstate__`` this never writes the class-wide
    statistics table; once its state checked out, the object becomes a real
    ``HistoryBuffer``.
    """

    def __init__(self, *args, **kwargs):
        _refuse('a HistoryBuffer cannot be called in a checkpoint')

    def __setstate__(self, state):
        real = _history_buffer_cls()
        keys = {'max_length', '_log_history', '_count_history'}
        if not (type(state) is dict
                and keys <= state.keys() <= keys | {'statistics_methods'}):
            _refuse('HistoryBuffer state must have the keys '
                    f'{sorted(keys)} (and statistics_methods), got '
                    f'{sorted(map(str, state)) if type(state) is dict else state!r}')
        max_length = state['max_length']
        if type(max_length) is not int or max_length < 1:
            _refuse(f'HistoryBuffer.max_length {max_length!r}')
        histories = []
        for key in ('_log_history', '_count_history'):
            value = state[key]
            if type(value) is not _Array:
                _refuse(f'HistoryBuffer.{key} must be a numpy array')
            value = value.checked()
            if value.ndim != 1 or value.dtype.kind not in 'biuf':
                _refuse(f'HistoryBuffer.{key} must be a 1-D real array')
            histories.append(value)
        if len(histories[0]) != len(histories[1]) \
                or len(histories[0]) > max_length:
            _refuse('HistoryBuffer histories of unequal lengths or longer '
                    'than max_length')
        methods = state.get('statistics_methods', {})
        if type(methods) is not dict:
            _refuse('HistoryBuffer.statistics_methods must be a dict')
        registered = _known_statistics()
        for name, method in methods.items():
            if type(name) is not str or registered.get(name) is not method:
                _refuse(f'HistoryBuffer statistics method {name!r} is not '
                        'the one registered under that name')
        self.__dict__.update(max_length=max_length,
                             _log_history=histories[0],
                             _count_history=histories[1])
        self.__class__ = real


def _statistic_method(obj, name):
    """Stand-in for ``builtins.getattr``: HistoryBuffer pickles its
    statistics methods as ``getattr(HistoryBuffer, 'mean')``; only methods
    already registered under that name are handed out."""
    known = _known_statistics()
    method = known.get(name) if type(name) is str else None
    if obj is not _HistoryBuffer or method is None \
            or getattr(_history_buffer_cls(), name, None) is not method:
        _refuse(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, '
                f'{name!r}) (only registered HistoryBuffer statistics: '
                f'{sorted(known)})')
    return method


def mmengine_checkpoint_globals() -> list:
    """The allowlist, as ``(stand-in, pickled name)`` pairs for
    ``torch.serialization.safe_globals``. Both numpy spellings are listed so
    checkpoints written under numpy 1.x and 2.x load."""
    pairs = [
        (_HistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_statistic_method, 'builtins.getattr'),
        (_Array, 'numpy.ndarray'),
        (_dtype, 'numpy.dtype'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        pairs.append((_reconstruct, f'{module}._reconstruct'))
        pairs.append((_scalar, f'{module}.scalar'))
    # BUILD needs the type of every object it completes to be allowlisted;
    # these names are private (a pickle naming them gets the refusing
    # constructors above)
    pairs.append((_DType, f'{__name__}._DType'))
    return pairs


_SCOPE_LOCK = threading.RLock()
_scope_depth = 0


@contextlib.contextmanager
def _allowlisted():
    """The allowlist in force for the loads inside (thread-safe, nestable):
    torch keeps it in a process-wide set, so loads are serialised."""
    global _scope_depth
    with _SCOPE_LOCK:
        if _scope_depth == 0:
            torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
        _scope_depth += 1
        try:
            yield
        finally:
            _scope_depth -= 1
            if _scope_depth == 0:
                from torch import _weights_only_unpickler as wo
                wo._remove_safe_globals(mmengine_checkpoint_globals())


def _finish(obj):
    """Replace completed stand-ins by the real objects, in place where the
    container allows (an OrderedDict state dict keeps its ``_metadata``);
    refuse stand-ins that never got their state."""
    memo = {}
    history_buffer = _history_buffer_cls()

    def visit(item):
        key = id(item)
        if key in memo:
            return memo[key]
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, history_buffer):
            # what mmengine's own unpickling and every new HistoryBuffer do
            # (the four default statistics), now that the load succeeded
            item._set_default_statistics()
            return item
        if type(item) is _Array:
            result = item.checked()
        elif type(item) is _DType:
            result = item.checked()
        elif type(item) is _HistoryBuffer:
            _refuse('HistoryBuffer without its state')
        elif isinstance(item, dict):
            memo[key] = item
            for k in list(item):
                if type(k) in (_Array, _DType, _HistoryBuffer):
                    _refuse('numpy or HistoryBuffer object as a dict key')
                item[k] = visit(item[k])
            return item
        elif type(item) is list:
            memo[key] = item
            item[:] = [visit(x) for x in item]
            return item
        elif type(item) in (tuple, set, frozenset):
            result = type(item)(visit(x) for x in item)
        else:
            return item
        memo[key] = result
        return result

    return visit(obj)


def _reason(err):
    """The core of torch's weights-only error, without its advice to load
    with ``weights_only=False`` (never do that with an untrusted file)."""
    text = str(err)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
        text = text.split('Check the documentation', 1)[0]
    return ' '.join(text.split())


def _damaged(filename, why):
    return CheckpointError(
        f'checkpoint {filename!r} is damaged ({why}); it cannot be loaded. '
        'Write it again, or point the config at an intact file.')


@contextlib.contextmanager
def _naming_file(filename):
    """Turn every load failure into a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(
            f'checkpoint {filename!r} not found: {err}') from err
    except (EOFError, zipfile.BadZipFile) as err:
        raise _damaged(filename, f'truncated: {err}') from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f'checkpoint {filename!r} refused: it holds objects that are not '
            f'weights, or is damaged ({_reason(err)})') from err
    except RuntimeError as err:
        text = str(err)
        if 'PytorchStreamReader' in text or 'zip archive' in text \
                or 'Invalid magic number' in text:
            raise _damaged(filename, f'truncated or not a checkpoint: '
                           f'{text.splitlines()[0]}') from err
        raise CheckpointError(
            f'checkpoint {filename!r} could not be loaded: {err}') from err
    except OSError as err:  # e.g. reading past the end of a cut archive
        raise _damaged(filename, f'unreadable: {err}') from err
    except (ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, MemoryError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f'checkpoint {filename!r} refused: malformed content '
            f'({type(err).__name__}: {err})') from err


def _check_local_file(filename):
    if not osp.isfile(filename):
        raise CheckpointNotFoundError(
            f'checkpoint {filename!r} not found (no such file)')
    if os.path.getsize(filename) == 0:
        raise _damaged(filename, 'empty file: 0 bytes')
    with open(filename, 'rb') as f:
        magic = f.read(2)
    # torch writes a zip archive (legacy format: a pickle, protocol >= 2)
    if magic != b'PK' and magic[:1] != b'\x80':
        raise _damaged(filename, 'not a torch checkpoint: neither a zip '
                       'archive nor a pickle')


def load_checkpoint_file(filename, map_location='cpu'):
    """``torch.load`` a local checkpoint file with ``weights_only=True``
    under the scoped allowlist; any failure is a :class:`CheckpointError`
    naming the file."""
    filename = osp.expanduser(str(filename))
    _check_local_file(filename)
    with _naming_file(filename), _allowlisted():
        checkpoint = torch.load(filename, map_location=map_location,
                                weights_only=True)
        return _finish(checkpoint)


def _load_from_local(filename, map_location):
    """mmengine's local scheme, with an explicit ``weights_only=True``."""
    return load_checkpoint_file(filename, map_location)


def torchvision_model_urls():
    """``torchvision://NAME`` -> published URL, from the table mmengine ships
    (mmengine's own resolver imports torchvision, which may not exist)."""
    import mmengine
    table = osp.join(osp.dirname(mmengine.__file__), 'hub',
                     'torchvision_0.12.json')
    with open(table) as f:
        return json.load(f)


def _download_once(url, model_dir=None, progress=False):
    """The cached copy of ``url`` in torch's hub cache (``$TORCH_HOME/hub/
    checkpoints``), downloaded on local rank 0 first if it is not there."""
    from mmengine.dist import get_dist_info
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    cached = osp.join(model_dir, osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    if rank == 0 and not osp.isfile(cached):
        os.makedirs(model_dir, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cached, progress=progress)
        except (OSError, ValueError) as err:  # URLError is an OSError
            raise CheckpointError(
                f'could not download checkpoint {url!r}: {err}. Without '
                'network access, fetch the file elsewhere and give the '
                "local path: init_cfg=dict(type='Pretrained', checkpoint="
                f"'/path/to/{osp.basename(cached)}') (e.g. --cfg-options "
                'model.backbone.init_cfg.checkpoint=PATH), or put it at '
                f'{cached!r}') from err
    if world_size > 1:
        torch.distributed.barrier()
    return cached


def _load_from_http(filename, map_location=None, model_dir=None,
                    progress=False):
    """mmengine's http(s) scheme: download once into torch's hub cache, then
    the weights-only load of the cached file."""
    return load_checkpoint_file(
        _download_once(filename, model_dir, progress), map_location)


def _load_from_torchvision(filename, map_location=None):
    """``torchvision://NAME`` without importing torchvision."""
    name = filename[len('torchvision://'):]
    urls = torchvision_model_urls()
    if name not in urls:
        raise CheckpointError(
            f'checkpoint {filename!r}: unknown torchvision model {name!r} '
            f'(known: {", ".join(sorted(urls))})')
    return _load_from_http(urls[name], map_location)


def warn_if_nothing_to_resume(runner):
    """``--resume`` without a checkpoint path resumes from the work dir's
    ``last_checkpoint``; with none there, mmengine silently trains from
    scratch. Say so loudly (a warning: the first launch of a requeued job
    legitimately has nothing to resume)."""
    from mmengine.runner.checkpoint import find_latest_checkpoint
    if runner._resume and runner._load_from is None \
            and find_latest_checkpoint(runner.work_dir) is None:
        message = (
            f'--resume: nothing to resume in {runner.work_dir!r} (no '
            'last_checkpoint there); training starts FROM SCRATCH. Give '
            'a checkpoint path (--resume PATH) to resume from a file.')
        runner.logger.warning(message)
        print(f'WARNING: {message}', flush=True)


def patch_mmengine_loading() -> bool:
    """Route every mmengine checkpoint load through the scoped allowlist and
    the file-naming errors; warn on an empty ``--resume``. Idempotent."""
    import mmengine.runner.checkpoint as mmengine_checkpoint
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import CheckpointLoader

    load = CheckpointLoader.__dict__['load_checkpoint']
    if getattr(load.__func__, _PATCH_FLAG, False):
        return True
    original = load.__func__

    @functools.wraps(original)
    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        with _naming_file(filename), _allowlisted():
            return _finish(original(cls, filename, map_location, logger))

    setattr(load_checkpoint, _PATCH_FLAG, True)
    CheckpointLoader.load_checkpoint = classmethod(load_checkpoint)
    CheckpointLoader.register_scheme(prefixes='', force=True)(
        _load_from_local)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), force=True)(_load_from_http)
    CheckpointLoader.register_scheme(
        prefixes='torchvision://', force=True)(_load_from_torchvision)
    # open-mmlab:// and mmcls:// resolve their names, then call this
    mmengine_checkpoint.load_from_http = _load_from_http

    load_or_resume = Runner.load_or_resume

    @functools.wraps(load_or_resume)
    def load_or_resume_loudly(self):
        if not self._has_loaded:
            warn_if_nothing_to_resume(self)
        return load_or_resume(self)

    Runner.load_or_resume = load_or_resume_loudly
    return True
