#!/usr/bin/env bash
# Set up the mmctx stack in the active Python environment ($PYTHON, default
# python3): torch (kept if present), mmcv 2.1.0 with compiled ops (built once
# per torch version -- and, for a CUDA torch, CUDA version and GPU arch list --
# and cached outside the repo), mmengine/mmdet/mmseg/mmpretrain and
# `pip install -e .`. Idempotent: a second run only checks.
#
#   PYTHON=/path/to/venv/bin/python bash tools/setup_env.sh
#
# Environment: PYTHON (python3), MMCTX_CACHE ($HOME/.cache/mmctx),
# TORCH_SPEC (torch==2.13.0, used only when no torch is installed),
# MAX_JOBS (parallel compile jobs for the mmcv build).
# With a CUDA torch, mmcv's ops are built with CUDA (FORCE_CUDA=1):
# TORCH_CUDA_ARCH_LIST (default: the visible GPUs' archs, else a list per CUDA
# version), CUDA_HOME (else nvcc on PATH, else /usr/local/cuda, else -- CUDA 13
# only -- the pip toolkit). The decisions live in tools/setup_helpers.py.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
MMCV_VERSION=2.1.0
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CACHE_ROOT="${MMCTX_CACHE:-$HOME/.cache/mmctx}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)

log() { echo "[setup_env] $*"; }
die() { echo "[setup_env] ERROR: $*" >&2; exit 1; }
trap 'echo "[setup_env] ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

PIP=("$PYTHON" -m pip --disable-pip-version-check)

# --- 0. interpreter ---------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 8)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); mmctx needs Python >= 3.8"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is not available for $PYTHON"
log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# --- 1. torch: keep whatever is installed -----------------------------------
if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    log "torch: keeping installed $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    log "torch: none installed -> pip install $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC" || die "could not install $TORCH_SPEC"
fi
HELPER="$REPO_ROOT/tools/setup_helpers.py"
PLAN=$("$PYTHON" "$HELPER" plan) || die "could not plan the mmcv build (above)"
eval "$PLAN"  # TORCH_VERSION TORCH_CUDA TORCH_FLAVOUR PYTAG ARCH_LIST ARCH_SOURCE CACHE_KEY
log "torch: $TORCH_VERSION ($TORCH_FLAVOUR), python tag $PYTAG"
if [[ -n "$TORCH_CUDA" ]]; then
    log "cuda: mmcv ops for CUDA $TORCH_CUDA, TORCH_CUDA_ARCH_LIST='$ARCH_LIST' ($ARCH_SOURCE), cache key $CACHE_KEY"
fi

# --- 2. build dependencies for mmcv -----------------------------------------
# mmcv's setup.py imports pkg_resources (gone in setuptools 82); torch 2.13
# wants setuptools >= 77.
if "$PYTHON" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md
v = tuple(int(x) for x in md.version('setuptools').split('.')[:2])
assert (77, 0) <= v < (82, 0), v
import wheel, ninja  # noqa: F401
PY
then
    log "build deps: setuptools/wheel/ninja already fine"
else
    log "build deps: pip install 'setuptools>=77,<82' wheel ninja"
    "${PIP[@]}" install 'setuptools>=77,<82' wheel ninja
fi

