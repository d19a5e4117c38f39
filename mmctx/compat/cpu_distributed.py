"""Distributed training on machines without CUDA (gloo).

mmengine's launchers call ``torch.cuda.set_device`` and default to NCCL, DDP
gets ``device_ids=[LOCAL_RANK]`` and ``SyncBatchNorm`` refuses CPU tensors.
Only when ``torch.cuda.is_available()`` is False, :func:`patch_cpu_distributed`
inits with gloo, skips ``set_device``, builds DDP with ``device_ids=None`` and
reverts SyncBN to BN under CPU DDP, and destroys the process group at exit
(see :func:`_destroy_process_group_at_exit`). Idempotent.
"""
import atexit
import contextlib
import functools
import logging
import time

import torch

__all__ = ['patch_cpu_distributed']

_PATCH_FLAG = '_mmctx_cpu_patched'


def _cuda_missing() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def _no_cuda_set_device():
    """mmengine's launchers unconditionally call ``torch.cuda.set_device``,
    which raises on CPU-only torch. Skip it for the duration of the init."""
    orig = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = orig


# How long the exit handler releases the GIL (and a core) before Python
# finalises: enough for gloo's worker threads to drop the works they ran.
_GLOO_DRAIN_SECONDS = 0.2


def _destroy_process_group_at_exit():
    """Let gloo's worker threads retire their last works before Python
    finalises, then destroy the process group.

    A gloo worker thread drops its reference to a finished collective only
    after the caller's ``wait()`` has returned. If that is the last reference,
    the work's tensors -- Python objects -- are freed on the worker, which
    takes the GIL; once the interpreter is finalising, taking the GIL ends the
    thread inside a C++ destructor and the process aborts ("terminate called
    without an active exception", SIGABRT) after training has finished: 3 in
    43 two-process runs of ``tools/dist_train.sh`` here, and once in CI.
    Destroying the group does not stop those threads while DDP still holds
    it, so the handler first sleeps, GIL released, for
    ``_GLOO_DRAIN_SECONDS``. mmengine never destroys the group; this does it
    (no collective call is needed with gloo) unless the script already did.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    time.sleep(_GLOO_DRAIN_SECONDS)
    dist.destroy_process_group()


def _cpu_launcher(orig):

    @functools.wraps(orig)
    def init(backend='gloo', *args, **kwargs):
        if not _cuda_missing():
            return orig(backend, *args, **kwargs)
        if backend in (None, 'nccl'):
            from mmengine.logging import print_log
            print_log(
                'mmctx: CUDA is not available: distributed training uses '
                'the gloo backend instead of nccl', logger='current',
                level=logging.INFO)
            backend = 'gloo'
        with _no_cuda_set_device():
            result = orig(backend, *args, **kwargs)
        # once per process, however often a launcher inits
        atexit.unregister(_destroy_process_group_at_exit)
        atexit.register(_destroy_process_group_at_exit)
        return result

    setattr(init, _PATCH_FLAG, True)
    return init


def _patch_ddp(cls):
    """DDP on CPU modules needs ``device_ids=None`` (mmengine passes
    ``[LOCAL_RANK]``)."""
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        if _cuda_missing():
            kwargs['device_ids'] = None
            kwargs.pop('output_device', None)
        orig(self, *args, **kwargs)

    setattr(__init__, _PATCH_FLAG, True)
    cls.__init__ = __init__


def _patch_wrap_model(runner_cls):
    """Under CPU DDP, ``SyncBatchNorm`` (used by e.g. mmseg configs) raises
    on CPU tensors: revert it to plain BN, as mmengine already does for
    non-distributed runs, and ignore ``cfg.sync_bn``."""
    orig = runner_cls.wrap_model

    @functools.wraps(orig)
    def wrap_model(self, model_wrapper_cfg, model):
        if not (_cuda_missing() and self.distributed):
            return orig(self, model_wrapper_cfg, model)
        from mmengine.model import is_model_wrapper, revert_sync_batchnorm
        if not is_model_wrapper(model):
            model = revert_sync_batchnorm(model)
        sync_bn = self.cfg.get('sync_bn', None)
        if sync_bn is not None:
            self.cfg.pop('sync_bn')
            self.logger.warning(f'cfg.sync_bn={sync_bn!r} ignored: SyncBN '
                                'needs CUDA; using BN on this CPU machine.')
        try:
            return orig(self, model_wrapper_cfg, model)
        finally:
            if sync_bn is not None:
                self.cfg['sync_bn'] = sync_bn

    setattr(wrap_model, _PATCH_FLAG, True)
    runner_cls.wrap_model = wrap_model


def patch_cpu_distributed() -> bool:
    """Patch mmengine for gloo/CPU distributed training. Only when CUDA is
    not available; idempotent. Returns whether the patches are in place."""
    if not _cuda_missing():
        return False
    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    from mmengine.runner import Runner

    for name in ('_init_dist_pytorch', '_init_dist_slurm', '_init_dist_mpi'):
        fn = getattr(dist_utils, name)
        if not getattr(fn, _PATCH_FLAG, False):
            setattr(dist_utils, name, _cpu_launcher(fn))
    if not getattr(MMDistributedDataParallel.__init__, _PATCH_FLAG, False):
        _patch_ddp(MMDistributedDataParallel)
    if not getattr(Runner.wrap_model, _PATCH_FLAG, False):
        _patch_wrap_model(Runner)
    return True
