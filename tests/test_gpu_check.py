"""``tools/gpu/check.sh --cpu``: the GPU check's own steps, run on the CPU so
that the command is known to work before a GPU machine is lent: installing
carried wheels without a registry, ``pytest -m gpu`` (MMCTX_TEST_DEVICE=cpu),
Faster R-CNN SB-R50 through ``tools/dist_train.sh CONFIG 1`` then
``tools/test.py``, and the throughput table."""
import os
import subprocess
import sys


def test_gpu_check_runs_in_cpu_mode(repo_root, shared_data, tmp_path):
    bundle, out = tmp_path / 'bundle', tmp_path / 'out'
    # the carried folder as tools/gpu/prepare.sh writes it, with only the
    # mmctx wheel: the rest of the stack is this machine's
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', '-w', str(bundle / 'wheels'),
                    str(repo_root)], check=True, cwd=tmp_path)
    env = dict(os.environ, BUNDLE=str(bundle), OUT=str(out),
               PYTHON=sys.executable, PORT='29517')
    proc = subprocess.run(['bash', 'tools/gpu/check.sh', '--cpu'],
                          cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=1500)
    summary = (out / 'summary.md').read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + \
        proc.stderr[-3000:]
    for step in ('install', 'pytest_gpu', 'faster_rcnn', 'throughput'):
        assert f'| {step} | ok |' in summary, summary
    # mmctx came from the carried wheel, not from the checkout
    install = (out / 'install.log').read_text()
    assert f'from {out}/site/mmctx/__init__.py' in install, install
    # the tests ran on the CPU rather than skipping
    tests = (out / 'pytest_gpu.log').read_text()
    assert ' passed' in tests and ' failed' not in tests, tests[-2000:]
    assert 'skipped' not in tests.splitlines()[-1] or \
        'passed' in tests.splitlines()[-1]
    # trained with the users' launcher, tested with the stock tool
    det = (out / 'faster_rcnn.log').read_text()
    assert 'coco/bbox_mAP' in det.splitlines()[-1], det[-2000:]
    table = (out / 'throughput.md').read_text()
    assert '| SB-R50 |' in table and 'compiled fp32 train' in table, table
