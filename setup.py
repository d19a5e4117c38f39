"""mmctx: cheap long-range context modules for OpenMMLab 2.x CNN backbones.

``mmcv==2.1.0`` must be installed *before* this package: there is no mmcv
2.1.0 wheel for current torch, so ``tools/setup_env.sh`` (``make setup``)
builds it once from source with its ops against the installed torch, caches
the wheel, and installs it; the pin below is then already satisfied and pip
never tries to build mmcv itself. torch is deliberately not listed: the one
already installed (CUDA or CPU) is kept.
"""
from setuptools import find_packages, setup


def readme():
    try:
        with open('README.md', encoding='utf-8') as f:
            return f.read()
    except OSError:
        return __doc__


setup(
    name='mmctx',
    version='0.1.0',
    description='Spatial Bias, Gather-Excite and Patch Spatial Interaction '
    'context modules for OpenMMLab 2.x CNN backbones',
    long_description=readme(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    include_package_data=True,
    python_requires='>=3.8',
    install_requires=[
        'mmcv==2.1.0',  # built and installed by tools/setup_env.sh first
        'mmengine==0.10.7',
        'mmdet==3.3.0',
        'mmsegmentation==1.2.2',
        'mmpretrain==1.2.0',
        'ftfy',  # imported by mmsegmentation but not declared by it
        'regex',  # idem
        'pycocotools',
        # mmdet's analyze_logs.py plot_curve / tools/analysis/analyze_logs.py
        'matplotlib',
        'seaborn>=0.12',
        'tensorboard>=2.14',  # mmengine's TensorboardVisBackend
        # ONNX export (tools/deployment/export_onnx.py, mmctx.deployment);
        # tested with onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.31.1 on
        # Python 3.11 / torch 2.13 (torch's dynamo exporter needs
        # onnxscript's torchlib).
        'onnx>=1.17,<2',
        'onnxscript>=0.3,<1',
        'onnxruntime>=1.17,<2',
    ],
    extras_require={'tests': ['pytest']},
    license='Apache License 2.0',
    zip_safe=False,
)
