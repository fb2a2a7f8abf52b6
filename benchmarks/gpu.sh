#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the GPU tests, then both benchmarks at the sizes the README reports.
# Usage, from the project root on a CUDA machine:  bash benchmarks/gpu.sh [LOG_DIR] [STEP ...]
# Steps: tests qformer extract extract-bf16 extract-fast write probes mdl (none named: all). Their time limits
# add up to 30 minutes; a 15-minute device lease fits `tests extract-bf16 write mdl`.
# Each step has its own time limit and a failing step does not stop the next; the exit code is the worst one.
set -uo pipefail
logs=${1:-gpu-logs}
shift $(($# > 0 ? 1 : 0))
steps=" ${*:-tests qformer extract extract-bf16 extract-fast write probes mdl} "
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output on screen and in LOG_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  echo "=== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code after $((SECONDS - started)) s"
  ((code > status)) && status=$code
  return 0
}
nvidia-smi -L
"$python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
step tests 240 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step qformer 120 bash -c "'$python' benchmarks/qformer.py --device cuda && '$python' benchmarks/qformer.py \
--device cuda --dtype bfloat16"
step extract 300 "$python" benchmarks/extract.py --device cuda --size real --plain-examples 2000
step extract-bf16 240 "$python" benchmarks/extract.py --device cuda --size real --plain-examples 500 \
  --qformer-dtype bfloat16
step extract-fast 300 "$python" benchmarks/extract.py --device cuda --size real --plain-examples 500 \
  --qformer-dtype bfloat16 --compile-vision
step write 120 "$python" benchmarks/write.py --shards 8
step probes 360 "$python" benchmarks/probes.py --device cuda --examples 80000 --unfrozen --vsr-images 1000 \
  --unfrozen-batch 128 --workers 8
step mdl 120 "$python" benchmarks/mdl.py --device cuda --examples 20000
exit $status
