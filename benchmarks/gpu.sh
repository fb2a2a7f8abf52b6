#!/usr/bin/env bash
# The prepared GPU run: extraction at 1, 3 and 13 layers against the plain transformers forward per example, the
# store writer against plain write + fsync, the in-memory search, the K/V-once Q-Former, the batched probes and the
# compiled ViT, then one table. Within 8 minutes on one H100 or H200 (BUDGET seconds, default 480: each step's
# limit is cut to what is left, and a step that no longer fits is skipped and says so in the table; the steps
# most likely to be cut come last).
# Usage, from the project root:  bash benchmarks/gpu.sh [LOG_DIR] [STEP ...]
# Default steps: extract-1 extract-3 extract-13 write in-memory qformer probes extract-fast. Also by name:
# tests extract-bf16 mdl.
# DEVICE=cpu runs the same steps at tiny sizes on the CPU (a dry run of this script; its figures mean nothing).
# A failing step does not stop the next; the exit code is the worst one.
set -uo pipefail
logs=${1:-gpu-logs}
shift $(($# > 0 ? 1 : 0))
steps=" ${*:-extract-1 extract-3 extract-13 write in-memory qformer probes extract-fast} "
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's probing, not another installed copy
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
budget=${BUDGET:-480}
status=0
rows=()
if [[ $device == cpu ]]; then  # tiny model (4 layers): 1, 3 and all 5 outputs with the embedding output
  size=(--device cpu --size tiny --images 40 --plain-examples 40 --workers 0)
  layers_1=4 layers_3=2,3,4 layers_13=0,1,2,3,4
  write_size=(--shards 2 --shard-size 64 --repeats 1 --check host)
  memory_size=(--device cpu --size tiny --vsr-images 120 --trials 4 --epochs 4)
  probes_size=(--examples 2000 --unfrozen --vsr-images 40 --unfrozen-batch 16 --workers 0)
  qformer_size=tiny
else  # real-size BLIP-2: its Q-Former has 12 layers, 13 outputs with the embedding output
  size=(--device cuda --size real --images 600 --plain-examples 300)
  layers_1=12 layers_3=4,8,12 layers_13=0,1,2,3,4,5,6,7,8,9,10,11,12
  write_size=(--shards 4 --shard-size 1024 --repeats 2 --threads 4 --check device)  # the GPU path's writer
  memory_size=(--device cuda --size real --vsr-images 800 --trials 16 --epochs 20)
  probes_size=(--examples 40000 --unfrozen --vsr-images 300 --unfrozen-batch 128 --workers 8)
  qformer_size=real
fi
step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output on screen and in LOG_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  local left=$((budget - SECONDS - 5))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    rows+=("$name|skipped: the ${budget} s budget is spent|||")
    ((status < 124)) && status=124
    return 0
  fi
  echo "=== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code after $((SECONDS - started)) s"
  ((code > status)) && status=$code
  local rate speedup
  rate=$(grep -m1 -oE '^(ours|writer): +[0-9.]+ [A-Za-z/]+' "$logs/$name.log" | sed -E 's/^[a-z]+: +//')
  speedup=$(grep -oE '^speedup=[0-9.]+' "$logs/$name.log" | tail -1 | cut -d= -f2)
  rows+=("$name|exit $code|$((SECONDS - started)) s|${rate:-}|${speedup:-}")
  return 0
}
if [[ $device == cuda ]]; then nvidia-smi -L; fi
"$python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
step extract-1 75 "$python" benchmarks/extract.py "${size[@]}" --layers "$layers_1"
step extract-3 55 "$python" benchmarks/extract.py "${size[@]}" --layers "$layers_3"
step extract-13 60 "$python" benchmarks/extract.py "${size[@]}" --layers "$layers_13"
step write 35 "$python" benchmarks/write.py "${write_size[@]}"
# in-memory: a frozen search with `--in-memory` against extract-then-search on stores (same best trial required)
step in-memory 75 "$python" benchmarks/in_memory.py "${memory_size[@]}"
step qformer 35 bash -c "'$python' benchmarks/qformer.py --device $device --size $qformer_size && \
'$python' benchmarks/qformer.py --device $device --size $qformer_size --dtype bfloat16"
step probes 70 "$python" benchmarks/probes.py --device "$device" "${probes_size[@]}"
step extract-fast 110 "$python" benchmarks/extract.py "${size[@]}" --qformer-dtype bfloat16 --compile-vision
step tests 240 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step extract-bf16 240 "$python" benchmarks/extract.py "${size[@]}" --qformer-dtype bfloat16
step mdl 120 "$python" benchmarks/mdl.py --device "$device" --examples 20000
echo
echo "| step | result | time | ours (examples/s or GB/s) | speedup |"
echo "| --- | --- | --- | --- | --- |"
for row in "${rows[@]}"; do
  IFS='|' read -r name result took rate speedup <<<"$row"
  echo "| $name | $result | $took | $rate | $speedup |"
done
echo "device=$device total=${SECONDS}s budget=${budget}s"
exit $status