# --- 3. mmcv 2.1.0 with ops -------------------------------------------------
# tools/setup_helpers.py check-mmcv: mmcv $MMCV_VERSION whose ops import and
# run; under a CUDA torch also CUDA ops (not a CPU-only build) whose nms and
# roi_align on every visible GPU equal their CPU results.
mmcv_ok() {  # mmcv_ok [verbose]
    local out
    if out=$("$PYTHON" "$HELPER" check-mmcv 2>&1); then
        MMCV_STATUS=$(echo "$out" | tail -n 1)
        return 0
    fi
    [[ -n "${1:-}" ]] && echo "$out" | tail -n 5 | sed 's/^/[setup_env]   /' >&2
    return 1
}
# the CUDA toolkit that builds mmcv's CUDA ops: exports CUDA_HOME
find_cuda_toolkit() {
    local found
    found=$("$PYTHON" "$HELPER" toolkit) || die "no usable CUDA toolkit (above)"
    eval "$found"  # TOOLKIT_HOME TOOLKIT_SOURCE TOOLKIT_NVCC TOOLKIT_PIP
    if [[ -n "$TOOLKIT_PIP" ]]; then
        local pkgs
        read -r -a pkgs <<<"$TOOLKIT_PIP"  # no globbing of the '==13.0.*' specs
        log "cuda: pip install ${pkgs[*]}"
        "${PIP[@]}" install "${pkgs[@]}" \
            || die "could not pip install the CUDA $TORCH_CUDA toolkit ($TOOLKIT_PIP); without a package registry install the CUDA ${TORCH_CUDA%%.*}.x toolkit from NVIDIA and set CUDA_HOME"
        found=$("$PYTHON" "$HELPER" pip-toolkit-home) || die "the pip CUDA toolkit is unusable (above)"
        eval "$found"
    fi
    export CUDA_HOME="$TOOLKIT_HOME"
    log "cuda: toolkit CUDA_HOME=$CUDA_HOME (nvcc $TOOLKIT_NVCC, from $TOOLKIT_SOURCE)"
}
WHEEL_DIR="$CACHE_ROOT/wheels/$CACHE_KEY"
if mmcv_ok; then
    log "mmcv: already installed and fine: $MMCV_STATUS"
else
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-$PYTAG-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$WHEEL" ]]; then
        log "mmcv: no cached wheel in $WHEEL_DIR -> building mmcv $MMCV_VERSION with ops from source"
        # the interpreter's bin/ first: torch builds with ninja (parallel,
        # resumable) only if `ninja` is on PATH, and a venv's is not unless
        # the venv is activated
        PY_BIN=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')
        BUILD_ENV=(MMCV_WITH_OPS=1 "PATH=$PY_BIN:$PATH")
        if [[ -n "$TORCH_CUDA" ]]; then
            find_cuda_toolkit
            BUILD_ENV+=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$ARCH_LIST" "CUDA_HOME=$CUDA_HOME"
                        "PATH=$PY_BIN:$CUDA_HOME/bin:$PATH")
            INCLUDES=$("$PYTHON" "$HELPER" include-dirs) || die "CUDA library headers missing (above)"
            eval "$INCLUDES"  # EXTRA_INCLUDES
            if [[ -n "$EXTRA_INCLUDES" ]]; then
                # g++ reads CPATH; nvcc preprocesses with it too
                BUILD_ENV+=("CPATH=$EXTRA_INCLUDES${CPATH:+:$CPATH}")
            fi
            log "mmcv: building CPU and CUDA ops for $ARCH_LIST: much longer than the ~10 min CPU-only build, growing with the number of archs (MAX_JOBS sets the parallel jobs)"
        else
            log "mmcv: this takes ~10 minutes on 2 cores (once per torch version)"
        fi
        # The source tree lives in the cache, so an interrupted or failed build
        # resumes where it stopped (ninja rebuilds only what is out of date).
        SRC_PARENT="$CACHE_ROOT/build/$CACHE_KEY"
        SRC="$SRC_PARENT/mmcv-$MMCV_VERSION"
        if [[ ! -f "$SRC/setup.py" ]]; then
            mkdir -p "$SRC_PARENT"
            "${PIP[@]}" download --no-deps --no-binary :all: --no-cache-dir \
                -d "$SRC_PARENT" "mmcv==$MMCV_VERSION" >/dev/null \
                || die "could not download the mmcv $MMCV_VERSION source"
            tar -xzf "$SRC_PARENT/mmcv-$MMCV_VERSION.tar.gz" -C "$SRC_PARENT"
        fi
        log "mmcv: source in $SRC"
        "$PYTHON" "$HELPER" patch-mmcv "$SRC" || die "could not patch $SRC/setup.py (above)"
        mkdir -p "$WHEEL_DIR"
        BUILD_TMP=$(mktemp -d)
        BUILD_START=$(date +%s)
        # setup.py itself, not `pip wheel`: pip deletes build/ after a
        # failure, and with it the objects a rerun would reuse
        (cd "$SRC" && env "${BUILD_ENV[@]}" "$PYTHON" setup.py -q bdist_wheel -d "$BUILD_TMP") \
            || die "mmcv $MMCV_VERSION build failed (see the compiler output above); rerunning resumes it"
        log "mmcv: built in $(( $(date +%s) - BUILD_START )) s"
        mv "$BUILD_TMP"/mmcv-*.whl "$WHEEL_DIR"/
        rm -rf "$BUILD_TMP"
        WHEEL=$(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-$PYTAG-*.whl | head -n1)
    else
        log "mmcv: using cached wheel $WHEEL"
    fi
    # mmcv's own requirements (mmengine, numpy, opencv, ...) never include
    # torch, so installing them with the wheel keeps the torch we have
    log "mmcv: pip install $WHEEL (+ its requirements: mmengine, numpy, opencv, ...)"
    "${PIP[@]}" install --force-reinstall --no-deps "$WHEEL"
    "${PIP[@]}" install "$WHEEL"
    mmcv_ok verbose || die "mmcv installed from $WHEEL is not acceptable (reason above); delete $WHEEL to rebuild it"
    log "mmcv: $MMCV_STATUS"
