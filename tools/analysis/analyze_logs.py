#!/usr/bin/env python
"""Plot training curves from mmengine json logs (like mmdet's
``tools/analysis_tools/analyze_logs.py plot_curve``; see
:mod:`mmctx.log_analysis`).

    python tools/analysis/analyze_logs.py plot_curve \
        work_dirs/X/<timestamp>/vis_data/scalars.json --keys loss --out loss.png
    python tools/analysis/analyze_logs.py plot_curve a.json b.json \
        --keys bbox_mAP --legend sb plain --out map.pdf
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))

from mmctx.log_analysis import plot_curve  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Analyze json logs')
    sub = parser.add_subparsers(dest='task', required=True)
    p = sub.add_parser('plot_curve', help='plot keys of json logs')
    p.add_argument('json_logs', nargs='+',
                   help='json logs (vis_data/scalars.json)')
    p.add_argument('--keys', nargs='+', default=['loss'],
                   help='keys to plot (a key also matches the last part '
                   'of a "a/b" key, e.g. bbox_mAP)')
    p.add_argument('--legend', nargs='+', default=None,
                   help='one label per log and key')
    p.add_argument('--title', help='figure title')
    p.add_argument('--backend', help='matplotlib backend')
    p.add_argument('--style', default='dark', help='seaborn style')
    p.add_argument('--out', help='output file (png, pdf, ...); '
                   'without it the figure is shown')
    return parser.parse_args()


def main():
    args = parse_args()
    for log in args.json_logs:
        if not log.endswith('.json'):
            sys.exit(f'analyze_logs: only json logs are supported: {log}')
        if not osp.isfile(log):
            sys.exit(f'analyze_logs: no such file: {log}')
    try:
        plot_curve(args.json_logs, args.keys, out=args.out,
                   legend=args.legend, title=args.title,
                   backend=args.backend, style=args.style)
    except (KeyError, ValueError) as e:
        sys.exit(f'analyze_logs: {e.args[0] if e.args else e}')


if __name__ == '__main__':
    main()
