"""Stack sanity: versions, compiled mmcv ops, imports, no torchvision, and
the weights-only allowlist in place with torch.load's default untouched."""
import importlib.metadata as md
import os
import pickle
import subprocess
import sys

import pytest
import torch


def test_versions():
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    import mmseg
    assert mmcv.__version__ == '2.1.0'
    assert mmengine.__version__ == '0.10.7'
    assert mmdet.__version__ == '3.3.0'
    assert mmseg.__version__ == '1.2.2'
    assert mmpretrain.__version__ == '1.2.0'
    assert md.version('mmctx') == '0.1.0'  # pip install -e . was run
    for dep in ('ftfy', 'regex', 'pycocotools'):
        md.version(dep)


def test_mmcv_ops_compiled_on_cpu():
    from mmcv.ops import RoIAlign, nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.],
                          [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert dets.shape == (2, 5)
    feat = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    rois = torch.tensor([[0., 0., 0., 7., 7.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(feat, rois)
    assert out.shape == (1, 1, 2, 2)
    assert torch.isfinite(out).all()


def test_openmmlab_packages_import():
    import mmctx  # noqa: F401  (lets mmpretrain import without torchvision)
    import mmctx.datasets  # noqa: F401
    import mmdet.datasets  # noqa: F401
    import mmdet.evaluation  # noqa: F401
    import mmdet.models  # noqa: F401
    import mmpretrain.datasets  # noqa: F401
    import mmpretrain.evaluation  # noqa: F401
    import mmpretrain.models  # noqa: F401
    import mmseg.datasets  # noqa: F401
    import mmseg.evaluation  # noqa: F401
    import mmseg.models  # noqa: F401


def test_mmpretrain_works_without_torchvision():
    import importlib.util
    if importlib.util.find_spec('torchvision') is not None:
        pytest.skip('torchvision is installed: mmpretrain uses it as is')
    import numpy as np
    from mmengine.registry import init_default_scope
    from PIL import Image

    import mmctx  # noqa: F401
    from mmpretrain.datasets.transforms import PackInputs
    from mmpretrain.models.utils.box_utils import (box_iou,
                                                   generalized_box_iou)
    from mmpretrain.registry import MODELS, TRANSFORMS
    a = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 15.]])
    b = torch.tensor([[0., 0., 10., 10.], [0., 0., 5., 5.]])
    assert torch.allclose(box_iou(a, b),
                          torch.tensor([[1., .25], [25 / 175, 0.]]))
    assert generalized_box_iou(a, b)[1, 1] == pytest.approx(-100 / 225)
    assert not [k for k in TRANSFORMS.module_dict if 'torchvision' in k]
    packed = PackInputs()(dict(img=Image.fromarray(
        np.arange(24, dtype=np.uint8).reshape(2, 4, 3))))
    assert packed['inputs'].shape == (3, 2, 4)
    assert packed['inputs'][:, 1, 2].tolist() == [18, 19, 20]
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(type='ImageClassifier',
             backbone=dict(type='ResNet', depth=18),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=10,
                       in_channels=512)))
    assert model(torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 10)
    assert 'torchvision' not in sys.modules


