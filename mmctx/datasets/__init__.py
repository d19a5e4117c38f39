"""Small synthetic data sets for demos and tests."""
from .demo_data import (DEMO_DET_CLASSES, DEMO_SEG_CLASSES, generate_demo_ade20k,
                        generate_demo_coco)

__all__ = [
    'DEMO_DET_CLASSES', 'DEMO_SEG_CLASSES', 'generate_demo_coco',
    'generate_demo_ade20k'
]
