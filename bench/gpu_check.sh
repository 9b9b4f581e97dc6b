#!/usr/bin/env bash
# The GPU check of issue 13, prepared for the day a GPU machine is lent: on one H200, with nothing fetched from
# the internet, in under 10 minutes. For random-init Llamas of ~1B and ~7B parameters (made here from a config,
# bench/gpu_check.py): the generation worker against bare vllm.LLM.generate on one engine (output tokens/s,
# bench/bench_generate.py), then a few DeepSpeed ZeRO-3 bf16 steps of the training worker on that generation's
# scored output, and the last step's MFU (model FLOPs / seconds / the GPU's bf16 peak). One table at the end.
#
# Needs, installed beforehand: a GPU vLLM and DeepSpeed with this package's dependencies (the generate and train
# images have them), in $PYTHON (default python3), or $GEN_PYTHON and $TRAIN_PYTHON where generation and
# training live in different environments. A phase whose environment cannot import its engine is reported as
# n/a with the import error; the others still run. Each phase gets what is left of the 10 minutes, at most its
# own share, so the whole check ends in time whatever hangs.
# On this workplace's lent H200 (torch, transformers and tokenizers installed; no vLLM, no DeepSpeed): the
# vLLM wheel is larger than what a call may carry, so generation reports n/a there; DeepSpeed can travel as
# wheels (see /work/.library/device/README.md): deepspeed==0.19.8 built here (`DS_BUILD_OPS=0 pip wheel
# --no-deps --no-build-isolation deepspeed==0.19.8`) plus hjson, pydantic, pydantic-core, annotated-types and
# typing-inspection downloaded for Python 3.12; training then runs on random-token samples.
#
#   bench/gpu_check.sh                    # on the GPU machine, from anywhere
#   SIZES=1b bench/gpu_check.sh           # one size only
#   bench/gpu_check.sh --cpu              # dry run of every step on this CPU: a tiny model, fp32 (~5 minutes)
#   RESULTS=/tmp/r bench/gpu_check.sh     # where the JSON results go (default $OUT/gpu-check if set, else a tmp dir)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CPU=0
[[ "${1:-}" == "--cpu" ]] && CPU=1
if ((CPU)); then
  DEFAULT_PYTHON="$ROOT/.venv/bin/python"
  SIZES=${SIZES:-tiny}
  SAMPLE_TOKENS=32
  GEN_ARGS=(--prompts 64 --max-tokens "$SAMPLE_TOKENS" --repeats 1)
  TRAIN_ARGS=(--cpu --steps 2 --micro-batch-size 4)
  export DS_ACCELERATOR=cpu
else
  DEFAULT_PYTHON=python3
  SIZES=${SIZES:-1b 7b}
  SAMPLE_TOKENS=256
  GEN_ARGS=(--prompts 512 --max-tokens "$SAMPLE_TOKENS" --repeats 2)
  TRAIN_ARGS=(--steps 3 --micro-batch-size 16)
fi
PYTHON=${PYTHON:-$DEFAULT_PYTHON}
GEN_PYTHON=${GEN_PYTHON:-$PYTHON}
TRAIN_PYTHON=${TRAIN_PYTHON:-$PYTHON}
WORK=$(mktemp -d /tmp/spin-gpu-check.XXXXXX)
RESULTS=${RESULTS:-${OUT:+$OUT/gpu-check}}
RESULTS=${RESULTS:-$WORK/results}
mkdir -p "$RESULTS" "$WORK/logs"
DEADLINE=$((SECONDS + ${BUDGET_SECONDS:-570}))  # 9.5 minutes: the table and clean-up fit in the rest
trap 'rm -rf "$WORK"' EXIT

