"""Load checkpoint files through every entry point, each in a forked child.

    python tests/checkpoint_load_driver.py OUT.json FILE [FILE ...]

The parent imports the stack once; for every FILE a child process (fork)
loads it through mmengine's ``_load_checkpoint`` (what ``Runner.resume`` and
``Runner.load_checkpoint`` -- ``--resume``, ``load_from``, ``tools/test.py``
-- call), ``load_checkpoint`` into a model, ``PretrainedInit`` (``init_cfg``),
the mmctx backbones' stock-checkpoint reader and a plain ``torch.load``, and
records each outcome and a snapshot of process state before and after. A
child killed by a signal (a crash in the unpickler) is recorded as such.
"""
import json
import os
import sys

import mmdet.registry
import mmseg.registry
import torch
import torch.nn as nn

import mmctx  # noqa: F401
from mmctx.models.backbones.context_resnet import read_backbone_state
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model.weight_init import PretrainedInit
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import _load_checkpoint, load_checkpoint


def snapshot():
    return dict(
        methods={k: f'{v.__module__}.{v.__qualname__}'
                 for k, v in HistoryBuffer._statistics_methods.items()},
        class_attrs=sorted(vars(HistoryBuffer)),
        registries=[sorted(r.module_dict) for r in
                    (MODELS, mmdet.registry.MODELS, mmseg.registry.MODELS)],
        safe_globals=sorted(str(g) for g in
                            torch.serialization.get_safe_globals()))


def load_everywhere(path, marker):
    before = snapshot()
    results, loaded = {}, {}

    def attempt(name, load):
        try:
            obj = load()
        except Exception as err:  # noqa: BLE001  (recorded, not hidden)
            results[name] = [type(err).__name__, str(err)]
        else:
            results[name] = ['loaded', '']
            loaded[name] = obj

    attempt('resume', lambda: _load_checkpoint(path, map_location='cpu'))
    attempt('load_from', lambda: load_checkpoint(
        nn.Conv2d(1, 1, 1), path, map_location='cpu'))
    attempt('init_cfg', lambda: PretrainedInit(checkpoint=path)(
        nn.Conv2d(1, 1, 1)))
    attempt('mmctx_backbone', lambda: read_backbone_state(path))
    attempt('plain_torch_load', lambda: torch.load(path))
    extra = {}
    if 'resume' in loaded:
        buf = loaded['resume']['message_hub']['log_scalars']['train/loss']
        extra = dict(type=type(buf).__name__, mean=float(buf.mean()),
                     max=float(buf.max()), state=sorted(vars(buf)),
                     log_type=type(buf._log_history).__name__,
                     dtype=str(buf._log_history.dtype))
    return dict(results=results, before=before, after=snapshot(),
                extra=extra, marker=os.path.exists(marker))


def main(out_file, paths):
    records = {}
    for i, path in enumerate(paths):
        marker = f'{path}.pwned'
        child_out = f'{out_file}.{i}'
        pid = os.fork()
        if pid == 0:  # child: never returns into the parent's code
            code = 1
            try:
                with open(child_out, 'w') as f:
                    json.dump(load_everywhere(path, marker), f)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            records[path] = dict(crashed=f'signal {os.WTERMSIG(status)}')
        elif os.WEXITSTATUS(status) != 0:
            records[path] = dict(crashed=f'exit {os.WEXITSTATUS(status)}')
        else:
            with open(child_out) as f:
                records[path] = json.load(f)
    with open(out_file, 'w') as f:
        json.dump(records, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:])
