#!/usr/bin/env bash
# Speed variants of the trainer on one GPU, same packs for every variant (run on the GPU box after
# the TE/Megatron kit of ../shared/device is installed):
#   bash benchmarks/gpu_speed.sh [steps]
# 1. data: tiny tokenizer, 3,000 synthetic chats packed at 16K; per long length L of LONG_SEQS, 24
#    conversations of 0.76-0.95 L tokens, one per pack;
# 2. each variant: pretrain_sft.py on yaml_configs/llama3.2_1b_16k.yaml (1.5B Llama-3.2-1B shape)
#    with its overrides; a summary line (medians after 3 warm-up steps) per variant;
# 3. a torch.profiler breakdown of the default configuration (benchmarks/profile_step.py).
# Results go to $OUT (the device tool's folder) or ./gpu_out. VARIANTS16, VARIANTS_LONG (at LONG_SEQS), STEPS_LONG override the lists.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=${1:-12}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
D=${DATA_DIR:-/tmp/gpudata}; mkdir -p $D
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformer_engine, megatron.core as m; print('torch', torch.__version__, 'te', transformer_engine.__version__, 'mcore', m.__version__)"
} > "$OUT/env.txt" 2>&1

[ -d $D/tok ] || python3 -c "from megatron_sft.testing.tiny_tokenizer import build_tiny_tokenizer as b; b('$D/tok')"
prep() {  # name, seq_length, generator args...
  local name=$1 seq=$2; shift 2
  [ -f $D/$name.meta.json ] && return
  [ $# -eq 0 ] || python3 benchmarks/make_synthetic_chats.py --out $D/$name.jsonl "$@"
  python3 tools/preprocess_data.py --input $D/$name.jsonl --tokenizer $D/tok --output-prefix $D/$name \
    --seq-length $seq --workers 8 --no-progress > "$OUT/preprocess_$name.log" 2>&1 || tail "$OUT/preprocess_$name.log"
}
prep train16k 16384 --records 3000 --seed 1
prep valid16k 16384 --records 200 --seed 2
# Long agent-like conversations, one per pack: 20-40 turn pairs, 76-95% of the pack length
# (~4 tiny-tokenizer tokens a word), 24 of them per length.
long_data() {  # seq_length
  local seq=$1 name=long$1
  [ -f $D/$name.jsonl ] || python3 - $D/$name.jsonl $seq <<'PY'
import json, random, sys
sys.path.insert(0, "benchmarks")
from make_synthetic_chats import WORDS
rng, seq = random.Random(3), int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for _ in range(24):
        total, turns = rng.randint(int(seq * 0.19), int(seq * 0.237)), rng.randint(20, 40)
        messages = [{"role": "system", "content": "You are a helpful agent."}]
        for _ in range(turns):
            for role in ("user", "assistant"):
                messages.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(total // (2 * turns)))})
        f.write(json.dumps({"messages": messages}) + "\n")
PY
  prep $name $seq
}

summary() {  # name, metrics file
  python3 - "$1" "$2" <<'PY'
import json, statistics as st, sys
name, path = sys.argv[1], sys.argv[2]
try:
    rows = [r for r in map(json.loads, open(path)) if "loss" in r and "step_time_s" in r]
except FileNotFoundError:
    rows = []
if not rows:
    print(f"{name:28s} no metrics"); sys.exit()
late = [r for r in rows if r["step"] > 3] or rows
med = lambda k: st.median(r[k] for r in late)
print(f"{name:28s} step {med('step_time_s'):.3f} s  tokens/s {med('tokens_per_s_per_gpu'):9.0f}  "
      f"TFLOP/s {med('tflops_per_gpu'):6.1f}  mem {max(r['memory_gib'] for r in rows):6.1f} GiB  "
      f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} (step {rows[-1]['step']})")
PY
}
variant() {  # name, data, seq, global batch, steps, overrides...
  local name=$1 data=$2 seq=$3 gbs=$4 steps=$5; shift 5
  rm -rf $D/run_$name
  timeout ${TRAIN_TIMEOUT:-150} python3 pretrain_sft.py --config yaml_configs/llama3.2_1b_16k.yaml \
    --data.train_prefix=$D/$data --data.valid_prefix=$D/valid16k --data.seq_length=$seq \
    --training.global_batch_size=$gbs --training.train_steps=$steps --logging.dir=$D/run_$name \
    --logging.tensorboard=false "$@" > "$OUT/train_$name.log" 2>&1
  local rc=$?
  cp $D/run_$name/metrics.jsonl "$OUT/metrics_$name.jsonl" 2>/dev/null
  echo "$(summary $name $D/run_$name/metrics.jsonl)  rc=$rc" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || grep -E "Error|error|OOM|out of memory" "$OUT/train_$name.log" | tail -3
}
IFS=';' read -ra V16 <<< "${VARIANTS16-unfused_full_head:--training.fused_kernels=false --training.lm_head=full;fused_full_head:--training.lm_head=full;default:;fp8_tensorwise:--training.fp8=tensorwise;fp8_blockwise:--training.fp8=blockwise}"
for v in "${V16[@]}"; do
  [ -n "$v" ] || continue
  variant "16k_${v%%:*}" train16k 16384 4 $STEPS ${v#*:}
done
# Long packs: every variant of VARIANTS_LONG at every length of LONG_SEQS (one pack per step).
IFS=';' read -ra VLONG <<< "${VARIANTS_LONG-recompute_mlp:--training.recompute_granularity=selective --training.recompute_modules=[mlp]}"
for seq in ${LONG_SEQS:-131072}; do
  long_data $seq
  for v in "${VLONG[@]}"; do
    [ -n "$v" ] || continue
    variant "long${seq}_${v%%:*}" long$seq $seq 1 ${STEPS_LONG:-6} ${v#*:}
  done
done
if [ -z "${NO_PROFILE:-}" ]; then
  timeout 150 python3 benchmarks/profile_step.py --config yaml_configs/llama3.2_1b_16k.yaml \
    --data.train_prefix=$D/train16k --data.valid_prefix=$D/valid16k --logging.tensorboard=false \
    ${PROFILE_ARGS:-} > "$OUT/profile_default.txt" 2>&1
  head -40 "$OUT/profile_default.txt"
fi