fi
if [[ -n "$TORCH_CUDA" ]]; then
    # the GPU code itself: machine code of nms and roi_align for every arch
    CODE=$(ARCH_LIST="$ARCH_LIST" "$PYTHON" "$HELPER" check-cuda-code) \
        || die "mmcv's CUDA code is incomplete: $CODE"
    log "mmcv: $CODE"
fi

# --- 4. the rest + mmctx (editable) ------------------------------------------
# --no-build-isolation: use the setuptools installed above instead of fetching
# one into an isolated env. mmcv==2.1.0 is already satisfied, so pip does not
# try to build it.
log "mmctx: pip install -e $REPO_ROOT[tests] (mmengine, mmdet, mmseg, mmpretrain, pytest, ...)"
PIP_LOG=$(mktemp)
if ! "${PIP[@]}" install --no-build-isolation -e "$REPO_ROOT[tests]" >"$PIP_LOG" 2>&1; then
    cat "$PIP_LOG" >&2
    die "pip install -e $REPO_ROOT failed (output above)"
fi
grep -v -e '^Requirement already satisfied' -e '^Looking in' -e '^Obtaining' \
    -e '^  ' -e '^WARNING: Location' -e "^WARNING: Running pip as the 'root'" \
    "$PIP_LOG" | sed 's/^/[setup_env]   pip: /' || true
rm -f "$PIP_LOG"

# --- 5. sanity ---------------------------------------------------------------
"$PYTHON" - <<'PY' || die "sanity check failed: the stack does not import"
import sys
import torch, mmcv, mmengine, mmdet, mmseg, mmpretrain, mmctx  # noqa: F401
from mmcv.ops import RoIAlign, nms  # noqa: F401
# log plotting (analyze_logs.py plot_curve) and mmengine's TensorBoard backend
import matplotlib, seaborn  # noqa: F401,E401
from torch.utils.tensorboard import SummaryWriter  # noqa: F401
# ONNX export (tools/deployment/export_onnx.py)
import onnx, onnxscript, onnxruntime  # noqa: F401,E401
assert 'torchvision' not in sys.modules, 'something imported torchvision'
print('[setup_env] ok: torch %s, mmcv %s, mmengine %s, mmdet %s, mmseg %s, '
      'mmpretrain %s' % (torch.__version__, mmcv.__version__,
                         mmengine.__version__, mmdet.__version__,
                         mmseg.__version__, mmpretrain.__version__))
PY
log "done in $(( $(date +%s) - START ))s"
