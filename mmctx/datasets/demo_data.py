"""Deterministic synthetic "shapes" data sets (numpy + OpenCV only).

* :func:`generate_demo_coco` writes a COCO-format detection / instance
  segmentation data set (boxes, polygon masks, area, iscrowd) with images of
  varied size, in the layout::

      out_dir/annotations/instances_train.json
      out_dir/annotations/instances_val.json
      out_dir/train/*.jpg
      out_dir/val/*.jpg

* :func:`generate_demo_ade20k` writes a semantic segmentation data set in the
  ADEChallengeData2016 layout (``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``) whose label maps use 0 for
  "other" and 1..N for the shape classes, i.e. load it with
  ``reduce_zero_label=True`` like ADE20K.

Everything is a pure function of ``seed`` (same seed -> identical bytes).
"""
import json
import os
import os.path as osp
from typing import List, Optional, Tuple

import cv2
import numpy as np

DEMO_DET_CLASSES = ('rectangle', 'ellipse', 'triangle', 'star')
DEMO_SEG_CLASSES = DEMO_DET_CLASSES

# well separated colours per class (BGR), jittered per instance
_CLASS_COLORS = np.array([(40, 40, 220), (220, 60, 40), (40, 200, 40),
                          (20, 200, 230)], dtype=np.float64)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random gradient plus mild noise (uint8 BGR)."""
    c0 = rng.uniform(60, 200, size=3)
    c1 = rng.uniform(60, 200, size=3)
    if rng.random() < 0.5:
        t = np.linspace(0, 1, w)[None, :, None].repeat(h, axis=0)
    else:
        t = np.linspace(0, 1, h)[:, None, None].repeat(w, axis=1)
    img = c0 * (1 - t) + c1 * t
    img = img + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, cls: int, cx: float, cy: float,
                   r: float) -> np.ndarray:
    """Polygon (N, 2) float64 of a shape of class ``cls`` inside the circle
    of radius ``r`` around (cx, cy)."""
    theta = rng.uniform(0, np.pi)
    if cls == 0:  # rectangle (rotated), aspect ratio 0.4..1
        a = r / np.sqrt(1 + rng.uniform(0.16, 1.0))
        b = a * rng.uniform(0.4, 1.0)
        pts = np.array([(-a, -b), (a, -b), (a, b), (-a, b)])
    elif cls == 1:  # ellipse
        a = r
        b = r * rng.uniform(0.45, 1.0)
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
    elif cls == 2:  # triangle with jittered vertices
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        t = t + rng.uniform(-0.3, 0.3, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    else:  # five-pointed star
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    rot = np.array([[np.cos(theta), -np.sin(theta)],
                    [np.sin(theta), np.cos(theta)]])
    return pts @ rot.T + np.array([cx, cy])


def _place_shapes(rng: np.random.Generator, h: int, w: int, max_shapes: int,
                  num_classes: int) -> List[Tuple[int, np.ndarray]]:
    """Non-overlapping shapes fully inside the image: [(cls, polygon)]."""
    n = int(rng.integers(1, max_shapes + 1))
    circles: List[Tuple[float, float, float]] = []
    shapes = []
    for _ in range(n * 20):  # rejection sampling
        if len(shapes) == n:
            break
        r = rng.uniform(0.08, 0.22) * min(h, w)
        cx = rng.uniform(r + 2, w - r - 2)
        cy = rng.uniform(r + 2, h - r - 2)
        if any((cx - x)**2 + (cy - y)**2 < (r + rr + 4)**2
               for x, y, rr in circles):
            continue
        cls = int(rng.integers(0, num_classes))
        circles.append((cx, cy, r))
        shapes.append((cls, _shape_polygon(rng, cls, cx, cy, r)))
    return shapes


def _draw(img: np.ndarray, poly: np.ndarray, color) -> None:
    cv2.fillPoly(img, [np.round(poly).astype(np.int32)],
                 tuple(int(c) for c in color))


def _image_size(rng: np.random.Generator) -> Tuple[int, int]:
    h = int(rng.integers(12, 23)) * 16  # 192..352
    w = int(rng.integers(14, 27)) * 16  # 224..416
    return h, w


def _splits(num_images: int, val_fraction: float) -> List[str]:
    num_val = max(1, int(round(num_images * val_fraction)))
    num_train = max(1, num_images - num_val)
    return ['train'] * num_train + ['val'] * num_val


def generate_demo_coco(out_dir: str,
                       num_images: int = 80,
                       seed: int = 0,
                       val_fraction: float = 0.2,
                       max_shapes: int = 4) -> dict:
    """Write a COCO-format shapes detection data set into ``out_dir``.

    Args:
        out_dir: Output folder (created).
        num_images: Total number of images; ``val_fraction`` of them (at
            least one) go to the val split.
        seed: Random seed; the output is a pure function of the arguments.
        val_fraction: Fraction of images in the val split.
        max_shapes: Maximum number of objects per image (at least one).

    Returns:
        dict: ``{'train': ann_file, 'val': ann_file}`` (absolute paths).
    """
    rng = np.random.default_rng(seed)
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(DEMO_DET_CLASSES)
    ]
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    data = {
        s: dict(images=[], annotations=[], categories=categories)
        for s in ('train', 'val')
    }
    ann_id = 1
    for img_id, split in enumerate(_splits(num_images, val_fraction), 1):
        h, w = _image_size(rng)
        img = _background(rng, h, w)
        file_name = f'{img_id:06d}.jpg'
        for cls, poly in _place_shapes(rng, h, w, max_shapes,
                                       len(DEMO_DET_CLASSES)):
            color = _CLASS_COLORS[cls] + rng.uniform(-25, 25, size=3)
            _draw(img, poly, np.clip(color, 0, 255))
            poly = np.round(poly, 2)
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            x, y = poly[:, 0], poly[:, 1]
            area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            data[split]['annotations'].append(
                dict(
                    id=ann_id,
                    image_id=img_id,
                    category_id=cls + 1,
                    bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    area=round(float(area), 2),
                    segmentation=[[float(v) for v in poly.reshape(-1)]],
                    iscrowd=0))
            ann_id += 1
        os.makedirs(osp.join(out_dir, split), exist_ok=True)
        cv2.imwrite(osp.join(out_dir, split, file_name), img,
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        data[split]['images'].append(
            dict(id=img_id, file_name=file_name, height=h, width=w))
    ann_files = {}
    for split, content in data.items():
        ann_files[split] = osp.abspath(
            osp.join(out_dir, 'annotations', f'instances_{split}.json'))
        with open(ann_files[split], 'w') as f:
            json.dump(content, f, indent=None, sort_keys=True)
    return ann_files


def generate_demo_ade20k(out_dir: str,
                         num_images: int = 40,
                         seed: int = 0,
                         val_fraction: float = 0.2,
                         max_shapes: int = 4,
                         classes: Optional[tuple] = None) -> dict:
    """Write an ADE20K-layout shapes semantic segmentation data set.

    Label maps (png, uint8) hold 0 for "other" (background) and ``1..N`` for
    the ``N`` shape classes (:data:`DEMO_SEG_CLASSES`), so the data set is
    read with ``reduce_zero_label=True`` exactly like ADE20K.

    Returns:
        dict: ``{'training': n_train, 'validation': n_val}``.
    """
    classes = tuple(classes or DEMO_SEG_CLASSES)
    rng = np.random.default_rng(seed)
    counts = {'training': 0, 'validation': 0}
    for sub in ('images', 'annotations'):
        for split in counts:
            os.makedirs(osp.join(out_dir, sub, split), exist_ok=True)
    for idx, split in enumerate(_splits(num_images, val_fraction), 1):
        split = 'training' if split == 'train' else 'validation'
        h, w = _image_size(rng)
        img = _background(rng, h, w)
        label = np.zeros((h, w), dtype=np.uint8)
        for cls, poly in _place_shapes(rng, h, w, max_shapes, len(classes)):
            color = _CLASS_COLORS[cls % len(_CLASS_COLORS)] + rng.uniform(
                -25, 25, size=3)
            _draw(img, poly, np.clip(color, 0, 255))
            _draw(label, poly, (cls + 1, ))
        name = f'ADE_demo_{split}_{idx:06d}'
        cv2.imwrite(osp.join(out_dir, 'images', split, name + '.jpg'), img,
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(osp.join(out_dir, 'annotations', split, name + '.png'),
                    label)
        counts[split] += 1
    return counts
