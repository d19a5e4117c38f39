#!/usr/bin/env bash
# The GPU check: one command, run from the repository root on the GPU machine
# with the folder tools/gpu/prepare.sh wrote carried along; results under
# $OUT. Steps (each timed, its result in $OUT/summary.md; a failed step does
# not stop the next):
#   1. install the carried wheels without a registry (pip --no-index) and
#      check mmcv: CUDA nms and roi_align equal their CPU results
#   2. pytest -m gpu: every backbone's forward and backward on CUDA equal to
#      the CPU, float16 / bfloat16 autocast training steps, channels_last,
#      torch.compile (tests/test_gpu.py)
#   3. Faster R-CNN SB-R50: tools/dist_train.sh CONFIG 1 (NCCL, the users'
#      launcher) with AmpOptimWrapper on the carried COCO samples at
#      1333x800, then tools/test.py on its checkpoint (COCO box AP)
#   4. the throughput table (tools/analysis/throughput.py) in the time left
#
#   bash tools/gpu/check.sh          # on the GPU machine (~10 minutes)
#   bash tools/gpu/check.sh --cpu    # CPU mode, what CI runs: the same steps
#       on the CPU, tiny (tests on MMCTX_TEST_DEVICE=cpu, 2 training
#       iterations with OptimWrapper -- AmpOptimWrapper needs a GPU --, a
#       64x64 float32 throughput run, compiled with backend 'eager': CPUs
#       run bfloat16 convolutions slowly)
#
# Environment: BUNDLE (work_dirs/gpu_bundle), OUT (work_dirs/gpu_check),
# CHECK_SECONDS (570: the throughput step gets what the others leave),
# PYTHON (python3).
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
BUNDLE="${BUNDLE:-$REPO_ROOT/work_dirs/gpu_bundle}"
OUT="${OUT:-$REPO_ROOT/work_dirs/gpu_check}"
PYTHON="${PYTHON:-python3}"
CHECK_SECONDS="${CHECK_SECONDS:-570}"
START=$(date +%s)
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the result
    local name=$1 t0=$(date +%s) rc
    shift
    log "$name: $*"
    "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    echo "| $name | $([[ $rc == 0 ]] && echo ok || echo "FAILED ($rc)") | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
    [[ $rc == 0 ]] || FAILED=1
    log "$name: exit $rc"
    return $rc
}
{
    echo "# GPU check ($MODE mode)"; echo
    echo "Command: \`bash tools/gpu/check.sh${1:+ $1}\` on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC')"; echo
    nvidia-smi -L 2>/dev/null | sed 's/^/- /' || true
    echo; echo "| step | result | time |"; echo "|---|---|---|"
} > "$SUMMARY"

# --- 1. install -------------------------------------------------------------------
SITE="$OUT/site"
rm -rf "$SITE"
install_bundle() {
    [[ -d "$BUNDLE/wheels" ]] || { echo "no $BUNDLE/wheels: run tools/gpu/prepare.sh here first"; return 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$BUNDLE"/wheels/*.whl || return 1
    # from another folder, so that mmctx comes from the installed wheel
    (cd / && PYTHONPATH="$SITE" "$PYTHON" - <<'PY'
import sys
import torch, mmcv, mmengine, mmdet, mmseg, mmpretrain, mmctx
from mmcv.ops import get_compiling_cuda_version
print('python', sys.version.split()[0], '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '| GPU',
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print('mmcv', mmcv.__version__, 'ops CUDA', get_compiling_cuda_version(),
      '| mmengine', mmengine.__version__, '| mmdet', mmdet.__version__,
      '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__,
      '| mmctx', mmctx.__version__, 'from', mmctx.__file__)
PY
    ) || return 1
    PYTHONPATH="$SITE" "$PYTHON" tools/setup_helpers.py check-mmcv
}
step install install_bundle
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# --- 2. pytest -m gpu ------------------------------------------------------------
if [[ $MODE == cpu ]]; then export MMCTX_TEST_DEVICE=cpu; fi
step pytest_gpu "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

# --- 3. Faster R-CNN SB-R50: train with the users' launcher, then test -----------
DATA="$BUNDLE/data"
[[ -d "$DATA" ]] || DATA="$REPO_ROOT/../shared/data"
CONFIG=configs/faster_rcnn_sb_r50.py
WORK="$OUT/faster_rcnn_sb_r50"
mapfile -t DET_OPTS < <("$PYTHON" - "$DATA/tiny_coco" "$MODE" <<'PY'
import sys
sys.path.insert(0, 'tests')
from config_overrides import cli_options, det_options, load_config

root, mode = sys.argv[1], sys.argv[2]
cfg = load_config('faster_rcnn_sb_r50')
if mode == 'gpu':  # all 16 images at the config's own 1333x800, AMP
    opts = det_options(cfg, data_root=root, scale=(1333, 800),
                       train_images=16, val_images=4, test_images=16)
    opts['optim_wrapper.type'] = 'AmpOptimWrapper'
else:
    opts = det_options(cfg, data_root=root)
print('\n'.join(cli_options(opts)))
PY
)
train_and_test() {
    rm -rf "$WORK"
    PORT=${PORT:-29511} bash tools/dist_train.sh "$CONFIG" 1 --work-dir "$WORK" "${DET_OPTS[@]}" || return 1
    local ckpt
    ckpt=$(cat "$WORK/last_checkpoint") || return 1
    "$PYTHON" tools/test.py "$CONFIG" "$ckpt" --work-dir "$WORK/test" "${DET_OPTS[@]}" || return 1
    grep -h "coco/bbox_mAP" "$WORK"/test/*/*.log | tail -n1
}
step faster_rcnn train_and_test

# --- 4. throughput in the time left ------------------------------------------------
LEFT=$(( CHECK_SECONDS - ($(date +%s) - START) ))
if [[ $MODE == gpu ]]; then
    # compiled rows start only while 100 s are left for them to finish
    step throughput timeout $(( LEFT > 30 ? LEFT : 30 )) "$PYTHON" tools/analysis/throughput.py \
        --device cuda --budget $(( LEFT - 100 > 0 ? LEFT - 100 : 0 )) --out "$OUT/throughput.md"
else
    step throughput "$PYTHON" tools/analysis/throughput.py --device cpu \
        --size 64x64x2 --models R50 SB-R50 --precisions fp32 \
        --warmup 1 --repeats 1 --compile-backend eager --out "$OUT/throughput.md"
fi

echo >> "$SUMMARY"
[[ -f "$OUT/throughput.md" ]] && sed 's/^#/##/' "$OUT/throughput.md" >> "$SUMMARY"
log "done in $(( $(date +%s) - START )) s; summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
