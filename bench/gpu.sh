#!/usr/bin/env bash
# Everything the GPU path needs proven, in one call on a lent GPU machine (device time is short):
# the cuda-marked tests, the attention candidates, the training step against HF MptForCausalLM, and a
# meta-device start of the largest preset one GPU holds.
# Results land in $OUT (JSON + logs). Prepare here first (CPU machine, repo root):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/shared/data/text .gpu/shared/data/tokenizers
#   cp ../shared/data/text/tinyshakespeare.txt .gpu/shared/data/text/
#   cp -r ../shared/data/tokenizers/gpt-neox-20b .gpu/shared/data/tokenizers/
#   mkdir -p .gpu/shared/data/eval && cp -r ../shared/data/eval/tests_local_data .gpu/shared/data/eval/
# then run `bash bench/gpu.sh` there with `.gpu` carried. ../shared does not travel; this links it.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
[ -e ../shared ] || ln -s "$(pwd)/.gpu/shared" ../shared
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
python bench/attention.py --device cuda --out "$OUT/attention_h.json" 2>&1 | tail -8
python bench/attention.py --device cuda --heads 16 --seq 4096 --batch 4 --out "$OUT/attention_4k.json" 2>&1 | tail -8
python bench/train.py --device cuda --models mpt-125m,mpt-350m,mpt-1b --batch 8 --seq 2048 --precisions bf16 \
  --steps 6 --out "$OUT/train_gpu.json" 2>&1 | tail -8
# The largest preset whose training state fits this GPU, started on the meta device (issue 18)
python bench/start_gpu.py --device cuda --out "$OUT/start_gpu.json" 2>&1 | tail -12
