"""The decisions behind ``tools/setup_env.sh``: which CUDA toolkit builds
mmcv's ops, for which GPU architectures, under which cache key, and whether
an installed mmcv is acceptable.

The decisions are small pure functions of their inputs (torch's CUDA version,
the visible GPUs' capabilities, environment variables, which paths exist,
``nvcc --version`` output), so ``tests/test_setup.py`` checks them without a
GPU. The ``main`` command line gathers those inputs from the running Python
(``PYTHON`` in setup_env.sh) and prints shell assignments for setup_env.sh
to ``eval``. It must not import mmctx (not installed yet when it runs) and
must run on Python >= 3.8.

    python tools/setup_helpers.py plan        # torch, arch list, cache key
    python tools/setup_helpers.py toolkit     # CUDA_HOME or pip packages
    python tools/setup_helpers.py pip-toolkit-home   # after the pip install
    python tools/setup_helpers.py check-mmcv  # exit 0: installed mmcv is ok
    python tools/setup_helpers.py patch-mmcv SRC   # C++ standard for torch
    python tools/setup_helpers.py check-cuda-code  # sm_XX code of nms etc.
    python tools/setup_helpers.py include-dirs     # CUDA library headers
    python tools/setup_helpers.py carry-list tools/gpu/preinstalled.txt
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

MMCV_VERSION = '2.1.0'

# Default TORCH_CUDA_ARCH_LIST when no GPU is visible, by the CUDA version
# torch was built with: (min (major, minor) of CUDA, arch list), newest first.
# Every Volta+ / Turing / Ampere / Ada / Hopper GPU (and Blackwell where the
# CUDA version knows it) gets native code; '+PTX' on the newest arch lets
# newer GPUs JIT-compile the kernels. CUDA 13 dropped sm_50 - sm_72
# (Maxwell, Pascal, Volta), so its list starts at 7.5 (Turing).
DEFAULT_ARCH_LISTS = (
    ((13, 0), '7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'),
    ((12, 8), '7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'),
    ((12, 0), '7.0;7.5;8.0;8.6;8.9;9.0+PTX'),
    ((11, 8), '6.0;7.0;7.5;8.0;8.6;8.9;9.0+PTX'),
    ((11, 1), '6.0;7.0;7.5;8.0;8.6+PTX'),
    ((0, 0), '6.0;7.0;7.5+PTX'),
)
# The oldest GPU architecture each CUDA major still compiles for.
MIN_ARCH = {13: (7, 5), 12: (5, 0), 11: (3, 5)}

# pip packages that together form a CUDA_HOME (site-packages/nvidia/cu13)
# for CUDA 13 torch builds; the runtime (libcudart, headers) comes with the
# CUDA torch itself (nvidia-cuda-runtime). The CUDA 12 nvcc wheel ships no
# nvcc, so there is no pip route for CUDA 12.
PIP_TOOLKIT_PACKAGES = ('nvidia-cuda-nvcc', 'nvidia-cuda-crt', 'nvidia-nvvm',
                        'nvidia-cuda-cccl')
PIP_TOOLKIT_MIN_MAJOR = 13
CUDA_RUNTIME_DIST = 'nvidia-cuda-runtime'


class SetupError(Exception):
    """A decision that cannot be made: the message says what to do."""


# --- versions ----------------------------------------------------------------
def parse_cuda_version(version):
    """'13.0' / '12.8.1' -> (13, 0) / (12, 8); None or '' -> None."""
    if not version:
        return None
    m = re.match(r'\s*(\d+)\.(\d+)', str(version))
    if not m:
        raise SetupError('cannot parse CUDA version %r' % (version, ))
    return int(m.group(1)), int(m.group(2))


def parse_nvcc_version(output):
    """'... Cuda compilation tools, release 13.0, V13.0.88' -> (13, 0)."""
    m = re.search(r'release (\d+)\.(\d+)', output or '')
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_flavour(torch_cuda):
    """torch.version.cuda -> 'cpu' (None) or 'cu130' ('13.0')."""
    v = parse_cuda_version(torch_cuda)
    return 'cpu' if v is None else 'cu%d%d' % v


# --- arch list -----------------------------------------------------------------
def default_arch_list(torch_cuda):
    """The documented default TORCH_CUDA_ARCH_LIST for a CUDA version."""
    v = parse_cuda_version(torch_cuda)
    for min_version, archs in DEFAULT_ARCH_LISTS:
        if v >= min_version:
            return archs
    return DEFAULT_ARCH_LISTS[-1][1]


def _arch_number(arch):
    m = re.match(r'(\d+)\.(\d+)', arch)
    return (int(m.group(1)), int(m.group(2))) if m else None


def split_arch_list(arch_list):
    """'8.0 9.0;9.0' -> ['8.0', '9.0', '9.0'] (torch accepts ' ' and ';')."""
    return [a for a in re.split(r'[;\s,]+', arch_list.strip()) if a]


def choose_arch_list(torch_cuda, capabilities, env):
    """TORCH_CUDA_ARCH_LIST for the mmcv build -> (arch_list, source).

    ``capabilities``: torch.cuda.get_device_capability(i) of each visible
    GPU. A non-empty TORCH_CUDA_ARCH_LIST in ``env`` wins ('native' means the
    visible GPUs); else the visible GPUs' archs, deduplicated and sorted;
    else default_arch_list(torch_cuda).
    """
    major = parse_cuda_version(torch_cuda)[0]
    override = (env.get('TORCH_CUDA_ARCH_LIST') or '').strip()
    gpus = sorted({(int(c[0]), int(c[1])) for c in capabilities})
    if override and override != 'native':
        archs = split_arch_list(override)
        source = 'TORCH_CUDA_ARCH_LIST from the environment'
    elif gpus:
        archs = ['%d.%d' % c for c in gpus]
        source = 'visible GPUs'
    elif override == 'native':
        raise SetupError(
            "TORCH_CUDA_ARCH_LIST=native but no GPU is visible: set the "
            "archs explicitly (e.g. TORCH_CUDA_ARCH_LIST='9.0') or unset it "
            "for the default list %r" % default_arch_list(torch_cuda))
    else:
        return default_arch_list(torch_cuda), (
            'default for CUDA %d (no GPU visible; override with '
            'TORCH_CUDA_ARCH_LIST)' % major)
    too_old = [a for a in archs if _arch_number(a) is not None
               and major in MIN_ARCH and _arch_number(a) < MIN_ARCH[major]]
    if too_old:
        fix = ('drop them from TORCH_CUDA_ARCH_LIST' if override
               and override != 'native' else
               'use a torch built with an older CUDA for these GPUs')
        raise SetupError(
            'CUDA %d cannot compile for %s (%s; CUDA %d supports %d.%d and '
            'newer): %s' % ((major, ';'.join(too_old), source, major)
                            + MIN_ARCH[major] + (fix, )))
    seen = []
    for a in archs:
        if a not in seen:
            seen.append(a)
    return ';'.join(seen), source


# --- cache key -------------------------------------------------------------------
def cache_key(torch_version, torch_cuda, arch_list=None):
    """Wheel cache folder name: 'torch-2.13.0-cpu' for a CPU torch (as
    before), 'torch-2.11.0-cu130-arch-7.5_8.0_9.0+PTX' for a CUDA torch (the
    arch list sorted, so '9.0;8.0' and '8.0 9.0' share one wheel)."""
    torch_version = torch_version.split('+')[0]
    flavour = torch_flavour(torch_cuda)
    if flavour == 'cpu':
        return 'torch-%s-cpu' % torch_version
    if not arch_list:
        raise SetupError('a CUDA build needs an arch list for its cache key')
    archs = sorted(set(split_arch_list(arch_list)),
                   key=lambda a: (_arch_number(a) or (999, 0), a))
    safe = re.sub(r'[^A-Za-z0-9.+_-]', '-', '_'.join(archs))
    return 'torch-%s-%s-arch-%s' % (torch_version, flavour, safe)


# --- toolkit ---------------------------------------------------------------------
class Toolkit:
    """An nvcc found on this machine (cuda_home/bin/nvcc)."""

    def __init__(self, cuda_home, version, source, notes=()):
        self.cuda_home, self.version = cuda_home, version
        self.source, self.notes = source, list(notes)

    def __repr__(self):
        return 'Toolkit(%r, %r, %r)' % (self.cuda_home, self.version,
                                        self.source)


class PipToolkit:
    """No usable nvcc: install these pip packages (CUDA 13+)."""

    def __init__(self, packages, notes=()):
        self.packages, self.notes = list(packages), list(notes)

    def __repr__(self):
        return 'PipToolkit(%r)' % (self.packages, )


def pip_toolkit_packages(torch_cuda):
    """['nvidia-cuda-nvcc==13.0.*', ...] pinned to torch's CUDA major.minor."""
    major, minor = parse_cuda_version(torch_cuda)
    return ['%s==%d.%d.*' % (p, major, minor) for p in PIP_TOOLKIT_PACKAGES]


