#!/usr/bin/env bash
# GPU checks + throughput on one GPU (run on the GPU box after the TE/Megatron kit is installed):
#   1. the gpu-marked tests (trainer te vs torch backend parity, CP partition vs TE, conversion on TE);
#   2. a Llama-3.2-1B-shaped model on 16K packs (yaml_configs/llama3.2_1b_16k.yaml), te and torch
#      backends, bf16: step time, tokens/s, TFLOP/s, memory from the trainer's metrics.
#   3. examples/quickstart.py on the GPU.
# Results go to $OUT (the device tool's folder) or ./gpu_out. Usage: bash benchmarks/gpu_run.sh [steps]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=${1:-20}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformer_engine, megatron.core as m; print('torch', torch.__version__, 'te', transformer_engine.__version__, 'mcore', m.__version__)"
} > "$OUT/env.txt" 2>&1

timeout ${GPU_TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/gpu} -p no:cacheprovider -rA > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"; tail -3 "$OUT/gpu_tests.log"

D=/tmp/gpudata; rm -rf $D; mkdir -p $D
python3 -c "from megatron_sft.testing.tiny_tokenizer import build_tiny_tokenizer as b; b('$D/tok')"
python3 benchmarks/make_synthetic_chats.py --out $D/train.jsonl --records 3000 --seed 1
python3 benchmarks/make_synthetic_chats.py --out $D/valid.jsonl --records 200 --seed 2
for split in train valid; do
  python3 tools/preprocess_data.py --input $D/$split.jsonl --tokenizer $D/tok --output-prefix $D/$split \
    --seq-length 16384 --workers 8 --no-progress > "$OUT/preprocess_$split.log" 2>&1 || { echo "preprocess $split failed"; tail "$OUT/preprocess_$split.log"; }
done
for backend in te torch; do
  timeout ${TRAIN_TIMEOUT:-110} python3 pretrain_sft.py --config yaml_configs/llama3.2_1b_16k.yaml --data.train_prefix=$D/train \
    --data.valid_prefix=$D/valid --model.attention_backend=$backend --training.train_steps=$STEPS \
    --logging.dir=$D/run_$backend > "$OUT/train_$backend.log" 2>&1
  echo "train $backend rc=$?" | tee -a "$OUT/train_$backend.log"
  cp $D/run_$backend/metrics.jsonl "$OUT/metrics_$backend.jsonl" 2>/dev/null
  tail -4 "$OUT/train_$backend.log"
done
# The quickstart on the GPU (same command as on CPU; it picks the GPU and bf16 itself).
timeout ${QUICKSTART_TIMEOUT:-60} python3 examples/quickstart.py --output-dir /tmp/quickstart --train-steps 100 \
  > "$OUT/quickstart.log" 2>&1
echo "quickstart rc=$?" | tee -a "$OUT/quickstart.log"; tail -6 "$OUT/quickstart.log"
