#!/usr/bin/env bash
# Builds, on this machine, everything tools/gpu/check.sh needs on the GPU
# machine and that machine lacks (Python 3.12, torch 2.11.0+cu130, no package
# registry, at most 64 MiB carried with the working tree):
#
#   $BUNDLE/wheels/  mmcv 2.1.0 with CUDA ops for sm_90, built here against
#                    torch 2.11.0+cu130 for CPython 3.12; mmctx; mmengine,
#                    mmdet, mmsegmentation, mmpretrain and every dependency
#                    not in tools/gpu/preinstalled.txt
#   $BUNDLE/data/    a copy of ../shared/data (2.5 MB of COCO / ADE20K samples)
#
#   bash tools/gpu/prepare.sh    # then: device run, carry work_dirs/gpu_bundle,
#                                # command: bash tools/gpu/check.sh
#
# The first run creates a Python 3.12 venv with torch 2.11.0 (a CUDA 13.0
# build from PyPI, ~3 GB) and builds mmcv's CPU and CUDA ops in it through
# tools/setup_env.sh (~1 hour on 2 cores; cached, and resumed if stopped).
# Environment: BUNDLE (work_dirs/gpu_bundle), GPU_VENV, GPU_PYTHON
# (python3.12 from pyenv), GPU_TORCH (torch==2.11.0), TORCH_CUDA_ARCH_LIST
# (9.0: H100 / H200), MMCTX_CACHE, MAX_JOBS.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="${BUNDLE:-$REPO_ROOT/work_dirs/gpu_bundle}"
CACHE_ROOT="${MMCTX_CACHE:-$HOME/.cache/mmctx}"
GPU_TORCH="${GPU_TORCH:-torch==2.11.0}"
GPU_VENV="${GPU_VENV:-$CACHE_ROOT/venvs/gpu-cp312-${GPU_TORCH//=/}}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
LIMIT_MIB=64
log() { echo "[gpu_prepare] $*"; }
die() { echo "[gpu_prepare] ERROR: $*" >&2; exit 1; }

if [[ -z "${GPU_PYTHON:-}" ]]; then
    # python3.12 on PATH, else pyenv's (its shim fails unless 3.12 is selected)
    for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            GPU_PYTHON=$c; break
        fi
    done
fi
[[ -n "${GPU_PYTHON:-}" ]] || die "no Python 3.12 (set GPU_PYTHON): the GPU machine runs CPython 3.12"

# --- 1. a venv like the GPU machine's -------------------------------------------
if [[ ! -x "$GPU_VENV/bin/python" ]]; then
    log "venv $GPU_VENV ($("$GPU_PYTHON" -V)) + $GPU_TORCH (~3 GB download, a few minutes)"
    "$GPU_PYTHON" -m venv "$GPU_VENV"
    "$GPU_VENV/bin/python" -m pip install --disable-pip-version-check -q "$GPU_TORCH"
fi
PY="$GPU_VENV/bin/python"
"$PY" -c 'import torch; assert torch.version.cuda, torch.__version__; print("[gpu_prepare] torch", torch.__version__)'

# --- 2. mmcv with CUDA ops + the stack, through the normal set-up ----------------
log "tools/setup_env.sh in $GPU_VENV (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
PYTHON="$PY" bash "$REPO_ROOT/tools/setup_env.sh"

# --- 3. wheels -------------------------------------------------------------------
HELPER="$REPO_ROOT/tools/setup_helpers.py"
eval "$("$PY" "$HELPER" plan)"  # CACHE_KEY PYTAG ...
rm -rf "$BUNDLE/wheels" && mkdir -p "$BUNDLE/wheels"
MMCV_WHEEL=$(ls "$CACHE_ROOT/wheels/$CACHE_KEY"/mmcv-2.1.0-"$PYTAG"-*.whl | head -n1)
cp "$MMCV_WHEEL" "$BUNDLE/wheels/"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE/wheels" "$REPO_ROOT"
rm -rf "$REPO_ROOT/build"  # what the mmctx wheel build leaves
mapfile -t CARRY < <("$PY" "$HELPER" carry-list "$REPO_ROOT/tools/gpu/preinstalled.txt")
log "carrying ${#CARRY[@]} distributions besides mmcv and mmctx: ${CARRY[*]}"
for spec in "${CARRY[@]}"; do
    # a wheel for CPython 3.12 on manylinux x86-64 if there is one, else
    # build one here (pure-Python sdists such as mat4py)
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$BUNDLE/wheels" "$spec" 2>/dev/null \
        || "$PY" -m pip wheel -q --no-deps -w "$BUNDLE/wheels" "$spec" \
        || die "no wheel for $spec"
done

# --- 4. data ---------------------------------------------------------------------
SHARED_DATA="$REPO_ROOT/../shared/data"
[[ -d "$SHARED_DATA" ]] || die "$SHARED_DATA is missing"
rm -rf "$BUNDLE/data" && cp -r "$SHARED_DATA" "$BUNDLE/data"

# --- 5. does it fit? ---------------------------------------------------------------
BUNDLE_KIB=$(du -sk "$BUNDLE" | cut -f1)
TREE_KIB=$(cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -n1 | cut -f1)
ls -l "$BUNDLE/wheels" | awk 'NR > 1 {printf "[gpu_prepare]   %8.1f KiB  %s\n", $5 / 1024, $9}'
log "bundle $((BUNDLE_KIB / 1024)) MiB + working tree $((TREE_KIB / 1024)) MiB of the $LIMIT_MIB MiB that may travel"
(( BUNDLE_KIB + TREE_KIB <= LIMIT_MIB * 1024 )) || die "over $LIMIT_MIB MiB"
log "ready: device run with carry=['${BUNDLE#$REPO_ROOT/}'], command 'bash tools/gpu/check.sh'"
