"""Export the backbone of an mmdet / mmseg / mmpretrain config to ONNX with
dynamic batch, height and width, and check onnxruntime against PyTorch.

    python tools/deployment/export_onnx.py CONFIG [CHECKPOINT] --out FILE \\
        [--shape H W] [--verify-shape H W ...] [--opset N]

The backbone is built without its ImageNet ``init_cfg`` (the file need not
exist); CHECKPOINT (a trained model's or a backbone's) is loaded with
mmengine's ``load_checkpoint``. The graph is traced at ``--shape`` (default:
the backbone's ``reference_input_size``, else 224) and compared with the
eager model in onnxruntime at ``--shape`` and every ``--verify-shape``;
exit status 1 if a difference exceeds ``--atol + --rtol * max|output|``.
See :mod:`mmctx.deployment`.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from mmctx.deployment import (build_backbone, export_onnx,  # noqa: E402
                              input_channels, reference_shape, verify_onnx)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?', default=None)
    parser.add_argument('--out', required=True, help='ONNX file to write')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size to trace and verify at')
    parser.add_argument('--verify-shape', type=int, nargs=2, action='append',
                        default=[], metavar=('H', 'W'),
                        help='further sizes to verify (repeatable)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset')
    parser.add_argument('--atol', type=float, default=1e-4)
    parser.add_argument('--rtol', type=float, default=1e-5)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape = tuple(args.shape) if args.shape else reference_shape(args.config)
    backbone = build_backbone(args.config, args.checkpoint)
    names = export_onnx(backbone, args.out, shape=shape, batch=args.batch,
                        opset=args.opset)
    channels = input_channels(backbone)
    print(f'exported {type(backbone).__name__} to {args.out} '
          f'(torch.export; input '
          f'"input" [batch, {channels}, height, width] dynamic; '
          f'outputs {", ".join(names)})')
    shapes = [shape] + [tuple(s) for s in args.verify_shape]
    diffs = verify_onnx(backbone, args.out, shapes, batch=args.batch)
    failed = False
    for size, (diff, scale) in diffs.items():
        tol = args.atol + args.rtol * scale
        ok = diff <= tol
        failed |= not ok
        print(f'onnxruntime vs PyTorch at {size[0]}x{size[1]}: max abs diff '
              f'{diff:.3g} (max |output| {scale:.3g}; '
              f'{"ok" if ok else "FAILED"}, tolerance {tol:.3g})')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