def cuda12_install_hint(torch_cuda):
    """What to install when a CUDA <= 12 torch finds no matching nvcc."""
    major, minor = parse_cuda_version(torch_cuda)
    return (
        'install the CUDA %(v)s toolkit (nvcc, headers and libraries; it must '
        'be %(M)d.x, best %(v)s = torch.version.cuda) from NVIDIA -- apt/dnf '
        'package `cuda-toolkit-%(M)d-%(m)d` from NVIDIA\'s repository, or the '
        'runfile from https://developer.nvidia.com/cuda-toolkit-archive with '
        '`--silent --toolkit` (into /usr/local/cuda-%(v)s) -- or with conda: '
        '`conda install -c nvidia/label/cuda-%(v)s.0 cuda-toolkit` (or '
        '`cuda-nvcc=%(v)s` plus the CUDA %(v)s dev headers); then re-run with '
        'CUDA_HOME set to it (e.g. CUDA_HOME=/usr/local/cuda-%(v)s or '
        'CUDA_HOME=$CONDA_PREFIX) or its bin/ on PATH. pip cannot provide it: '
        'the CUDA %(M)d nvcc wheel ships no nvcc.'
        % dict(v='%d.%d' % (major, minor), M=major, m=minor))


def find_toolkit(torch_cuda, env, nvcc_on_path, is_file, nvcc_version_output,
                 pip_homes=()):
    """Choose the CUDA toolkit that compiles mmcv's CUDA ops.

    Candidates, first usable wins: ``CUDA_HOME`` (when it has bin/nvcc; a
    CUDA_HOME whose nvcc has another major version than torch's CUDA is an
    error), ``nvcc`` on PATH (CUDA_HOME = its parent's parent),
    ``/usr/local/cuda``, then an earlier pip-installed toolkit
    (``pip_homes``, e.g. site-packages/nvidia/cu13). Found toolkits whose
    major version differs from torch's are skipped (with a note). With none
    left: CUDA >= 13 -> PipToolkit (the matching pip packages); older CUDA
    -> SetupError saying what to install.

    A found toolkit needs include/cuda_runtime.h too: an nvcc on PATH that
    is a wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/
    bin/nvcc) gives a CUDA_HOME without headers and is skipped; an explicit
    CUDA_HOME without it is kept, with a note.

    ``nvcc_on_path``: shutil.which('nvcc') -- or a list: that path and its
    realpath -- or None; ``is_file(path)``; ``nvcc_version_output(nvcc)`` ->
    ``nvcc --version`` text or None.
    """
    want = parse_cuda_version(torch_cuda)
    if want is None:
        raise SetupError('find_toolkit needs a CUDA torch')
    notes = []
    candidates = []
    cuda_home = (env.get('CUDA_HOME') or '').strip()
    if cuda_home:
        if is_file(os.path.join(cuda_home, 'bin', 'nvcc')):
            candidates.append((cuda_home, 'CUDA_HOME'))
        else:
            notes.append('CUDA_HOME=%s has no bin/nvcc: ignored' % cuda_home)
    if isinstance(nvcc_on_path, str):
        nvcc_on_path = [nvcc_on_path]
    for nvcc in nvcc_on_path or ():
        candidates.append((os.path.dirname(os.path.dirname(nvcc)),
                           'nvcc on PATH (%s)' % nvcc))
    if is_file('/usr/local/cuda/bin/nvcc'):
        candidates.append(('/usr/local/cuda', '/usr/local/cuda'))
    for home in pip_homes:
        if is_file(os.path.join(home, 'bin', 'nvcc')):
            candidates.append((home, 'pip toolkit'))

    seen = set()
    for home, source in candidates:
        key = os.path.normpath(home)
        if key in seen:
            continue
        seen.add(key)
        nvcc = os.path.join(home, 'bin', 'nvcc')
        has_headers = is_file(os.path.join(home, 'include', 'cuda_runtime.h'))
        if not has_headers and source != 'CUDA_HOME':
            notes.append('%s: %s has no include/cuda_runtime.h: skipped' %
                         (source, home))
            continue
        if not has_headers:
            notes.append('CUDA_HOME=%s has no include/cuda_runtime.h: the '
                         'build may not find the CUDA headers' % home)
        got = parse_nvcc_version(nvcc_version_output(nvcc))
        if got is None:
            problem = '%s: `%s --version` gives no CUDA version' % (source,
                                                                     nvcc)
        elif got[0] != want[0]:
            problem = ('%s: nvcc %d.%d does not match torch.version.cuda=%s '
                       '(the major versions must be equal)' %
                       (source, got[0], got[1], torch_cuda))
        else:
            if got != want:
                notes.append('nvcc %d.%d vs torch CUDA %s: same major, '
                             'fine' % (got[0], got[1], torch_cuda))
            return Toolkit(home, '%d.%d' % got, source, notes)
        if source == 'CUDA_HOME':
            raise SetupError(
                'CUDA_HOME=%s is unusable -- %s. Point CUDA_HOME at a CUDA '
                '%d.x toolkit or unset it' % (cuda_home, problem, want[0]))
        notes.append(problem + ': skipped')

    if want[0] >= PIP_TOOLKIT_MIN_MAJOR:
        notes.append('no CUDA %d toolkit found (CUDA_HOME, nvcc on PATH, '
                     '/usr/local/cuda): installing it with pip' % want[0])
        return PipToolkit(pip_toolkit_packages(torch_cuda), notes)
    found = ''.join(' ' + n + '.' for n in notes)
    raise SetupError(
        'torch is built with CUDA %s and mmcv\'s CUDA ops need an nvcc of the '
        'same major version, but none was found (looked at CUDA_HOME, nvcc on '
        'PATH, /usr/local/cuda).%s To fix: %s' %
        (torch_cuda, found, cuda12_install_hint(torch_cuda)))


