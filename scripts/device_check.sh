#!/usr/bin/env bash
# GPU checks in one go, on a machine with a CUDA GPU and no network (run from the repository root):
#
#   bash scripts/device_check.sh
#
# 1. installs the wheels in .whl/ (what that machine lacks: diffusers, jsonargparse + docstring-parser +
#    typeshed-client, omegaconf, importlib_metadata + lazy-importer) into /tmp/site, no index, no deps.
#    Fill .whl/ where pip can reach PyPI, one wheel per package, at the versions of your .venv, e.g.:
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
#    (every wheel needed is pure Python); without .whl/ the script uses what the machine has;
# 2. prints the GPU and the versions;
# 3. runs each step with its own timeout, its output tee'd into $OUT/<step>.log (OUT defaults to
#    outputs/device): `gpu_tests` (pytest -m gpu tests/test_gpu.py), `co_pca` (benchmarks/co_pca.py),
#    `throughput` (benchmarks/throughput.py on cuda: SD-1.5-sized and DINOv2-B-sized random weights at the paper's resolution, fp32/fp16/bf16,
#    report in $OUT/throughput_gpu.json) and `projection` (train.py fit with tiny models on the GPU, then
#    evaluate.py with its checkpoint).
# Every step runs even when an earlier one fails; the script ends with one line per step and exits non-zero
# if any failed. Budget: at most 180 s + 270 s for the two steps, about 8 minutes in all.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT="${OUT:-outputs/device}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"  # PYTHON=... for a dry run elsewhere

declare -a NAMES=() CODES=() SECONDS_TAKEN=()

record() {  # name code seconds
    NAMES+=("$1"); CODES+=("$2"); SECONDS_TAKEN+=("$3")
}

# ------------------------------------------------------------------------------------------------ wheels
start=$SECONDS
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee "$OUT/install.log"
    code=${PIPESTATUS[0]}
    if [ "$code" != 0 ]; then  # no pip there: every wheel here is pure Python, so unpacking it is installing it
        echo "pip install failed (exit $code): unpacking the wheels instead" | tee -a "$OUT/install.log"
        code=0
        for wheel in .whl/*.whl; do
            $PY -m zipfile -e "$wheel" /tmp/site 2>&1 | tee -a "$OUT/install.log"
            [ "${PIPESTATUS[0]}" = 0 ] || code=1
        done
    fi
else
    echo "no .whl/*.whl here: relying on what is installed" | tee "$OUT/install.log"
    code=0
fi
record install "$code" $((SECONDS - start))
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ----------------------------------------------------------------------------------------------- versions
{
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $PY - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "lightning", "torchmetrics", "diffusers", "transformers", "huggingface_hub", "safetensors",
             "jsonargparse", "omegaconf", "numpy"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}  ({module.__file__})")
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"{name}: IMPORT FAILED: {type(err).__name__}: {err}")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
sys.exit(0 if torch.cuda.is_available() else 3)  # without CUDA the gpu tests would only skip
EOF
} 2>&1 | tee "$OUT/versions.log"
record versions "${PIPESTATUS[0]}" 0

# ------------------------------------------------------------------------------------------------ steps
run_step() {  # name timeout_s command...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (timeout ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    record "$name" "$code" $((SECONDS - t0))
    echo "=== $name: exit $code after $((SECONDS - t0)) s"
}

run_step gpu_tests 180 $PY -m pytest -q -p no:cacheprovider -m gpu -rA --durations=10 tests/test_gpu.py
run_step co_pca 60 $PY benchmarks/co_pca.py --device cuda
run_step throughput 270 $PY benchmarks/throughput.py --device cuda --categories 2 --images 4 --pairs-per-image 3 \
    --out "$OUT/throughput_gpu.json"
projection_on_gpu() {  # train.py fit (tiny models, generated trn/val/test), then evaluate.py with the checkpoint
    local root=/tmp/device_spair run=/tmp/device_train
    $PY -c "
from datamodules import write_synthetic_spair
for split, pairs in (('trn', 8), ('val', 3), ('test', 3)):
    write_synthetic_spair('$root', pairs_per_category=pairs, split=split)" || return 1
    $PY train.py fit --config configs/projection/sd_dinov2_b.yaml --config configs/overlays/tiny.yaml --data.root $root \
        --data.init_args.num_workers 0 --data.init_args.val_pairs_per_category null --trainer.accelerator gpu \
        --trainer.max_epochs 2 --trainer.default_root_dir $run --model.pipeline.feature_cache_dir null || return 1
    $PY evaluate.py test --config configs/spair.yaml --config configs/overlays/tiny.yaml --data.root $root \
        --data.num_workers 0 --trainer.accelerator gpu --trainer.default_root_dir $run/eval \
        --model.pipeline.projection_ckpt $run/checkpoints/last.ckpt || return 1
    cp $run/eval/results.json "$OUT/projection_eval_results.json"
}
run_step projection 120 bash -c "$(declare -f projection_on_gpu); PY=$PY OUT=$OUT projection_on_gpu"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$OUT/versions.log"

# ------------------------------------------------------------------------------------------------ summary
echo
echo "=== summary ($OUT)"
failed=0
for i in "${!NAMES[@]}"; do
    code=${CODES[$i]}
    case $code in
        0) verdict=ok ;;
        124 | 137) verdict="TIMEOUT (exit $code)" ;;
        *) verdict="FAILED (exit $code)" ;;
    esac
    [ "$code" = 0 ] || failed=1
    printf '%-12s %-22s %4s s\n' "${NAMES[$i]}" "$verdict" "${SECONDS_TAKEN[$i]}" | tee -a "$OUT/summary.txt"
done
exit $failed
