#!/usr/bin/env bash
# Set up the mmctx stack in the active Python environment ($PYTHON, default
# python3): torch (kept if present), mmcv 2.1.0 with compiled ops (built once
# per torch version and cached outside the repo), mmengine/mmdet/mmseg/
# mmpretrain and `pip install -e .`. Idempotent: a second run only checks.
#
#   PYTHON=/path/to/venv/bin/python bash tools/setup_env.sh
#
# Environment: PYTHON (python3), MMCTX_CACHE ($HOME/.cache/mmctx),
# TORCH_SPEC (torch==2.13.0, used only when no torch is installed),
# MAX_JOBS (parallel compile jobs for the mmcv build).
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
read -r TORCH_VERSION TORCH_FLAVOUR PYTAG < <("$PYTHON" - <<'PY'
import sys, torch
cuda = torch.version.cuda
print(torch.__version__.split('+')[0],
      'cu' + cuda.replace('.', '') if cuda else 'cpu',
      'cp%d%d' % sys.version_info[:2])
PY
)
log "torch: $TORCH_VERSION ($TORCH_FLAVOUR), python tag $PYTAG"

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
mmcv_ok() {  # mmcv_ok [verbose]: is mmcv $MMCV_VERSION with working ops importable?
    local out
    if out=$("$PYTHON" - 2>&1 <<PY
import mmcv
assert mmcv.__version__ == '$MMCV_VERSION', 'mmcv ' + mmcv.__version__
import torch
from mmcv.ops import nms
nms(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([1.]), 0.5)
PY
    ); then
        return 0
    fi
    [[ -n "${1:-}" ]] && echo "$out" | tail -n 5 >&2
    return 1
}
WHEEL_DIR="$CACHE_ROOT/wheels/torch-$TORCH_VERSION-$TORCH_FLAVOUR"
if mmcv_ok; then
    log "mmcv: $MMCV_VERSION with working ops already installed"
else
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-$PYTAG-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$WHEEL" ]]; then
        log "mmcv: no cached wheel in $WHEEL_DIR -> building mmcv $MMCV_VERSION with ops from source"
        log "mmcv: this takes ~10 minutes on 2 cores (once per torch version)"
        mkdir -p "$WHEEL_DIR"
        BUILD_TMP=$(mktemp -d)
        MMCV_WITH_OPS=1 "${PIP[@]}" wheel --no-build-isolation --no-deps --no-cache-dir \
            -w "$BUILD_TMP" "mmcv==$MMCV_VERSION" \
            || die "mmcv $MMCV_VERSION build failed (see the compiler output above)"
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
    mmcv_ok verbose || die "mmcv installed from $WHEEL but 'from mmcv.ops import nms' fails (error above); delete $WHEEL to rebuild it"
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
assert 'torchvision' not in sys.modules, 'something imported torchvision'
print('[setup_env] ok: torch %s, mmcv %s, mmengine %s, mmdet %s, mmseg %s, '
      'mmpretrain %s' % (torch.__version__, mmcv.__version__,
                         mmengine.__version__, mmdet.__version__,
                         mmseg.__version__, mmpretrain.__version__))
PY
log "done in $(( $(date +%s) - START ))s"