def pip_toolkit_home(torch_cuda, site_dirs, is_file):
    """site-packages/nvidia/cu<major> holding bin/nvcc, or None."""
    major = parse_cuda_version(torch_cuda)[0]
    for d in site_dirs:
        home = os.path.join(d, 'nvidia', 'cu%d' % major)
        if is_file(os.path.join(home, 'bin', 'nvcc')):
            return home
    return None


def find_libcudart(torch_cuda, runtime_files, site_dirs, listdir):
    """The versioned libcudart (libcudart.so.13) that CUDA torch's
    nvidia-cuda-runtime dependency installed.

    ``runtime_files``: absolute paths of the files of the installed
    nvidia-cuda-runtime distribution (None when it is not installed);
    ``site_dirs`` + ``listdir(dir)`` (-> names or []) are the fallback
    (site/nvidia/cu<major>/lib). Raises SetupError when there is none.
    """
    major = parse_cuda_version(torch_cuda)[0]
    pat = re.compile(r'libcudart\.so\.%d(\.\d+)*$' % major)
    hits = [f for f in (runtime_files or ())
            if pat.match(os.path.basename(f))]
    if not hits:
        for d in site_dirs:
            lib = os.path.join(d, 'nvidia', 'cu%d' % major, 'lib')
            hits += [os.path.join(lib, n) for n in sorted(listdir(lib))
                     if pat.match(n)]
    if not hits:
        raise SetupError(
            'no libcudart.so.%d found: the pip CUDA toolkit links against the '
            'CUDA runtime that a CUDA %s torch installs with the `%s` package, '
            'and it is missing (site dirs: %s). Reinstall the CUDA torch or '
            '`pip install "%s==%d.%d.*"`' %
            ((major, torch_cuda, CUDA_RUNTIME_DIST, ', '.join(site_dirs),
              CUDA_RUNTIME_DIST) + parse_cuda_version(torch_cuda)))
    return sorted(hits, key=len)[0]


