"""Whole-model iteration time of shipped configs, plain vs context backbones,
from the Runner's own logged ``time`` (seconds per training iteration, data
included), on ``../shared/data`` at the configs' own image sizes.

Every run is ``tools/train.py CONFIG`` for ``--iters`` iterations from
scratch (``init_cfg=None``: no ImageNet file here), batch ``--batch``; the
first ``--skip`` iterations of a run are warm-up and are dropped. The
configs are interleaved, the order rotating each round, and each context
config's ratio is the median over rounds of its run's median time over the
plain config's median in the same round.

    python tools/analysis/iteration_time.py --task det --rounds 3
    python tools/analysis/iteration_time.py --task seg --rounds 3
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = (REPO / '..' / 'shared' / 'data').resolve()
TASKS = {
    'det': ['faster_rcnn_r50', 'faster_rcnn_sb_r50', 'faster_rcnn_ge_r50',
            'faster_rcnn_psi_r50'],
    'seg': ['fpn_r50_ade20k', 'fpn_sb_r50_ade20k', 'fpn_ge_r50_ade20k',
            'fpn_psi_r50_ade20k'],
}


def _common(batch, root):
    return {
        'model.backbone.init_cfg': 'None',
        'train_dataloader.batch_size': batch,
        'train_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': 'False',
        'train_dataloader.dataset.data_root': root,
    }


def det_options(iters, batch):
    return {
        **_common(batch, f'{DATA}/tiny_coco/'),
        'train_dataloader.dataset.ann_file':
        'annotations/instances_train2017.json',
        'train_dataloader.dataset.data_prefix.img': 'train2017/',
        # one epoch of iters * batch images (tiny_coco holds 16)
        'train_dataloader.dataset.indices': iters * batch,
        'train_cfg.max_epochs': 1,
        'train_cfg.val_interval': 10**6,
    }


def seg_options(iters, batch):
    return {
        **_common(batch, f'{DATA}/ade20k_sample'),
        'train_dataloader.dataset.data_prefix.img_path': 'images/validation',
        'train_dataloader.dataset.data_prefix.seg_map_path':
        'annotations/validation',
        'train_cfg.max_iters': iters,
        'train_cfg.val_interval': 10**6,
    }


def run_once(config, options, work_dir):
    """Logged per-iteration ``time`` values of one training run."""
    cmd = [sys.executable, str(REPO / 'tools' / 'train.py'),
           str(REPO / 'configs' / f'{config}.py'), '--work-dir', work_dir,
           '--cfg-options', 'default_hooks.logger.interval=1',
           'default_hooks.checkpoint.interval=1000000',
           'val_cfg=None', 'val_dataloader=None',
           'val_evaluator=None', 'test_cfg=None', 'test_dataloader=None',
           'test_evaluator=None',
           *(f'{k}={v}' for k, v in options.items())]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'{config} failed:\n{proc.stdout[-3000:]}\n'
                           f'{proc.stderr[-3000:]}')
    times = []
    for path in sorted(Path(work_dir).rglob('scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'time' in record and 'loss' in record:
                times.append(record['time'])
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--task', choices=list(TASKS), default='det')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--iters', type=int, default=6)
    p.add_argument('--skip', type=int, default=2,
                   help='warm-up iterations dropped from each run')
    p.add_argument('--batch', type=int, default=2,
                   help='images per iteration (det: iters * batch <= 16)')
    p.add_argument('--configs', nargs='+', help='default: the task\'s plain '
                   'config first, then SB, GE, PSI')
    p.add_argument('--out', help='also write the Markdown table here')
    args = p.parse_args()
    if args.iters <= args.skip:
        p.error('--iters must exceed --skip')
    configs = args.configs or TASKS[args.task]
    options = (det_options if args.task == 'det' else seg_options)(
        args.iters, args.batch)
    medians = {c: [] for c in configs}
    ratios = {c: [] for c in configs[1:]}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd %
                                                           len(configs)]
            this_round = {}
            for i, config in enumerate(order):
                work_dir = osp.join(tmp, f'{config}_{rnd}')
                times = run_once(config, options, work_dir)[args.skip:]
                this_round[config] = statistics.median(times)
                medians[config].append(this_round[config])
                done = rnd * len(configs) + i + 1
                eta = (time.time() - start) / done * (
                    args.rounds * len(configs) - done)
                print(f'[round {rnd + 1}/{args.rounds}] {config}: '
                      f'{this_round[config]:.3f} s/iter (median of '
                      f'{len(times)}), eta {eta / 60:.1f} min', flush=True)
            for config in configs[1:]:
                ratios[config].append(this_round[config] /
                                      this_round[configs[0]])
    cmd = ' '.join(['python'] + sys.argv)
    lines = [f'Command: `{cmd}` ({args.rounds} rounds, {args.iters} '
             f'iterations per run, first {args.skip} dropped, batch '
             f'{args.batch}, {os.cpu_count()} cores)', '',
             '| config | s/iter (median) | ratio to plain | per-round '
             'ratios |', '|---|---:|---:|---|']
    for config in configs:
        median = statistics.median(medians[config])
        if config == configs[0]:
            lines.append(f'| {config} | {median:.3f} | 1.000 | — |')
        else:
            r = ratios[config]
            lines.append(f'| {config} | {median:.3f} | '
                         f'{statistics.median(r):.3f} | '
                         f'{", ".join(f"{v:.3f}" for v in r)} |')
    report = '\n'.join(lines)
    print(report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report + '\n')


if __name__ == '__main__':
    main()
