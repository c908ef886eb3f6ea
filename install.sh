#!/usr/bin/env bash
# Install megatron-sft and its dependencies into the current Python environment.
#   bash install.sh          # runtime dependencies + what the README's commands use: Parquet and
#                            # datasets folders (pyarrow, datasets), TensorBoard, plots (matplotlib)
#   bash install.sh --test   # plus pytest, all at the versions in constraints-test.txt (what CI runs with)
#   bash install.sh --te     # plus Transformer Engine (GPU machines with CUDA)
#   bash install.sh --wandb  # plus Weights & Biases (logging.wandb_project)
# Works on Python 3.11 and 3.12. megatron-core 0.19 declares Python >= 3.12, but its cp311 wheel
# runs fine on 3.11, so it is installed first without the Python check; pip then finds the
# requirement already satisfied.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
MCORE_VERSION=0.19.2
extras=(formats tensorboard plot)
constraints=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test); constraints=(-c constraints-test.txt) ;;
    --te) extras+=(te) ;;
    --wandb) extras+=(wandb) ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --te and/or --wandb)" >&2; exit 2 ;;
  esac
done

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch: keep an existing install (the GPU box ships its own CUDA build). Otherwise pin the
# CPU-capable release the project is tested with; set TORCH_SPEC to choose another.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing ${TORCH_SPEC:-torch==2.13.0}"
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('megatron-core') != '$MCORE_VERSION')" 2>/dev/null; then
  echo "[install] megatron-core==$MCORE_VERSION"
  pip_install --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"
fi

spec=".[$(IFS=,; echo "${extras[*]}")]"
echo "[install] megatron-sft $spec"
pip_install ${constraints[@]+"${constraints[@]}"} -e "$spec"
"$PY" -c "import megatron_sft.mcore as m, torch; print(f'[install] ok: torch {torch.__version__}, megatron-core {m.MCORE_VERSION}')"