# --- headers of the CUDA libraries --------------------------------------------------
# mmcv's CUDA sources include torch's ATen/cuda headers, which include the
# cuBLAS / cuSPARSE / cuSOLVER / cuRAND headers. A minimal toolkit (nvcc
# alone, as on this project's build machine) lacks them; a CUDA torch's
# nvidia-* wheels ship them (site-packages/nvidia/cu13/include for CUDA 13,
# nvidia/<library>/include for CUDA 12).
LIBRARY_HEADERS = {'cublas_v2.h': 'cublas', 'cusparse.h': 'cusparse',
                   'cusolverDn.h': 'cusolver', 'curand.h': 'curand'}


def extra_include_dirs(torch_cuda, toolkit_home, site_dirs, is_file):
    """Directories to add to the include path for the library headers the
    toolkit lacks -> (dirs, missing headers)."""
    major = parse_cuda_version(torch_cuda)[0]
    dirs, missing = [], []
    for header, library in sorted(LIBRARY_HEADERS.items()):
        if is_file(os.path.join(toolkit_home, 'include', header)):
            continue
        candidates = [os.path.join(d, 'nvidia', sub, 'include')
                      for d in site_dirs
                      for sub in ('cu%d' % major, library)]
        found = [c for c in candidates if is_file(os.path.join(c, header))]
        if not found:
            missing.append(header)
        elif found[0] not in dirs:
            dirs.append(found[0])
    return dirs, missing


# --- patching mmcv's setup.py ------------------------------------------------------
# mmcv 2.1.0's setup.py passes -std=c++17 to g++ and nvcc for every torch
# newer than 1.12.1; torch 2.14's headers need C++20 (ATen.h stops with
# "C++20 or later compatible compiler is required"). The only patch mmctx
# applies: the standard flag, nothing in mmcv's sources.
MMCV_STD_FLAG = "'-std=c++17'"
MMCV_STD_FLAG_COUNT = 3  # cxx (CUDA/CPU ext), cxx (MLU/MPS ext), nvcc