# phase NAME SHARE COMMAND...: runs COMMAND under the smaller of SHARE seconds and what is left, logging to
# $WORK/logs/NAME.log (all logs end up in $RESULTS/logs.txt); returns its status (124 when its time ran out).
phase() {
  local name=$1 share=$2 left=$((DEADLINE - SECONDS))
  shift 2
  ((left < share)) && share=$left
  if ((share < 10)); then
    echo "== $name: skipped, the 10 minutes are spent"
    return 124
  fi
  echo "== $name (at most ${share} s)"
  local began=$SECONDS status
  timeout --kill-after=10 "$share" "$@" >"$WORK/logs/$name.log" 2>&1
  status=$?
  echo "   exit $status after $((SECONDS - began)) s; last lines:"
  tail -n 4 "$WORK/logs/$name.log" | sed 's/^/   | /'
  return $status
}

# can PYTHON MODULE...: whether PYTHON imports every MODULE; otherwise prints why (the error's last line).
can() {
  local python=$1 out
  shift
  out=$("$python" -c "import $(IFS=,; echo "$*")" 2>&1) && return 0
  echo "$out" | tail -n 1
  return 1
}

echo "spin-k8s GPU check: sizes $SIZES, results in $RESULTS"
if ((CPU)); then
  echo "dry run on the CPU"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
fi
GEN_OK=1 TRAIN_OK=1
can "$GEN_PYTHON" vllm spin_k8s.workers.generate >"$WORK/gen-why" || { GEN_OK=0; echo "generation n/a: $(cat "$WORK/gen-why")"; }
can "$TRAIN_PYTHON" deepspeed spin_k8s.workers.train >"$WORK/train-why" || { TRAIN_OK=0; echo "training n/a: $(cat "$WORK/train-why")"; }

# Generation for every size first, then training largest first: if the 10 minutes run short, what is cut is the
# smaller model's training step.
read -ra SIZE_LIST <<<"$SIZES"
for size in "${SIZE_LIST[@]}"; do
  dir="$WORK/$size"
  # 7B: initialised on the GPU and saved in bf16 (13.5 GB) in well under a minute
  phase "$size-make" 120 "$TRAIN_PYTHON" "$ROOT/bench/gpu_check.py" model --size "$size" --out "$dir" \
    --json "$RESULTS/$size-model.json" || continue
  if ((GEN_OK)); then
    phase "$size-gen" 240 "$GEN_PYTHON" "$ROOT/bench/bench_generate.py" --model "$dir/model" \
      --data "$dir/sft.jsonl" --output "$dir/synthetic" --json "$RESULTS/$size-generate.json" "${GEN_ARGS[@]}"
  fi
done
for ((k = ${#SIZE_LIST[@]} - 1; k >= 0; k--)); do
  size=${SIZE_LIST[k]} dir="$WORK/${SIZE_LIST[k]}"
  [[ -d "$dir/model" ]] || continue
  # Generation's scored shard is the training steps' data. Without one (no vLLM), samples of random tokens as
  # long as a sampled answer, which the trainer scores itself.
  last="$dir/synthetic/scored"
  if ((TRAIN_OK)) && [[ ! -d "$last" ]]; then
    last="$dir/random"
    "$TRAIN_PYTHON" "$ROOT/bench/gpu_check.py" synthetic --model "$dir/model" --data "$dir/sft.jsonl" \
      --out "$last" --tokens "${SAMPLE_TOKENS}" || continue
  fi
  if ((TRAIN_OK)); then
    phase "$size-train" 240 "$TRAIN_PYTHON" "$ROOT/bench/gpu_check.py" train --model "$dir/model" \
      --synthetic "$last" --out "$dir/trained" --json "$RESULTS/$size-train.json" "${TRAIN_ARGS[@]}"
  fi
done

echo
echo "== results (generation: output tokens/s, worker/bare ratio target >= 0.95; training: ZeRO-3, last step)"
shopt -s nullglob
files=("$RESULTS"/*-model.json "$RESULTS"/*-generate.json "$RESULTS"/*-train.json)
if ((${#files[@]})); then
  "$PYTHON" "$ROOT/bench/gpu_check.py" table "${files[@]}"
else
  echo "no results"
fi
echo "total $SECONDS s"
for log in "$WORK"/logs/*.log; do printf '\n===== %s\n' "$(basename "$log")"; cat "$log"; done >"$RESULTS/logs.txt"
