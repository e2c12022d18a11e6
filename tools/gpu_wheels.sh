#!/usr/bin/env bash
# Build .whl/ (git-ignored): the manylinux x86_64 / CPython 3.12 wheels of every package that mmscale's
# trainer, data path and exports import and that the GPU machines' image lacks (see
# ../shared/docs/stack-notes.md and /work/.library/device/KINDS.md for its package list). Nothing can be
# downloaded on the GPU machine, so these travel with the working tree (`carry: [".whl"]`) and
# tools/gpu_check.sh installs them there with
#
#     python3 -m pip install --no-index --no-deps --target DIR .whl/*.whl  &&  PYTHONPATH=DIR
#
# Run here, where PyPI is reachable:  bash tools/gpu_wheels.sh [OUT_DIR]     (default .whl, ~20 MiB)
#
# Every package is pinned to the version this project's venv runs its tests with, and fetched with
# --no-deps: the list below IS the dependency closure, checked against each wheel's Requires-Dist and the
# image's package list (einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py, packaging, tqdm, xxhash,
# numpy, filelock, cloudpickle, typing-extensions, transformers, sentencepiece, safetensors, pyarrow are
# there already). wandb is NOT carried: the smoke runs use log.wandb=disabled and nothing imports it
# otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.whl}
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}

# name==version  reason (why the GPU run needs it)
WHEELS=(
  "mosaicml-streaming==0.13.0   the data path: every engine reads prepared shards through StreamingDataset"
  "zstd==1.5.6.1                streaming imports it (shard compression); newest cp312 wheel not yanked (1.5.7.2 has none)"
  "brotli==1.2.1                streaming imports it at import time (compression registry)"
  "python-snappy==0.7.3         streaming imports snappy at import time (compression registry)"
  "cramjam==2.14.0              python-snappy 0.7 is a wrapper over cramjam"
  "catalogue==2.0.10            streaming's registry of compressors/hashes (imported at import time)"
  "hjson==3.1.0                 deepspeed imports it to read its config"
  "pydantic==2.14.4             deepspeed's config classes (imported by deepspeed at import time)"
  "pydantic-core==2.50.5        pydantic's compiled core (same release pairing as pydantic above)"
  "annotated-types==0.8.0       pydantic requires it"
  "typing-inspection==0.4.5     pydantic requires it"
  "submitit==1.5.4              mmscale launch (SLURM / local executor) imports it"
  "bm25s==0.3.16                the lexical baseline of mmscale retrieval eval"
)
DEEPSPEED=deepspeed==0.19.8   # engine.kind=deepspeed (ZeRO-2/3 rows); an sdist on PyPI: built as a wheel below
# What the GPU image already has, of what the packages above and pyproject.toml require (read off the image
# on 2026-11-17, /work/.library/device/KINDS.md); tests/test_gpu_readiness.py checks that every non-optional
# requirement of the carried packages and of mmscale itself is here or carried.
IMAGE_HAS="torch triton numpy pyyaml tqdm safetensors xxhash sentencepiece transformers tokenizers accelerate
  sentence-transformers pyarrow pytest pytest-timeout matplotlib tensorboard pillow einops msgpack ninja psutil
  py-cpuinfo nvidia-ml-py packaging filelock cloudpickle typing-extensions scipy requests huggingface-hub
  torchvision jinja2 fsspec"
# Not carried: wandb (nothing runs it: log.wandb=disabled), and streaming's cloud SDKs (boto3, paramiko,
# google-cloud-storage, oci, azure-*), needed for remote object stores only.
NOT_CARRIED="wandb boto3 paramiko google-cloud-storage oci azure-storage-blob azure-storage-file-datalake
  azure-identity"

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf "$OUT_DIR.tmp" && mkdir -p "$OUT_DIR.tmp"
specs=()
for row in "${WHEELS[@]}"; do specs+=("${row%% *}"); done
echo "[gpu_wheels] downloading ${#specs[@]} wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any \
  -d "$OUT_DIR.tmp" "${specs[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
echo "[gpu_wheels] building $DEEPSPEED from its sdist (DS_BUILD_OPS=0: its CUDA ops JIT-compile on first use)"
# no build isolation: deepspeed's setup.py imports torch, which the venv has (the wheel itself is pure Python)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$OUT_DIR.tmp" "$DEEPSPEED"
n=$(ls "$OUT_DIR.tmp"/*.whl | wc -l)
want=$(( ${#specs[@]} + 1 ))
[[ $n == "$want" ]] || { echo "[gpu_wheels] error: $n wheels for $want packages in $OUT_DIR.tmp; fix the list" >&2; exit 1; }
rm -rf "$OUT_DIR" && mv "$OUT_DIR.tmp" "$OUT_DIR"
ls -l "$OUT_DIR"
echo "[gpu_wheels] $n wheels, $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