def cxx_standard(torch_version):
    """The C++ standard torch's headers need: 'c++20' from torch 2.14 on."""
    m = re.match(r'(\d+)\.(\d+)', torch_version)
    if not m:
        raise SetupError('cannot parse torch version %r' % (torch_version, ))
    return 'c++20' if (int(m.group(1)), int(m.group(2))) >= (2, 14) \
        else 'c++17'


def patch_mmcv_setup(text, standard):
    """mmcv 2.1.0's setup.py text with its '-std=c++17' flags replaced by
    ``-std=<standard>`` -> (new_text, number of flags changed). A text
    already patched to ``standard`` is returned as is (0 changes); one with
    neither flag is not mmcv 2.1.0's, a SetupError."""
    want = "'-std=%s'" % standard
    found = text.count(MMCV_STD_FLAG)
    if want == MMCV_STD_FLAG or (found == 0 and text.count(want)
                                 == MMCV_STD_FLAG_COUNT):
        return text, 0
    if found != MMCV_STD_FLAG_COUNT:
        raise SetupError(
            'mmcv setup.py has %d %s flags, %d expected (mmcv %s): cannot '
            'set the C++ standard to %s' % (found, MMCV_STD_FLAG,
                                            MMCV_STD_FLAG_COUNT, MMCV_VERSION,
                                            standard))
    return text.replace(MMCV_STD_FLAG, want), found


# --- which GPU code did the build produce? ---------------------------------------
# Kernels whose machine code must be in mmcv/_ext*.so for every built arch:
# the two ops every two-stage detector runs.
REQUIRED_KERNELS = ('nms_cuda', 'roi_align_forward_cuda_kernel')


def kernels_by_arch(cuobjdump_symbols):
    """``cuobjdump -symbols FILE`` text -> {'sm_90': {mangled symbols}} of
    its machine-code (ELF) sections; PTX sections are not machine code."""
    out, arch, elf = {}, None, False
    for line in cuobjdump_symbols.splitlines():
        if line.startswith('Fatbin '):
            elf, arch = line.startswith('Fatbin elf code'), None
            continue
        m = re.search(r'\barch = (sm_\d+a?)', line)
        if m:
            arch = m.group(1) if elf else None
            if arch:
                out.setdefault(arch, set())
            continue
        m = re.match(r'\s*STT_FUNC\s+\S+\s+\S+\s+(\S+)', line)
        if m and arch:
            out[arch].add(m.group(1))
    return out


def missing_kernels(by_arch, arch_list, kernels=REQUIRED_KERNELS):
    """['sm_90: nms_cuda', ...]: the required kernels with no machine code
    for an arch of ``arch_list`` ('9.0;8.0+PTX' -> sm_90, sm_80)."""
    missing = []
    for arch in split_arch_list(arch_list):
        num = _arch_number(arch)
        sm = 'sm_%d%d' % num
        symbols = by_arch.get(sm, set())
        for k in kernels:
            if not any(k in s for s in symbols):
                missing.append('%s: %s' % (sm, k))
    return missing


# --- is the installed mmcv acceptable? ----------------------------------------------
def mmcv_verdict(torch_cuda, facts):
    """(ok, reason) for an installed mmcv, from ``facts``:

    import_error (str or None), version, compiling_cuda
    (mmcv.ops.get_compiling_cuda_version(), 'not available' for a CPU-only
    build), gpu_count, gpu_error (str or None) and gpu_mismatches (names of
    the ops whose CUDA result differs from the CPU one).
    """
    if facts.get('import_error'):
        return False, 'mmcv / mmcv.ops does not work: %s' % facts[
            'import_error']
    if facts.get('version') != MMCV_VERSION:
        return False, 'mmcv %s installed, %s wanted' % (facts.get('version'),
                                                         MMCV_VERSION)
    want = parse_cuda_version(torch_cuda)
    if want is None:
        return True, 'mmcv %s with CPU ops' % MMCV_VERSION
    compiled = facts.get('compiling_cuda')
    if not compiled or compiled == 'not available':
        return False, (
            'mmcv %s has CPU-only ops (get_compiling_cuda_version() = %r) '
            'but torch is built with CUDA %s: on a GPU, detectors would fail '
            "with 'nms_impl: implementation for device cuda:0 not found'" %
            (MMCV_VERSION, compiled, torch_cuda))
    got = parse_cuda_version(compiled)
    if got[0] != want[0]:
        return False, ('mmcv ops compiled with CUDA %s, torch uses CUDA %s'
                       % (compiled, torch_cuda))
    if not facts.get('gpu_count'):
        return True, ('mmcv %s with CUDA %s ops (no GPU visible: CUDA nms / '
                      'roi_align not run)' % (MMCV_VERSION, compiled))
    if facts.get('gpu_error'):
        return False, 'mmcv CUDA ops fail on the GPU: %s' % facts['gpu_error']
    if facts.get('gpu_mismatches'):
        return False, ('mmcv CUDA ops differ from their CPU results: %s' %
                       ', '.join(facts['gpu_mismatches']))
    return True, ('mmcv %s with CUDA %s ops; nms and roi_align on %d GPU(s) '
                  'equal their CPU results' % (MMCV_VERSION, compiled,
                                               facts['gpu_count']))