def test_mmctx_does_not_import_torchvision():
    code = ('import sys, mmctx, mmdet.models, mmseg.models, '
            'mmpretrain.models, mmpretrain.datasets; '
            'print("torchvision" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == 'False'


def test_weights_only_allowlist_is_scoped_and_default_untouched(tmp_path):
    """mmctx adds nothing to torch's process-wide allowlist: its stand-ins
    are in force only inside its own and mmengine's checkpoint loads."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    import mmctx.compat as compat
    before = torch.serialization.get_safe_globals()
    flat = [g[0] if isinstance(g, tuple) else g for g in before]
    for real in (HistoryBuffer, np.ndarray, np.dtype, getattr):
        assert real not in flat
    names = [name for _, name in compat.mmengine_checkpoint_globals()]
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in names
    assert 'builtins.getattr' in names

    # the default stays weights_only=True and torch.load is torch's own
    assert torch.load.__module__ == 'torch.serialization'
    assert torch.serialization._default_to_weights_only(None) is True
    assert not os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')

    buf = HistoryBuffer()
    buf.update(np.float64(1.5))
    buf.update(2.0)
    path = tmp_path / 'hub.pth'
    torch.save({'hub': buf, 'arr': np.arange(3, dtype=np.int64),
                'scalar': np.float32(0.5)}, path)
    # a user's own torch.load keeps torch's defaults ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    # ... mmctx's loader reads mmengine content
    obj = compat.load_checkpoint_file(path)
    assert obj['hub'].mean() == pytest.approx(1.75)
    # (as sets: torch keeps them in a set, whose order may change)
    assert set(map(repr, torch.serialization.get_safe_globals())) == \
        set(map(repr, before))
    # ... while arbitrary objects are still refused
    torch.save({'obj': _Unsafe()}, path)
    with pytest.raises(compat.CheckpointError, match='refused'):
        compat.load_checkpoint_file(path)


class _Unsafe:
    pass


def test_compat_idempotent_and_cpu_only():
    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    from mmengine.runner import Runner

    from mmengine.runner.checkpoint import CheckpointLoader

    import mmctx.compat as compat
    from mmctx.compat.cpu_distributed import _PATCH_FLAG

    def patched():
        return (dist_utils._init_dist_pytorch,
                MMDistributedDataParallel.__init__, Runner.wrap_model,
                Runner.load_or_resume,
                CheckpointLoader.__dict__['load_checkpoint'].__func__)

    before = patched()
    compat.apply()
    compat.patch_cpu_distributed()
    compat.patch_mmengine_loading()
    after = patched()
    assert before == after
    if not torch.cuda.is_available():
        for fn in after[:3]:
            assert getattr(fn, _PATCH_FLAG, False)
        # a patched function wraps the original only once
        assert not getattr(dist_utils._init_dist_pytorch.__wrapped__,
                           _PATCH_FLAG, False)


# --- tools/setup_helpers.py: the CUDA set-up decisions, without a GPU --------
NVCC_13_0 = ('nvcc: NVIDIA (R) Cuda compiler driver\n'
             'Copyright (c) 2005-2025 NVIDIA Corporation\n'
             'Built on Wed_Aug_20_01:58:59_PM_PDT_2025\n'
             'Cuda compilation tools, release 13.0, V13.0.88\n'
             'Build cuda_13.0.r13.0/compiler.36424714_0\n')


def _nvcc_out(version):
    return NVCC_13_0.replace('13.0', version)


@pytest.fixture(scope='module')
def sh():
    """tools/setup_helpers.py, loaded from its path (tools is no package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'tools' / 'setup_helpers.py'
    spec = importlib.util.spec_from_file_location('setup_helpers', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_fs(*nvccs, headers=True):
    """is_file for a machine on which exactly these nvccs exist (with
    include/cuda_runtime.h beside their bin/ unless headers=False)."""
    files = set(nvccs)
    if headers:
        files |= {n[:-len('bin/nvcc')] + 'include/cuda_runtime.h'
                  for n in nvccs}
    return lambda p: p in files


def _versions(**by_nvcc):
    """nvcc_version_output: nvcc path -> `nvcc --version` text."""
    table = {k.replace('__', '/'): v for k, v in by_nvcc.items()}
    return lambda nvcc: table.get(nvcc)


def test_helper_never_imports_mmctx_and_runs_on_old_python(sh):
    import ast
    tree = ast.parse(open(sh.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names]
    names += [n.module for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and n.split('.')[0] == 'mmctx']
    src = open(sh.__file__).read()
    assert 'removeprefix' not in src and ':=' not in src  # Python >= 3.8


def test_setup_script_syntax_and_helper_use():
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'tools' / 'setup_env.sh'
    subprocess.run(['bash', '-n', str(script)], check=True)
    text = script.read_text()
    for cmd in ('plan', 'toolkit', 'pip-toolkit-home', 'check-mmcv',
                'patch-mmcv', 'check-cuda-code'):
        assert '"$HELPER" %s' % cmd in text
    assert 'FORCE_CUDA=1' in text and 'TORCH_CUDA_ARCH_LIST=$ARCH_LIST' in text
    for tool in sorted((script.parent / 'gpu').glob('*.sh')):
        subprocess.run(['bash', '-n', str(tool)], check=True)


# The three lines of mmcv 2.1.0's setup.py that set the C++ standard (two for
# g++, one for nvcc), as they are there, plus their neighbours.
MMCV_SETUP_STD_LINES = """
            if parse_version(torch.__version__) <= parse_version('1.12.1'):
                extra_compile_args['cxx'] = ['-std=c++14']
            else:
                extra_compile_args['cxx'] = ['-std=c++17']
            extra_compile_args['cxx'] = ['-Wall', '-std=c++17']
        if 'nvcc' in extra_compile_args and platform.system() != 'Windows':
            if parse_version(torch.__version__) <= parse_version('1.12.1'):
                extra_compile_args['nvcc'] += ['-std=c++14']
            else:
                extra_compile_args['nvcc'] += ['-std=c++17']
"""


def test_cxx_standard_follows_torch(sh):
    assert sh.cxx_standard('2.11.0+cu130') == 'c++17'
    assert sh.cxx_standard('2.13.0') == 'c++17'
    assert sh.cxx_standard('2.14.1') == 'c++20'
    assert sh.cxx_standard('3.0.0a0') == 'c++20'
    with pytest.raises(sh.SetupError, match='torch version'):
        sh.cxx_standard('nightly')


def test_patch_mmcv_setup_sets_the_standard_for_gcc_and_nvcc(sh):
    text, n = sh.patch_mmcv_setup(MMCV_SETUP_STD_LINES, 'c++20')
    assert n == 3
    assert text.count("'-std=c++20'") == 3 and "c++17" not in text
    assert text.count("'-std=c++14'") == 2  # the torch <= 1.12.1 branches
    assert sh.patch_mmcv_setup(text, 'c++20') == (text, 0)  # idempotent
    # torch < 2.14 keeps mmcv's own flags
    assert sh.patch_mmcv_setup(MMCV_SETUP_STD_LINES, 'c++17') == (
        MMCV_SETUP_STD_LINES, 0)
    with pytest.raises(sh.SetupError, match='2 .* 3 expected'):
        sh.patch_mmcv_setup(MMCV_SETUP_STD_LINES.replace(
            "['-Wall', '-std=c++17']", "['-Wall']"), 'c++20')


# `cuobjdump -symbols` of a library built with -gencode for sm_90 (machine
# code) and compute_80 (PTX only), as this machine's cuobjdump prints it.
CUOBJDUMP_SYMBOLS = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

symbols:
STT_OBJECT       STB_WEAK   STV_DEFAULT  U .nv.reservedSmem.offset0
STT_FUNC         STB_GLOBAL STO_ENTRY      _Z29roi_align_forward_cuda_kernelIfEvPKT_S2_PS0_
STT_FUNC         STB_GLOBAL STO_ENTRY      _Z8nms_cudaiifPKfPyi

Fatbin ptx code:
================
arch = sm_80
code version = [9,0]
host = linux
compile_size = 64bit
compressed
"""


def test_cuda_machine_code_check(sh):
    by_arch = sh.kernels_by_arch(CUOBJDUMP_SYMBOLS)
    assert set(by_arch) == {'sm_90'}  # PTX is not machine code
    assert len(by_arch['sm_90']) == 2
    assert sh.missing_kernels(by_arch, '9.0') == []
    assert sh.missing_kernels(by_arch, '8.0;9.0+PTX') == [
        'sm_80: nms_cuda', 'sm_80: roi_align_forward_cuda_kernel']
    only_nms = sh.kernels_by_arch(
        CUOBJDUMP_SYMBOLS.replace('roi_align_forward', 'roi_pool_forward'))
    assert sh.missing_kernels(only_nms, '9.0') == [
        'sm_90: roi_align_forward_cuda_kernel']


def test_parse_versions(sh):
    assert sh.parse_nvcc_version(NVCC_13_0) == (13, 0)
    assert sh.parse_nvcc_version(_nvcc_out('12.8')) == (12, 8)
    assert sh.parse_nvcc_version('command not found') is None
    assert sh.parse_nvcc_version(None) is None
    assert sh.parse_cuda_version('12.8.1') == (12, 8)
    assert sh.parse_cuda_version(None) is None
    assert sh.torch_flavour(None) == 'cpu'
    assert sh.torch_flavour('13.0') == 'cu130'
    assert sh.torch_flavour('12.8') == 'cu128'


def test_cache_key_cpu_unchanged_cuda_has_arch_list(sh):
    # the CPU key is the one the cached CPU wheels already live under
    assert sh.cache_key('2.13.0', None) == 'torch-2.13.0-cpu'
    assert sh.cache_key('2.13.0+cpu', None, '') == 'torch-2.13.0-cpu'
    key = sh.cache_key('2.11.0+cu130', '13.0', '9.0')
    assert key == 'torch-2.11.0-cu130-arch-9.0'
    # one wheel per torch version, CUDA version and arch list ...
    assert sh.cache_key('2.11.0', '13.0', '8.0;9.0') != key
    assert sh.cache_key('2.11.0', '12.8', '9.0') != key
    assert sh.cache_key('2.12.0', '13.0', '9.0') != key
    # ... whatever the order / separators / repeats of the list
    assert (sh.cache_key('2.11.0', '13.0', '9.0;8.0;9.0')
            == sh.cache_key('2.11.0', '13.0', '8.0 9.0')
            == 'torch-2.11.0-cu130-arch-8.0_9.0')
    assert (sh.cache_key('2.11.0', '13.0', '8.0;9.0+PTX')
            == 'torch-2.11.0-cu130-arch-8.0_9.0+PTX')
    assert sh.cache_key('2.11.0', '13.0', '10.0;9.0').endswith('9.0_10.0')
    with pytest.raises(sh.SetupError):
        sh.cache_key('2.11.0', '13.0', '')


def test_arch_list_from_visible_gpus_deduplicated(sh):
    assert sh.choose_arch_list('13.0', [(9, 0)], {}) == ('9.0',
                                                         'visible GPUs')
    archs, source = sh.choose_arch_list(
        '12.8', [(9, 0), (8, 0), (9, 0), (8, 6)], {})
    assert archs == '8.0;8.6;9.0' and source == 'visible GPUs'
    assert sh.choose_arch_list('13.0', [(12, 0), (10, 0)], {})[0] \
        == '10.0;12.0'
    # 'native' (torch's spelling for "the visible GPUs") and an empty value
    assert sh.choose_arch_list('13.0', [(9, 0)],
                               {'TORCH_CUDA_ARCH_LIST': 'native'})[0] == '9.0'
    assert sh.choose_arch_list('13.0', [(9, 0)],
                               {'TORCH_CUDA_ARCH_LIST': ' '})[0] == '9.0'


def test_arch_list_default_per_cuda_version(sh):
    for cuda in ('13.0', '13.1'):
        archs, source = sh.choose_arch_list(cuda, [], {})
        assert 'default for CUDA 13' in source
        assert archs == '7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'
        # CUDA 13 dropped Maxwell, Pascal and Volta (sm_50 - sm_72)
        assert not [a for a in archs.split(';')
                    if sh._arch_number(a) < (7, 5)]
    assert sh.choose_arch_list('12.4', [], {})[0] == \
        '7.0;7.5;8.0;8.6;8.9;9.0+PTX'
    assert sh.choose_arch_list('12.8', [], {})[0] == \
        '7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'  # 12.8 knows Blackwell
    assert sh.choose_arch_list('11.8', [], {})[0].endswith('8.9;9.0+PTX')
    assert '8.9' not in sh.choose_arch_list('11.3', [], {})[0]


def test_arch_list_override_honoured(sh):
    env = {'TORCH_CUDA_ARCH_LIST': '8.0 9.0+PTX'}
    assert sh.choose_arch_list('13.0', [(9, 0)], env) == (
        '8.0;9.0+PTX', 'TORCH_CUDA_ARCH_LIST from the environment')
    assert sh.choose_arch_list('12.8', [], {'TORCH_CUDA_ARCH_LIST': '9.0'}
                               )[0] == '9.0'
    with pytest.raises(sh.SetupError, match='no GPU is visible'):
        sh.choose_arch_list('13.0', [], {'TORCH_CUDA_ARCH_LIST': 'native'})
    # CUDA 13 cannot compile for Volta: say so instead of a compiler error
    with pytest.raises(sh.SetupError, match='7.0'):
        sh.choose_arch_list('13.0', [], {'TORCH_CUDA_ARCH_LIST': '7.0;8.0'})
    with pytest.raises(sh.SetupError, match='older CUDA'):
        sh.choose_arch_list('13.0', [(7, 0)], {})
    assert sh.choose_arch_list('12.8', [(7, 0)], {})[0] == '7.0'


def test_toolkit_cuda13_none_found_installs_pip_toolkit(sh):
    tk = sh.find_toolkit('13.0', {}, None, _fake_fs(), _versions())
    assert isinstance(tk, sh.PipToolkit)
    assert tk.packages == ['nvidia-cuda-nvcc==13.0.*',
                           'nvidia-cuda-crt==13.0.*', 'nvidia-nvvm==13.0.*',
                           'nvidia-cuda-cccl==13.0.*']
    assert sh.find_toolkit('13.2', {}, None, _fake_fs(), _versions()
                           ).packages[0] == 'nvidia-cuda-nvcc==13.2.*'


def test_toolkit_cuda12_none_found_says_what_to_install(sh):
    with pytest.raises(sh.SetupError) as e:
        sh.find_toolkit('12.8', {}, None, _fake_fs(), _versions())
    msg = str(e.value)
    assert 'CUDA 12.8 toolkit' in msg
    assert 'cuda-toolkit-12-8' in msg  # NVIDIA's apt/dnf package
    assert 'conda install' in msg and 'cuda-nvcc=12.8' in msg
    assert 'CUDA_HOME' in msg
    assert 'ships no nvcc' in msg  # why pip is no way out


def test_toolkit_cuda_home_used_first(sh):
    env = {'CUDA_HOME': '/opt/cuda-13'}
    tk = sh.find_toolkit(
        '13.0', env, '/usr/bin/nvcc',
        _fake_fs('/opt/cuda-13/bin/nvcc', '/usr/bin/nvcc',
                 '/usr/local/cuda/bin/nvcc'),
        _versions(**{'__opt__cuda-13__bin__nvcc': NVCC_13_0,
                     '__usr__bin__nvcc': NVCC_13_0,
                     '__usr__local__cuda__bin__nvcc': NVCC_13_0}))
    assert isinstance(tk, sh.Toolkit)
    assert (tk.cuda_home, tk.version, tk.source) == ('/opt/cuda-13', '13.0',
                                                     'CUDA_HOME')


def test_toolkit_nvcc_on_path_used(sh):
    tk = sh.find_toolkit(
        '12.8', {}, '/opt/cuda-12.8/bin/nvcc',
        _fake_fs('/opt/cuda-12.8/bin/nvcc', '/usr/local/cuda/bin/nvcc'),
        _versions(**{'__opt__cuda-12.8__bin__nvcc': _nvcc_out('12.8'),
                     '__usr__local__cuda__bin__nvcc': _nvcc_out('12.8')}))
    assert tk.cuda_home == '/opt/cuda-12.8'  # the parent of nvcc's bin/
    assert tk.source.startswith('nvcc on PATH')
    # a CUDA_HOME without bin/nvcc is ignored (with a note), PATH wins
    tk = sh.find_toolkit(
        '12.8', {'CUDA_HOME': '/nothing'}, '/opt/cuda-12.8/bin/nvcc',
        _fake_fs('/opt/cuda-12.8/bin/nvcc'),
        _versions(**{'__opt__cuda-12.8__bin__nvcc': _nvcc_out('12.8')}))
    assert tk.cuda_home == '/opt/cuda-12.8'
    assert any('/nothing has no bin/nvcc' in n for n in tk.notes)


def test_toolkit_usr_local_cuda_and_earlier_pip_toolkit(sh):
    tk = sh.find_toolkit(
        '12.4', {}, None, _fake_fs('/usr/local/cuda/bin/nvcc'),
        _versions(**{'__usr__local__cuda__bin__nvcc': _nvcc_out('12.6')}))
    assert tk.cuda_home == '/usr/local/cuda' and tk.version == '12.6'
    assert any('same major' in n for n in tk.notes)  # minor may differ
    # a pip toolkit installed by an earlier run is found, not reinstalled
    home = '/venv/lib/python3.12/site-packages/nvidia/cu13'
    tk = sh.find_toolkit('13.0', {}, None, _fake_fs(home + '/bin/nvcc'),
                         _versions(**{home.replace('/', '__')
                                      + '__bin__nvcc': NVCC_13_0}),
                         pip_homes=[home])
    assert (tk.cuda_home, tk.source) == (home, 'pip toolkit')


def test_toolkit_version_mismatch_is_an_error(sh):
    # an explicit CUDA_HOME of the wrong major version
    with pytest.raises(sh.SetupError, match='does not match'):
        sh.find_toolkit(
            '13.0', {'CUDA_HOME': '/opt/cuda-12'}, None,
            _fake_fs('/opt/cuda-12/bin/nvcc'),
            _versions(**{'__opt__cuda-12__bin__nvcc': _nvcc_out('12.8')}))
    # CUDA 12 torch, only a CUDA 13 nvcc around: error naming both
    with pytest.raises(sh.SetupError) as e:
        sh.find_toolkit(
            '12.8', {}, '/usr/local/cuda/bin/nvcc',
            _fake_fs('/usr/local/cuda/bin/nvcc'),
            _versions(**{'__usr__local__cuda__bin__nvcc': NVCC_13_0}))
    assert 'nvcc 13.0 does not match torch.version.cuda=12.8' in str(e.value)
    assert 'cuda-toolkit-12-8' in str(e.value)
    # CUDA 13 torch, a CUDA 12 nvcc on PATH: skipped, pip toolkit instead
    tk = sh.find_toolkit(
        '13.0', {}, '/usr/local/cuda/bin/nvcc',
        _fake_fs('/usr/local/cuda/bin/nvcc'),
        _versions(**{'__usr__local__cuda__bin__nvcc': _nvcc_out('12.8')}))
    assert isinstance(tk, sh.PipToolkit)
    assert any('does not match' in n for n in tk.notes)
    # an nvcc that reports no version is skipped too
    with pytest.raises(sh.SetupError, match='gives no CUDA version'):
        sh.find_toolkit('12.8', {}, '/x/bin/nvcc', _fake_fs('/x/bin/nvcc'),
                        _versions(**{'__x__bin__nvcc': 'segfault'}))


def test_toolkit_nvcc_wrapper_script_on_path_skipped(sh):
    """/usr/local/bin/nvcc = `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: its
    parent's parent has no CUDA headers, /usr/local/cuda is used instead."""
    fs = _fake_fs('/usr/local/cuda/bin/nvcc')
    tk = sh.find_toolkit(
        '13.0', {}, ['/usr/local/bin/nvcc'],
        lambda p: p == '/usr/local/bin/nvcc' or fs(p),
        lambda nvcc: NVCC_13_0)
    assert tk.cuda_home == '/usr/local/cuda'
    assert any('/usr/local has no include/cuda_runtime.h' in n
               for n in tk.notes)
    # a symlinked nvcc: its realpath (passed second) gives the home
    tk = sh.find_toolkit(
        '12.8', {}, ['/usr/bin/nvcc', '/opt/cuda-12.8/bin/nvcc'],
        lambda p: p in {'/usr/bin/nvcc', '/opt/cuda-12.8/bin/nvcc',
                        '/opt/cuda-12.8/include/cuda_runtime.h'},
        lambda nvcc: _nvcc_out('12.8'))
    assert tk.cuda_home == '/opt/cuda-12.8'
    # an explicit CUDA_HOME without headers is kept, with a warning
    tk = sh.find_toolkit('13.0', {'CUDA_HOME': '/c'}, None,
                         _fake_fs('/c/bin/nvcc', headers=False),
                         lambda nvcc: NVCC_13_0)
    assert tk.cuda_home == '/c' and any('may not find' in n
                                        for n in tk.notes)


def test_pip_toolkit_home_and_libcudart(sh):
    site = '/venv/site-packages'
    home = site + '/nvidia/cu13'
    assert sh.pip_toolkit_home('13.0', ['/a', site],
                               _fake_fs(home + '/bin/nvcc')) == home
    assert sh.pip_toolkit_home('13.0', [site], _fake_fs()) is None
    files = [home + '/include/cuda.h', home + '/lib/libcudart_static.a',
             home + '/lib/libcudart.so.13']
    assert sh.find_libcudart('13.0', files, [site], lambda d: []) == \
        home + '/lib/libcudart.so.13'
    # distribution metadata missing: look into site/nvidia/cu13/lib
    listing = {home + '/lib': ['libcudart.so.13', 'libnvvm.so.4']}
    assert sh.find_libcudart('13.0', None, [site],
                             lambda d: listing.get(d, [])) == \
        home + '/lib/libcudart.so.13'
    with pytest.raises(sh.SetupError, match='nvidia-cuda-runtime'):
        sh.find_libcudart('13.0', None, [site], lambda d: [])
    with pytest.raises(sh.SetupError, match='libcudart.so.13'):
        sh.find_libcudart('13.0', [home + '/lib/libcudart.so.12'], [site],
                          lambda d: [])


def test_pip_toolkit_home_command_links_libcudart(sh, tmp_path, monkeypatch,
                                                   capsys):
    """The CLI step after `pip install nvidia-cuda-nvcc==13.0.* ...`, on a
    fake site-packages whose nvcc is a script printing nvcc's version."""
    home = tmp_path / 'nvidia' / 'cu13'
    (home / 'bin').mkdir(parents=True)
    (home / 'lib').mkdir()
    nvcc = home / 'bin' / 'nvcc'
    nvcc.write_text('#!/bin/sh\n' + ''.join(  # builtins only: PATH is cut
        "echo '%s'\n" % line for line in NVCC_13_0.splitlines()))
    nvcc.chmod(0o755)
    runtime = home / 'lib' / 'libcudart.so.13'
    runtime.write_bytes(b'')
    (home / 'include').mkdir()
    (home / 'include' / 'cuda_runtime.h').write_text('')
    monkeypatch.setattr(sh, '_torch_cuda', lambda required=False: '13.0')
    monkeypatch.setattr(sh, '_site_dirs', lambda: [str(tmp_path)])
    monkeypatch.setattr(sh, '_runtime_files', lambda: [str(runtime)])
    assert sh.main(['pip-toolkit-home']) == 0
    out = capsys.readouterr().out
    assert 'TOOLKIT_HOME=%s' % home in out and 'TOOLKIT_NVCC=13.0' in out
    link = home / 'lib' / 'libcudart.so'
    assert link.is_symlink() and link.resolve() == runtime.resolve()
    assert sh.main(['pip-toolkit-home']) == 0  # idempotent
    # and `toolkit` now finds this pip toolkit instead of installing it
    monkeypatch.setenv('PATH', '/nonexistent')
    monkeypatch.delenv('CUDA_HOME', raising=False)
    real_is_file = sh._is_exe
    monkeypatch.setattr(sh, '_is_exe', lambda p: p.startswith(
        str(tmp_path)) and real_is_file(p))
    capsys.readouterr()
    assert sh.main(['toolkit']) == 0
    out = capsys.readouterr().out
    assert 'TOOLKIT_SOURCE=\'pip toolkit\'' in out and 'TOOLKIT_PIP=\'\'' \
        in out
    # no runtime library at all: a clear error, exit code 3
    link.unlink()
    runtime.unlink()
    monkeypatch.setattr(sh, '_runtime_files', lambda: None)
    assert sh.main(['pip-toolkit-home']) == 3
    assert 'nvidia-cuda-runtime' in capsys.readouterr().err


GOOD_CUDA_MMCV = dict(version='2.1.0', compiling_cuda='13.0', gpu_count=1,
                      gpu_mismatches=[])


def test_mmcv_verdict_cpu_only_mmcv_under_cuda_torch_is_an_error(sh):
    ok, reason = sh.mmcv_verdict('13.0', dict(
        version='2.1.0', compiling_cuda='not available', gpu_count=0))
    assert not ok
    assert 'CPU-only' in reason and 'not available' in reason
    # the same mmcv is right for a CPU torch
    assert sh.mmcv_verdict(None, dict(version='2.1.0',
                                      compiling_cuda='not available'))[0]


def test_mmcv_verdict_other_cases(sh):
    assert not sh.mmcv_verdict(None, dict(import_error='ImportError: x'))[0]
    assert not sh.mmcv_verdict(None, dict(version='2.2.0'))[0]
    ok, reason = sh.mmcv_verdict('13.0', dict(GOOD_CUDA_MMCV))
    assert ok and 'equal their CPU results' in reason
    ok, reason = sh.mmcv_verdict('13.0', dict(GOOD_CUDA_MMCV, gpu_count=0))
    assert ok and 'no GPU visible' in reason
    assert not sh.mmcv_verdict('13.0', dict(GOOD_CUDA_MMCV,
                                            compiling_cuda='12.8'))[0]
    ok, reason = sh.mmcv_verdict('13.0', dict(
        GOOD_CUDA_MMCV, gpu_mismatches=['roi_align on cuda:0']))
    assert not ok and 'roi_align' in reason
    ok, reason = sh.mmcv_verdict('13.0', dict(
        GOOD_CUDA_MMCV, gpu_error='RuntimeError: no kernel image'))
    assert not ok and 'no kernel image' in reason


def test_helper_commands_on_this_machine(sh):
    """`plan` and `check-mmcv` on the installed stack (CPU or CUDA torch)."""
    run = [sys.executable, sh.__file__]
    plan = subprocess.run(run + ['plan'], check=True, capture_output=True,
                          text=True).stdout
    values = dict(line.split('=', 1) for line in plan.splitlines())
    version = torch.__version__.split('+')[0]
    if torch.version.cuda is None:
        assert values['CACHE_KEY'] == 'torch-%s-cpu' % version
        assert values['ARCH_LIST'] == "''"
    else:
        assert values['CACHE_KEY'].startswith(
            'torch-%s-%s-arch-' % (version, sh.torch_flavour(
                torch.version.cuda)))
    check = subprocess.run(run + ['check-mmcv'], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    if torch.version.cuda is not None and torch.cuda.is_available():
        assert 'equal their CPU results' in check.stdout


def test_cuda_library_headers_from_the_nvidia_wheels(sh):
    """A toolkit with nvcc alone (this machine's /usr/local/cuda) lacks the
    cuBLAS / cuSPARSE headers that torch's ATen/cuda headers include; the
    CUDA torch's wheels have them (CUDA 13: nvidia/cu13/include; CUDA 12:
    nvidia/<library>/include)."""
    site = '/venv/site-packages'
    cu13 = site + '/nvidia/cu13/include/'
    files = {cu13 + h for h in sh.LIBRARY_HEADERS}
    dirs, missing = sh.extra_include_dirs('13.0', '/usr/local/cuda', [site],
                                          files.__contains__)
    assert dirs == [cu13.rstrip('/')] and missing == []
    # a full toolkit needs nothing extra
    full = {'/usr/local/cuda/include/' + h for h in sh.LIBRARY_HEADERS}
    assert sh.extra_include_dirs('13.0', '/usr/local/cuda', [site],
                                 full.__contains__) == ([], [])
    # CUDA 12 wheels: one folder per library
    per_lib = {'%s/nvidia/%s/include/%s' % (site, lib, h)
               for h, lib in sh.LIBRARY_HEADERS.items()}
    dirs, missing = sh.extra_include_dirs('12.8', '/usr/local/cuda', [site],
                                          per_lib.__contains__)
    assert sorted(dirs) == sorted('%s/nvidia/%s/include' % (site, lib)
                                  for lib in sh.LIBRARY_HEADERS.values())
    # nowhere: named
    assert sh.extra_include_dirs('13.0', '/usr/local/cuda', [site],
                                 lambda p: False)[1] == sorted(
                                     sh.LIBRARY_HEADERS)


def test_carry_list_closure(sh):
    """tools/gpu/prepare.sh carries the stack's dependencies the GPU image
    lacks: a closure over the requirements, markers applied, minus what is
    preinstalled (opencv-python-headless stands for opencv-python)."""
    reqs = {'mmctx': ['mmdet==3.3.0', 'mmcv==2.1.0', 'tomli; python_version '
                      '< "3.0"'],
            'mmdet': ['numpy', 'pycocotools', 'terminaltables'],
            'mmcv': ['opencv-python>=3', 'addict', 'mmengine'],
            'mmengine': ['addict', 'termcolor'], 'pycocotools': ['numpy']}

    def marker_ok(req):
        return 'python_version < "3.0"' not in req

    closure = sh.requirement_closure(['mmctx'], reqs.get, marker_ok)
    assert 'tomli' not in closure and 'termcolor' in closure
    pre = sh.read_name_list('# comment\nnumpy\nopencv_python_headless\n')
    assert sh.to_carry(closure, pre) == [
        'addict', 'mmdet', 'mmengine', 'pycocotools', 'termcolor',
        'terminaltables']
