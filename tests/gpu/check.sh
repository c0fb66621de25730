#!/usr/bin/env bash
# shellcheck disable=SC2329  # the sections are functions called by name, from $SECTIONS
# One short, prepared check of the CUDA/nccl path, for a session that has a GPU machine lent.
# Run from the repo root on the GPU machine: bash tests/gpu/check.sh  (results under $OUT or /tmp/gpu-check)
# It trains with nccl in fp32, in bf16 with torch.compile and DataLoader workers, and sharded
# (FSDP2, bf16); kills each run mid-way and checks the resume is bit-exact; measures checkpoint
# stall / step-rate ratios with CUDA tensors; decodes a received checkpoint onto the GPU.
# Each section gives its own verdict (one lent machine, one shot: a failure does not hide the
# others); the exit code is the number of sections that failed. SECTIONS="fp32 fsdp" picks some.
# Without a GPU it runs on CPU (2 gloo ranks), for checking this script itself.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
SECTIONS=${SECTIONS:-"fp32 bf16-compile fsdp p1p2 decode"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
DEVICE=cuda
if [ "$NGPU" = 0 ]; then NGPU=2; DEVICE=cpu; fi
ARGS=(--max-steps 60 --ckpt.interval 20 --eval-interval 0 --sample-bytes 0 --model.n-embd 256)
TR=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU")
FAILED=()

same_run() {  # REF RUN: losses of every step and the step-60 weights (exported: any mode) equal
  python3 -m train.ckpt export "$1" --step 60 --out "$1.safetensors" &&
    python3 -m train.ckpt export "$2" --step 60 --out "$2.safetensors" &&
    python3 - "$1" "$2" <<'PY'
import json, sys, torch, safetensors.torch as st
ref, run = sys.argv[1:]
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if r["kind"] == "train"}
wa, wb = st.load_file(f"{ref}.safetensors"), st.load_file(f"{run}.safetensors")
la, lb = losses(ref), losses(run)
same_losses, same_weights = la == lb and len(la) == 60, wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
print(f"{run}: {len(lb)} steps, losses equal: {same_losses} | weights equal: {same_weights}")
sys.exit(0 if same_losses and same_weights else 1)
PY
}

# A run killed after step 50 and restarted must end bit for bit as the uninterrupted one.
killed_and_resumed() {  # NAME FAULT ARGS...
  local name=$1 fault=$2; shift 2
  "${TR[@]}" train/main.py --run-dir "$OUT/$name-ref" "${ARGS[@]}" "$@" >"$OUT/$name-ref.log" 2>&1 || return 1
  FTJOB_FAULT="$fault" "${TR[@]}" --max-restarts 1 train/main.py --run-dir "$OUT/$name-crash" \
    "${ARGS[@]}" "$@" >"$OUT/$name-crash.log" 2>&1 || return 1
  grep -E "process group up|warm restart|resumed|done" "$OUT/$name-crash.log" | tail -6
  same_run "$OUT/$name-ref" "$OUT/$name-crash"
}

fp32() { killed_and_resumed fp32 "await_zygote:step=1;crash:step=50:rank=0" --precision fp32; }
# Warm restart: a trainer forked from the zygote, CUDA first used there.
bf16-compile() {
  killed_and_resumed bf16-compile "await_zygote:step=1;crash:step=50:rank=0" --precision bf16 \
    --data.workers 2 --compile true
}
fsdp() { killed_and_resumed fsdp "crash:step=50:rank=0" --parallel.mode fsdp --precision bf16; }
p1p2() { python3 tests/gpu/p1p2.py --device "$DEVICE" --mb 50 500 | tee "$OUT/p1p2.txt"; }
# A follower's or receiver's decode on CUDA (issue 23 item 2; one GPU cannot run two nccl ranks, so
# the decoder is driven directly): the optimizer's moments are made on the GPU as the pieces
# arrive, the host holds the pieces only; then, as a sender does, the file is built back from them
# chunk by chunk into a device buffer. Fails if the host grew by more than 10% of the file.
decode() {
  python3 - "$DEVICE" <<'PY'
import sys, numpy as np, torch
sys.path.insert(0, ".")
from train.ckpt.codec import serialize
from train.ckpt.decoder import Decoder
device = torch.device(sys.argv[1])
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
optim = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4096, 4096),
                       "exp_avg_sq": torch.rand(4096, 4096)} for i in range(4)}, "param_groups": []}
data = serialize("optim.safetensors", optim)
view = np.frombuffer(data, dtype=np.uint8)
torch.empty(1, device=device)  # CUDA's own set-up (its libraries: hundreds of MB) before the measure
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
before = hwm()
decoder = Decoder("optim.safetensors", len(data), None, device)
for at in range(0, len(data), 16 << 20):
    decoder.feed(torch.from_numpy(view[at : at + (16 << 20)].copy()))
out = decoder.result()
# A sender passes the file on from there (stream.Sender): each chunk built in a device buffer.
chunk, sent_back = torch.empty(16 << 20, dtype=torch.uint8, device=device), True
for at in range(0, len(data), 16 << 20):
    n = min(16 << 20, len(data) - at)
    decoder.copy_out(at, chunk[:n])
    sent_back = sent_back and torch.equal(chunk[:n].cpu(), torch.from_numpy(view[at : at + n]))
grown = hwm() - before
same = all(torch.equal(out["state"][i][k].cpu(), optim["state"][i][k]) for i in range(4) for k in ("exp_avg", "exp_avg_sq"))
on = out["state"][0]["exp_avg"].device
print(f"decode on {device}: {len(data) / 1e6:.0f} MB file, host peak grew {grown / 1e6:.0f} MB, equal: {same}, "
      f"moments on {on}, step on {out['state'][0]['step'].device}; built back into device chunks: {sent_back}")
ok = same and sent_back and decoder.on_host == (device.type == "cpu")  # a sender builds on the device
sys.exit(0 if ok and (device.type == "cpu" or (grown < 0.1 * len(data) and on.type == "cuda")) else 1)
PY
}

for S in $SECTIONS; do
  echo "=== $S"
  START=$SECONDS
  if "$S"; then echo "=== $S: PASS ($((SECONDS - START)) s)"; else FAILED+=("$S"); echo "=== $S: FAIL ($((SECONDS - START)) s)"; fi
done
echo "failed: ${FAILED[*]:-none}"
exit "${#FAILED[@]}"