# --- what the GPU machine lacks (tools/gpu/prepare.sh) ---------------------------
def normalize_name(name):
    """A distribution name as pip compares them ('Foo_bar' -> 'foo-bar')."""
    return re.sub(r'[-_.]+', '-', name).lower()


def requirement_closure(roots, requires, marker_ok):
    """Every distribution ``roots`` need, transitively, roots included.

    ``requires(name)`` -> that installed distribution's requirement strings
    (``importlib.metadata.requires``; None when it is not installed);
    ``marker_ok(requirement_string)`` -> whether it applies here (its
    environment marker, no extras). Returns normalised names, sorted.
    """
    seen, todo = set(), [normalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in requires(name) or ():
            if marker_ok(req):
                todo.append(normalize_name(
                    re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)', req).group(1)))
    return sorted(seen)


def read_name_list(text):
    """Names of a file like tools/gpu/preinstalled.txt (# comments)."""
    return {normalize_name(line.split('#')[0].strip())
            for line in text.splitlines() if line.split('#')[0].strip()}


# A requirement that another distribution of the same modules satisfies:
# mmcv and mmengine ask for opencv-python (GUI, ~60 MB); the headless build
# provides the same cv2.
SAME_MODULES = {'opencv-python': ('opencv-python-headless', )}


def to_carry(closure, preinstalled, built_here=('mmcv', 'mmctx', 'torch')):
    """The closure's distributions the other machine lacks (neither it nor
    a SAME_MODULES equivalent preinstalled), less the ones built here
    rather than downloaded."""
    skip = set(preinstalled) | {normalize_name(n) for n in built_here}
    skip |= {name for name, alts in SAME_MODULES.items()
             if any(a in preinstalled for a in alts)}
    return [n for n in closure if n not in skip]


# --- gathering the inputs (not pure: torch, files, subprocesses) -------------
def _torch_cuda(required=False):
    import torch
    if required and not torch.version.cuda:
        raise SetupError('torch %s is a CPU build: mmcv needs no CUDA toolkit'
                         % torch.__version__)
    return torch.version.cuda


def _visible_capabilities():
    import torch
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def _site_dirs():
    import site
    import sysconfig
    dirs = []
    try:
        import nvidia  # namespace package of the CUDA wheels
        dirs += [os.path.dirname(p) for p in nvidia.__path__]
    except ImportError:
        pass
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # old virtualenv
        pass
    dirs += [sysconfig.get_paths()[k] for k in ('purelib', 'platlib')]
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    out = []
    for d in dirs:
        if d and d not in out:
            out.append(d)
    return out


def _nvcc_version_output(nvcc):
    try:
        return subprocess.run([nvcc, '--version'], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _is_exe(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _is_file(path):
    """nvcc must be executable, headers just exist."""
    return _is_exe(path) if path.endswith('nvcc') else os.path.isfile(path)


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _runtime_files():
    try:
        from importlib import metadata
        dist = metadata.distribution(CUDA_RUNTIME_DIST)
    except Exception:  # not installed
        return None
    return [str(dist.locate_file(f)) for f in (dist.files or ())]


def collect_mmcv_facts():
    """Import mmcv and run its ops: the facts mmcv_verdict judges."""
    facts = {}
    try:
        import torch

        import mmcv
        facts['version'] = mmcv.__version__
        from mmcv.ops import get_compiling_cuda_version, nms, roi_align
        facts['compiling_cuda'] = get_compiling_cuda_version()
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(200, 2, generator=g) * 100
        wh = torch.rand(200, 2, generator=g) * 50 + 1
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(200, generator=g)
        feat = torch.rand(2, 4, 32, 40, generator=g)
        rois = torch.tensor([[0, 1.5, 2.5, 20.2, 17.8],
                             [1, 0.0, 0.0, 39.0, 31.0],
                             [0, 10.3, 4.1, 12.9, 30.6]])
        cpu_dets, cpu_keep = nms(boxes, scores, 0.5)
        cpu_roi = roi_align(feat, rois, (7, 7), 0.5, 2, 'avg', True)
    except Exception as e:  # noqa: BLE001 -- any failure is a verdict
        facts['import_error'] = '%s: %s' % (type(e).__name__, e)
        return facts
    facts['gpu_count'] = (torch.cuda.device_count()
                          if torch.version.cuda is not None
                          and torch.cuda.is_available() else 0)
    mism = []
    try:
        for i in range(facts['gpu_count']):
            dev = torch.device('cuda', i)
            dets, keep = nms(boxes.to(dev), scores.to(dev), 0.5)
            if not (torch.equal(keep.cpu(), cpu_keep) and torch.allclose(
                    dets.cpu(), cpu_dets, rtol=1e-5, atol=1e-5)):
                mism.append('nms on cuda:%d' % i)
            out = roi_align(feat.to(dev), rois.to(dev), (7, 7), 0.5, 2,
                            'avg', True)
            if not torch.allclose(out.cpu(), cpu_roi, rtol=1e-4, atol=1e-5):
                mism.append('roi_align on cuda:%d (max |diff| %.3g)' %
                            (i, (out.cpu() - cpu_roi).abs().max()))
    except Exception as e:  # noqa: BLE001
        facts['gpu_error'] = '%s: %s' % (type(e).__name__, e)
    facts['gpu_mismatches'] = mism
    return facts


# --- command line ------------------------------------------------------------------
def _emit(**values):
    for k, v in values.items():
        print('%s=%s' % (k, shlex.quote('' if v is None else str(v))))


def _note(msg):
    print('[setup_env] %s' % msg, file=sys.stderr)


def cmd_plan():
    import torch
    cuda = torch.version.cuda
    version = torch.__version__.split('+')[0]
    archs = source = ''
    if cuda:
        caps = _visible_capabilities()
        archs, source = choose_arch_list(cuda, caps, os.environ)
    _emit(TORCH_VERSION=version, TORCH_CUDA=cuda or '',
          TORCH_FLAVOUR=torch_flavour(cuda),
          PYTAG='cp%d%d' % sys.version_info[:2], ARCH_LIST=archs,
          ARCH_SOURCE=source, CACHE_KEY=cache_key(version, cuda, archs))


def cmd_toolkit():
    cuda = _torch_cuda(required=True)
    pip_homes = [h for h in [pip_toolkit_home(cuda, _site_dirs(), _is_exe)]
                 if h]
    which = shutil.which('nvcc')
    on_path = [which, os.path.realpath(which)] if which else []
    tk = find_toolkit(cuda, os.environ, on_path, _is_file,
                      _nvcc_version_output, pip_homes)
    for n in tk.notes:
        _note('cuda: ' + n)
    if isinstance(tk, PipToolkit):
        _emit(TOOLKIT_HOME='', TOOLKIT_SOURCE='pip',
              TOOLKIT_PIP=' '.join(tk.packages))
    else:
        _emit(TOOLKIT_HOME=tk.cuda_home, TOOLKIT_SOURCE=tk.source,
              TOOLKIT_NVCC=tk.version, TOOLKIT_PIP='')


def cmd_pip_toolkit_home():
    """After the pip install: CUDA_HOME = site-packages/nvidia/cu13, with a
    lib/libcudart.so link to the runtime's versioned libcudart."""
    cuda = _torch_cuda(required=True)
    sites = _site_dirs()
    home = pip_toolkit_home(cuda, sites, _is_exe)
    if home is None:
        raise SetupError('pip installed the CUDA toolkit packages but no '
                         'nvidia/cu%d/bin/nvcc is in %s' %
                         (parse_cuda_version(cuda)[0], ', '.join(sites)))
    got = parse_nvcc_version(_nvcc_version_output(
        os.path.join(home, 'bin', 'nvcc')))
    if got is None or got[0] != parse_cuda_version(cuda)[0]:
        raise SetupError('%s/bin/nvcc reports CUDA %s, torch uses %s' %
                         (home, got, cuda))
    target = find_libcudart(cuda, _runtime_files(), sites, _listdir)
    link = os.path.join(home, 'lib', 'libcudart.so')
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) or os.path.exists(link):
        if os.path.realpath(link) != os.path.realpath(target):
            os.remove(link)
    if not os.path.exists(link):
        os.symlink(target, link)
        _note('cuda: linked %s -> %s' % (link, target))
    _emit(TOOLKIT_HOME=home, TOOLKIT_NVCC='%d.%d' % got)


def cmd_include_dirs():
    """EXTRA_INCLUDES: ':'-joined header directories the toolkit at
    CUDA_HOME lacks (from the CUDA torch's nvidia-* wheels)."""
    cuda = _torch_cuda(required=True)
    dirs, missing = extra_include_dirs(cuda, os.environ['CUDA_HOME'],
                                       _site_dirs(), os.path.isfile)
    for d in dirs:
        _note('cuda: library headers from %s' % d)
    if missing:
        raise SetupError(
            'the CUDA library headers %s are neither in %s/include nor in '
            'the nvidia-* wheels of this environment: install the CUDA %s '
            'toolkit with its libraries, or reinstall the CUDA torch' %
            (', '.join(missing), os.environ['CUDA_HOME'], cuda))
    _emit(EXTRA_INCLUDES=':'.join(dirs))


def cmd_check_mmcv():
    cuda = _torch_cuda()
    ok, reason = mmcv_verdict(cuda, collect_mmcv_facts())
    print(reason)
    return 0 if ok else 1


def cmd_patch_mmcv(src):
    """Set mmcv's C++ standard to the one the installed torch needs."""
    import torch
    standard = cxx_standard(torch.__version__)
    path = os.path.join(src, 'setup.py')
    with open(path) as f:
        text = f.read()
    new, changed = patch_mmcv_setup(text, standard)
    if changed:
        with open(path, 'w') as f:
            f.write(new)
        _note('mmcv: setup.py patched: %d x -std=c++17 -> -std=%s (torch %s '
              'needs C++20)' % (changed, standard, torch.__version__))
    else:
        _note('mmcv: setup.py already builds with -std=%s' % standard)


def cmd_check_cuda_code():
    """Exit 0 when mmcv/_ext*.so holds machine code of REQUIRED_KERNELS for
    every arch in ARCH_LIST (the environment); prints what it found."""
    import glob
    import importlib.util
    spec = importlib.util.find_spec('mmcv')
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), '_ext*.so'))
    if not libs:
        raise SetupError('mmcv has no _ext*.so (built without ops?)')
    # nvcc's toolkit may come without cuobjdump (this machine's has none);
    # triton, a dependency of every CUDA torch on Linux, ships one
    candidates = [os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'),
                               'bin', 'cuobjdump'), shutil.which('cuobjdump')]
    triton = importlib.util.find_spec('triton')
    if triton is not None:
        candidates.append(os.path.join(os.path.dirname(triton.origin),
                                       'backends', 'nvidia', 'bin',
                                       'cuobjdump'))
    cuobjdump = next((c for c in candidates if c and _is_exe(c)), None)
    if not cuobjdump:
        raise SetupError('no cuobjdump in CUDA_HOME/bin, on PATH or in '
                         'triton: %s' % candidates)
    text = subprocess.run([cuobjdump, '-symbols', libs[0]],
                          capture_output=True, text=True, check=True).stdout
    by_arch = kernels_by_arch(text)
    missing = missing_kernels(by_arch, os.environ['ARCH_LIST'])
    print('%s: machine code for %s; %s' % (
        libs[0], ', '.join('%s (%d kernels)' % (a, len(s))
                           for a, s in sorted(by_arch.items())),
        'missing ' + ', '.join(missing) if missing else
        '%s present for every arch' % ' and '.join(REQUIRED_KERNELS)))
    return 1 if missing else 0


