"""tools/train.py stops after N iterations with a checkpoint; --resume
continues at iteration N+1 with the saved optimizer state, loading the
checkpoint with torch.load's weights_only=True (mmctx's scoped allowlist)."""
import json
import subprocess
import sys

import torch

N = 2


def test_resume_continues_with_saved_state(run, repo_root, tiny_det_config,
                                           tmp_path):
    work_dir = tmp_path / 'work'
    cfg = tiny_det_config(max_iters=N)
    train = [sys.executable, repo_root / 'tools' / 'train.py', cfg,
             '--work-dir', work_dir, '--no-validate']
    run(train)
    ckpt = work_dir / f'iter_{N}.pth'
    assert ckpt.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith(
        f'iter_{N}.pth')

    # the checkpoint holds non-tensor objects (HistoryBuffer, numpy) that
    # plain torch.load(weights_only=True) refuses without mmctx ...
    code = ('import torch, sys\n'
            'try:\n'
            f'    torch.load({str(ckpt)!r})\n'
            'except Exception as e:\n'
            '    print("REFUSED", type(e).__name__)\n'
            'else:\n'
            '    print("LOADED")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, check=True).stdout
    assert 'REFUSED UnpicklingError' in out
    # ... and still does after importing mmctx (its allowlist is scoped to
    # checkpoint loads), while mmctx's weights-only loader reads it
    out = subprocess.run([sys.executable, '-c', 'import mmctx\n' + code],
                         capture_output=True, text=True, check=True).stdout
    assert 'REFUSED UnpicklingError' in out
    from mmctx.compat import load_checkpoint_file
    saved = load_checkpoint_file(ckpt)
    assert saved['meta']['iter'] == N
    assert 'HistoryBuffer' in str(type(
        next(iter(saved['message_hub']['log_scalars'].values()))))

    # resume (auto: latest checkpoint in work_dir) and train one more iter
    (work_dir / 'probe_optim.pth').unlink()
    log = run(train + ['--resume', '--cfg-options',
                       f'train_cfg.max_iters={N + 1}'])
    assert f'resumed epoch: 0, iter: {N}' in log
    assert f'Iter(train) [{N + 1}/{N + 1}]' in log
    assert f'Iter(train) [1/{N + 1}]' not in log
    probe = json.loads((work_dir / 'probe_rank0.json').read_text())
    assert probe['iter'] == N and probe['message_hub_iter'] == N
    assert (work_dir / f'iter_{N + 1}.pth').is_file()

    # the optimizer state right after resuming equals the saved one
    resumed = torch.load(str(work_dir / 'probe_optim.pth'))
    saved_state = saved['optimizer']['state']
    resumed_state = resumed['state']
    assert saved_state and saved_state.keys() == resumed_state.keys()
    n_buffers = 0
    for k, v in saved_state.items():
        assert torch.equal(v['momentum_buffer'],
                           resumed_state[k]['momentum_buffer'])
        n_buffers += 1
    assert n_buffers > 10
    assert [g['lr'] for g in saved['optimizer']['param_groups']] == \
        [g['lr'] for g in resumed['param_groups']]

    # resuming from an explicit path works too
    log = run(train + ['--resume', work_dir / f'iter_{N}.pth',
                       '--cfg-options', f'train_cfg.max_iters={N + 1}'])
    assert f'resumed epoch: 0, iter: {N}' in log
