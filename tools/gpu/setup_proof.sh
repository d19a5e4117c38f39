#!/usr/bin/env bash
# Proves, on a machine without a GPU, that `make setup` builds mmcv 2.1.0 with
# CUDA ops: a fresh venv with the CUDA build of torch, then tools/setup_env.sh
# with FORCE_CUDA for one arch. setup_env.sh itself checks the result
# (mmcv.ops imports, get_compiling_cuda_version() is torch's CUDA major,
# cuobjdump lists machine code of nms and roi_align for the arch).
#
#   bash tools/gpu/setup_proof.sh              # make cuda-proof
#   REBUILD=1 bash tools/gpu/setup_proof.sh    # drop the cached wheel first
#
# Environment: PROOF_DIR (work_dirs/cuda_proof): venv + log; PROOF_VENV
# (PROOF_DIR/venv); PROOF_PYTHON
# (python3.11: the interpreter the local torch wheels are for); TORCH_SPEC
# (torch==2.14.1, a CUDA 13 build); TORCH_CUDA_ARCH_LIST (9.0); MAX_JOBS.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROOF_DIR="${PROOF_DIR:-$REPO_ROOT/work_dirs/cuda_proof}"
PROOF_PYTHON="${PROOF_PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
CACHE_ROOT="${MMCTX_CACHE:-$HOME/.cache/mmctx}"
VENV="${PROOF_VENV:-$PROOF_DIR/venv}"
log() { echo "[cuda_proof] $*"; }

mkdir -p "$PROOF_DIR"
if [[ ! -x "$VENV/bin/python" ]]; then
    log "venv $VENV ($PROOF_PYTHON) + $TORCH_SPEC (a CUDA build, ~5.5 GB; a few minutes)"
    "$PROOF_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$TORCH_SPEC"
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, sys; assert torch.version.cuda, "torch is a CPU build"; print("[cuda_proof] torch", torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())'
if [[ -n "${REBUILD:-}" ]]; then
    KEY=$(cd "$REPO_ROOT" && "$PY" tools/setup_helpers.py plan | sed -n "s/^CACHE_KEY=//p" | tr -d "'")
    log "REBUILD: removing $CACHE_ROOT/wheels/$KEY and $CACHE_ROOT/build/$KEY"
    rm -rf "$CACHE_ROOT/wheels/$KEY" "$CACHE_ROOT/build/$KEY"
    "$PY" -m pip uninstall -y -q mmcv 2>/dev/null || true
fi
log "make setup PYTHON=$PY TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (log: $PROOF_DIR/setup.log)"
START=$(date +%s)
make -C "$REPO_ROOT" setup PYTHON="$PY" 2>&1 | tee "$PROOF_DIR/setup.log"
log "make setup finished in $(( $(date +%s) - START )) s"