def cmd_carry_list(preinstalled_file):
    """``name==version`` of each distribution mmctx needs (transitively, in
    this environment) that is not in ``preinstalled_file``."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def requires(name):
        try:
            return metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            return None

    def marker_ok(req):
        marker = Requirement(req).marker
        return marker is None or marker.evaluate({'extra': ''})

    with open(preinstalled_file) as f:
        preinstalled = read_name_list(f.read())
    for name in to_carry(requirement_closure(['mmctx'], requires, marker_ok),
                         preinstalled):
        print('%s==%s' % (name, metadata.version(name)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmds = {'plan': cmd_plan, 'toolkit': cmd_toolkit,
            'pip-toolkit-home': cmd_pip_toolkit_home,
            'check-mmcv': cmd_check_mmcv,
            'check-cuda-code': cmd_check_cuda_code,
            'include-dirs': cmd_include_dirs}
    if len(argv) == 2 and argv[0] in ('patch-mmcv', 'carry-list'):
        try:
            return (cmd_patch_mmcv if argv[0] == 'patch-mmcv' else
                    cmd_carry_list)(argv[1]) or 0
        except SetupError as e:
            print('[setup_env] ERROR: %s' % e, file=sys.stderr)
            return 3
    if len(argv) != 1 or argv[0] not in cmds:
        print('usage: setup_helpers.py {%s} | patch-mmcv SRC | carry-list '
              'PREINSTALLED_FILE' %
              ','.join(cmds), file=sys.stderr)
        return 2
    try:
        return cmds[argv[0]]() or 0
    except SetupError as e:
        print('[setup_env] ERROR: %s' % e, file=sys.stderr)
        return 3


if __name__ == '__main__':
    sys.exit(main())
