#!/usr/bin/env bash
# One short, prepared check of the CUDA/nccl path, for a session that has a GPU machine lent.
# Run from the repo root on the GPU machine: bash tests/gpu/check.sh  (results under $OUT or /tmp/gpu-check)
# It installs a CUDA build of torch into its own venv, trains on 1 GPU with nccl, kills it mid-run,
# checks the resume is bit-exact, and measures checkpoint stall / step-rate ratios with CUDA tensors.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python3 -m venv /tmp/gpu-venv && . /tmp/gpu-venv/bin/activate
  pip install -q torch tyro safetensors xxhash tqdm
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
ARGS=(--max-steps 60 --ckpt.interval 20 --eval-interval 0 --sample-bytes 0 --model.n-embd 256)
TR=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU")
"${TR[@]}" train/main.py --run-dir "$OUT/ref" "${ARGS[@]}" 2>&1 | grep -E "process group up|done|error" || true
# await_zygote: the restart is a warm one (a trainer forked from the zygote, CUDA first used there).
FTJOB_FAULT="await_zygote:step=1;crash:step=50:rank=0" "${TR[@]}" --max-restarts 1 train/main.py \
  --run-dir "$OUT/crash" "${ARGS[@]}" 2>&1 | grep -E "process group up|warm restart|resumed|done|error" || true
python3 - "$OUT" <<'PY'
import json, sys, torch, safetensors.torch as st
out = sys.argv[1]
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if r["kind"] == "train"}
a, b = losses(f"{out}/ref"), losses(f"{out}/crash")
wa = st.load_file(f"{out}/ref/checkpoints/step_00000060/model.safetensors")
wb = st.load_file(f"{out}/crash/checkpoints/step_00000060/model.safetensors")
print("CUDA resume: losses equal:", a == b, "| weights equal:", all(torch.equal(wa[k], wb[k]) for k in wa))
PY
python3 tests/gpu/p1p2.py --device cuda --mb 50 500 | tee "$OUT/p1p2.txt"
