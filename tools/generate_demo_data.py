#!/usr/bin/env python
"""Generate the synthetic demo data sets.

    python tools/generate_demo_data.py --out data/demo --seed 0

writes ``<out>/coco_shapes`` (COCO format) and ``<out>/ade_shapes``
(ADEChallengeData2016 layout).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmctx.datasets.demo_data import (generate_demo_ade20k,  # noqa: E402
                                      generate_demo_coco)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/demo', help='output folder')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-det', type=int, default=80,
                        help='detection images (train + val)')
    parser.add_argument('--num-seg', type=int, default=40,
                        help='segmentation images (train + val)')
    args = parser.parse_args()
    det = generate_demo_coco(osp.join(args.out, 'coco_shapes'),
                             num_images=args.num_det, seed=args.seed)
    seg = generate_demo_ade20k(osp.join(args.out, 'ade_shapes'),
                               num_images=args.num_seg, seed=args.seed)
    print(f'COCO-format shapes: {det}')
    print(f'ADE20K-layout shapes in {osp.join(args.out, "ade_shapes")}: {seg}')


if __name__ == '__main__':
    main()
