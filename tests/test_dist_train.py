"""tools/dist_train.sh CONFIG 2 on a CPU machine: two gloo processes, each
sees half the data; one checkpoint and one log (rank 0 only). The config
uses SyncBN, which mmctx reverts to BN under CPU DDP."""
import json

import pytest
import torch

ITERS = 2


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='exercises the CPU (gloo) path')
def test_dist_train_two_cpu_processes(run, repo_root, tiny_det_config,
                                      tmp_path, free_port):
    work_dir = tmp_path / 'work'
    cfg = tiny_det_config(
        max_iters=ITERS, norm_cfg=dict(type='SyncBN', requires_grad=True))
    log = run([repo_root / 'tools' / 'dist_train.sh', cfg, 2,
               '--work-dir', work_dir, '--no-validate'],
              env=dict(PORT=str(free_port), OMP_NUM_THREADS='1'))
    assert 'Distributed training: True' in log
    assert 'distributed training uses the gloo backend' in log

    probes = [json.loads((work_dir / f'probe_rank{r}.json').read_text())
              for r in (0, 1)]
    assert [p['rank'] for p in probes] == [0, 1]
    assert all(p['world_size'] == 2 for p in probes)
    assert all(p['backend'] == 'gloo' for p in probes)
    assert all(p['model_wrapper'] == 'MMDistributedDataParallel'
               for p in probes)
    # SyncBN reverted to BN on CPU
    assert all('SyncBatchNorm' not in p['norm_types'] for p in probes)
    n = probes[0]['dataset_len']
    assert n == 8
    for p in probes:
        assert p['sampler_len'] == n // 2
    idx0, idx1 = (set(p['sampler_indices']) for p in probes)
    assert not idx0 & idx1 and idx0 | idx1 == set(range(n))

    ckpts = sorted(p.name for p in work_dir.glob('*.pth')
                   if not p.name.startswith('probe'))
    assert ckpts == [f'iter_{ITERS}.pth']
    log_dirs = [d for d in work_dir.iterdir() if d.is_dir()]
    assert len(log_dirs) == 1
    logs = list(log_dirs[0].glob('*.log'))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert f'Iter(train) [{ITERS}/{ITERS}]' in text
    assert text.count('Iter(train) [1/') == 1  # one rank writes the log


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='exercises the CPU (gloo) path')
def test_gloo_process_group_is_destroyed_at_exit(run, tmp_path, free_port):
    """mmengine never destroys the process group, and a gloo worker that
    frees a finished work's tensors while Python finalises aborts the rank
    (SIGABRT) after its training is done. mmctx's launcher registers an exit
    handler that waits for the workers and destroys the group; it runs
    before any exit handler registered earlier (this script's check)."""
    import sys
    script = tmp_path / 'init_and_exit.py'
    script.write_text('\n'.join([
        'import atexit',
        'import torch, torch.distributed as dist',
        'atexit.register(lambda: print("initialized at exit:",',
        '                              dist.is_initialized()))',
        'import mmctx',
        'from mmengine.dist import init_dist',
        'init_dist("pytorch")',
        't = torch.ones(3)',
        'dist.all_reduce(t)',
        'print("backend:", dist.get_backend(), "sum:", t.tolist())',
    ]))
    log = run([sys.executable, script],
              env=dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1',
                       MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port)))
    assert 'backend: gloo sum: [1.0, 1.0, 1.0]' in log
    assert 'initialized at exit: False' in log, log
