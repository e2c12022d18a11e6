#!/usr/bin/env bash
# Create ./.venv and install mmscale into it (editable), without ever letting pip pick torch.
#
# - If the interpreter already has a CUDA torch, the venv sees it (--system-site-packages) and keeps it.
# - Otherwise torch==2.13.0 (the CPU wheel on this machine kind) is installed first, and every later
#   install is constrained to that exact torch.
# - mosaicml-streaming is installed with --no-deps plus what it really imports: its torchvision pin would
#   otherwise drag in a multi-GB CUDA torch (see docs in the README, "Installing").
# Idempotent: a stamp holding the hash of the inputs makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CPU_TORCH=${MMSCALE_TORCH_VERSION:-2.13.0}
stamp_inputs=$(cat pyproject.toml tools/setup_env.sh | sha256sum | cut -c1-16)
if [[ -f $VENV/.mmscale-setup && "$(cat $VENV/.mmscale-setup)" == "$stamp_inputs" ]]; then
  exit 0
fi
cuda_torch=$("$PY" -c 'import torch,sys; sys.stdout.write(torch.__version__ if torch.version.cuda else "")' 2>/dev/null || true)
if [[ ! -x $VENV/bin/python ]]; then
  if [[ -n $cuda_torch ]]; then
    echo "[setup] keeping the interpreter's CUDA torch $cuda_torch (venv with system site-packages)"
    "$PY" -m venv --system-site-packages $VENV
  else
    "$PY" -m venv $VENV
  fi
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
have_torch=$("$VENV/bin/python" -c 'import torch,sys; sys.stdout.write(torch.__version__)' 2>/dev/null || true)
if [[ -z $have_torch ]]; then
  echo "[setup] installing torch==$CPU_TORCH (CPU)"
  pip install "torch==$CPU_TORCH"
  have_torch=$("$VENV/bin/python" -c 'import torch,sys; sys.stdout.write(torch.__version__)')
fi
cons=$VENV/constraints.txt
echo "torch==${have_torch%%+*}" > "$cons"
echo "[setup] torch $have_torch; installing dependencies (constrained to it)"
DS_BUILD_OPS=0 pip install -c "$cons" \
  "deepspeed>=0.15" "sentencepiece>=0.2" "submitit>=1.5" "wandb>=0.17" "numpy>=1.24,<2.2" \
  "safetensors>=0.4" "pyyaml>=6" "tqdm>=4.60" \
  "pytest>=7" "pytest-timeout>=2.1" "matplotlib>=3.7" "pyarrow>=12" \
  zstd "xxhash>=3,<4" brotli python-snappy catalogue "transformers<5" pillow \
  "bm25s>=0.3"
pip install -c "$cons" --no-deps "mosaicml-streaming>=0.9"
# the `ecosystem` extra (export-hf: transformers, sentence-transformers, lm-eval, tokenizers), constrained to
# the same torch like every install here
echo "[setup] installing the ecosystem extra (transformers, sentence-transformers, lm-eval)"
pip install -c "$cons" "transformers>=4.45,<5" "tokenizers>=0.19" "sentence-transformers>=3" "lm-eval>=0.4.5" \
  "accelerate>=0.26"
# log.tensorboard and the profiler's traces (torch.utils.tensorboard writes the event files)
pip install -c "$cons" "tensorboard>=2.14"
if [[ -z $cuda_torch ]] && [[ "${MMSCALE_NO_TRITON:-0}" != 1 ]]; then
  # Triton runs its kernels on the CPU under TRITON_INTERPRET=1 (the kernel tests use it).
  pip install -c "$cons" triton || echo "[setup] triton unavailable; its tests will skip"
fi
pip install -c "$cons" --no-deps --no-build-isolation -e .
echo "$stamp_inputs" > $VENV/.mmscale-setup
echo "[setup] done: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
