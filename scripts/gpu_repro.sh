#!/usr/bin/env bash
# Real-scale CIFAR-10 / ResNet-18 on one GPU, with the published protocols (../shared/METHODS.md in the dev setup;
# README "Results"): a SimCLR teacher, DeACL stage 2 on it, SLF with SA / RA (PGD-20) / AA (AutoAttack standard);
# ACL-DS on a shortened schedule with SLF SA / RA; and the throughput benchmark on the same GPU.
#
#   scripts/gpu_repro.sh STAGE [STAGE ...]
#
# Stages, in order (`all` runs them all):
#   setup       unpack the offline packages (scripts/offline_bundle.sh) if present; print the GPU and versions
#   throughput  benchmarks/throughput.py: ACL-DS as shipped (bf16, compile, channels_last), eager, fp32 attack
#   simclr      stage 1: the SimCLR teacher, SIMCLR_EPOCHS epochs                      -> RUNS/simclr
#   deacl       stage 2: DeACL from RUNS/simclr, DEACL_EPOCHS epochs (published: 100)   -> RUNS/deacl
#   acl         ACL-DS, ACL_EPOCHS epochs (published: 1000)                            -> RUNS/acl
#   eval-deacl  SLF on RUNS/deacl: SA on the 10,000 test images, RA and AA on the first ATTACK_SUBSET
#   eval-acl    SLF on RUNS/acl: SA, RA on the first ATTACK_SUBSET
#   export      RUNS/deacl as a Hub-ready export with its model card (weights stay in RUNS)
#   collect     copy every summary, eval.json, card and the commands into RESULTS
#
# Every pretraining stage is time-boxed (STAGE_SECONDS): at the limit it gets SIGTERM, finishes its step, writes a
# checkpoint, and the script exits 75 without starting the next stage; running the same stage again continues it,
# so a schedule can span several sessions.
# A finished stage run again does nothing new (it resumes at its last step).
#
# Environment (defaults in brackets):
#   CIFAR10 [.bundle/cifar10 if present, else ../shared/datasets/cifar10]   uoft-cs/cifar10 layout, local
#   RUNS [runs/gpu]  RESULTS [benchmarks/results/gpu]  PYTHON [python3]
#   SIMCLR_EPOCHS [100]  DEACL_EPOCHS [100]  ACL_EPOCHS [50]  ATTACK_SUBSET [10000]  STAGE_SECONDS [540]
#   REPRO_SCALE [full]   tiny: a CPU check of the whole pipeline in minutes (small model, a few steps, subsets)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu}
RESULTS=${RESULTS:-benchmarks/results/gpu}
if [ -z "${CIFAR10:-}" ]; then
    if [ -d .bundle/cifar10 ]; then CIFAR10=.bundle/cifar10; else CIFAR10=../shared/datasets/cifar10; fi
fi
CIFAR10=$(cd "$CIFAR10" && pwd)
SIMCLR_EPOCHS=${SIMCLR_EPOCHS:-100}
DEACL_EPOCHS=${DEACL_EPOCHS:-100}
ACL_EPOCHS=${ACL_EPOCHS:-50}
ATTACK_SUBSET=${ATTACK_SUBSET:-10000}
STAGE_SECONDS=${STAGE_SECONDS:-540}
SITE=${SITE:-/tmp/robustcl-site}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"

# A tiny model, a few steps and small subsets: the same commands, checkable on a CPU in minutes.
SCALE=()
EVAL_SCALE=()
BENCH_SCALE=()
if [ "${REPRO_SCALE:-full}" = tiny ]; then
    SCALE=(--set "model.widths=[8,16,32,64]" --set "model.block_layers=[1,1,1,1]" --set data.max_samples=512
        --set training.batch_size=64 --set training.max_steps=3 --set logging.every_steps=1)
    EVAL_SCALE=(--set eval.data.max_train=500 --set eval.data.max_test=200 --set eval.slf.epochs=2)
    BENCH_SCALE=(--steps 2 --warmup 1 --phase-steps 1)
    ATTACK_SUBSET=${ATTACK_SUBSET_TINY:-20}
elif [ "${REPRO_SCALE:-full}" != full ]; then
    echo "REPRO_SCALE must be full or tiny, got ${REPRO_SCALE}" >&2
    exit 2
fi

mkdir -p "$RUNS" "$RESULTS"
COMMANDS="$RESULTS/commands.txt"

# Run a command, logging it (as typed, with the environment that matters) to RESULTS/commands.txt first.
run() {
    printf '%s\n' "REPRO_SCALE=${REPRO_SCALE:-full} $(printf '%q ' "$@")" | tee -a "$COMMANDS"
    "$@"
}

robustcl() { run "$PYTHON" -m robustcl "$@"; }

# A pretraining stage, boxed in STAGE_SECONDS; exit 75 (stopped with a checkpoint) is not a failure here.
pretrain() {
    local code=0
    run timeout --signal=TERM --kill-after=120 "$STAGE_SECONDS" \
        "$PYTHON" -m robustcl pretrain "$@" --set "data.path=$CIFAR10" "${SCALE[@]}" || code=$?
    if [ "$code" = 75 ] || [ "$code" = 124 ]; then
        # Later stages (evaluation of this run) must not start on a schedule that is not finished.
        echo "gpu_repro: ${STAGE_SECONDS}s time box reached, checkpoint written: run the same stage again to continue"
        return 75
    fi
    return "$code"
}

stage_setup() {
    # Only where the packages are missing: the bundle's are built for the GPU image's Python.
    if ! "$PYTHON" -c "import datasets, pydantic, pyautoattack" 2>/dev/null; then
        if [ ! -f .bundle/site.tar.xz ]; then
            echo "datasets / pydantic / pyautoattack missing and no .bundle/site.tar.xz (scripts/offline_bundle.sh)" >&2
            exit 1
        fi
        mkdir -p "$SITE"
        tar -xJf .bundle/site.tar.xz -C "$SITE" --strip-components=1
        export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU"
    "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "accelerate", "datasets", "transformers", "safetensors", "pydantic", "pyautoattack"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
}

stage_throughput() {
    local bench=(benchmarks/throughput.py recipes/acl.yaml --set "data.path=$CIFAR10" "${SCALE[@]}" "${BENCH_SCALE[@]}")
    run "$PYTHON" "${bench[@]}" --out "$RESULTS/throughput_acl_ds.json"
    run "$PYTHON" "${bench[@]}" --set training.compile=false --out "$RESULTS/throughput_acl_ds_eager.json"
    run "$PYTHON" "${bench[@]}" --set attack.precision=fp32 --out "$RESULTS/throughput_acl_ds_fp32_attack.json"
}

stage_simclr() { pretrain recipes/simclr.yaml -o "$RUNS/simclr" --set "training.epochs=$SIMCLR_EPOCHS"; }

stage_deacl() {
    pretrain recipes/deacl.yaml -o "$RUNS/deacl" --set "training.epochs=$DEACL_EPOCHS" \
        --set "method.deacl.teacher=$RUNS/simclr"
}

stage_acl() { pretrain recipes/acl.yaml -o "$RUNS/acl" --set "training.epochs=$ACL_EPOCHS"; }

evaluate() {
    local run_dir=$1 attacks=$2
    robustcl evaluate "$run_dir" --protocol slf --attack "$attacks" --attack-subset "$ATTACK_SUBSET" \
        --set "eval.data.path=$CIFAR10" "${EVAL_SCALE[@]}"
}

stage_eval-deacl() { evaluate "$RUNS/deacl" pgd20,autoattack; }
stage_eval-acl() { evaluate "$RUNS/acl" pgd20; }

stage_export() {
    rm -rf "$RUNS/deacl-export"
    robustcl export "$RUNS/deacl" "$RUNS/deacl-export" --repo-id robustcl/deacl-r18-cifar10
}

stage_collect() {
    local name file
    for name in simclr deacl acl; do
        [ -d "$RUNS/$name" ] || continue
        mkdir -p "$RESULTS/$name"
        for file in recipe.yaml summary.json metrics.jsonl eval/slf/eval.json eval/slf/robustness_curve.png; do
            [ -f "$RUNS/$name/$file" ] && cp "$RUNS/$name/$file" "$RESULTS/$name/$(basename "$file")"
        done
    done
    if [ -d "$RUNS/deacl-export" ]; then
        mkdir -p "$RESULTS/deacl-export"
        cp "$RUNS/deacl-export/README.md" "$RUNS/deacl-export/config.json" "$RESULTS/deacl-export/"
    fi
    ls -R "$RESULTS"
}

STAGES=(setup throughput simclr deacl acl eval-deacl eval-acl export collect)
[ $# -gt 0 ] || { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2; }  # the header comment: usage
requested=("$@")
[ "$1" = all ] && requested=("${STAGES[@]}")
for stage in "${requested[@]}"; do
    if ! printf '%s\n' "${STAGES[@]}" | grep -qx -- "$stage"; then
        echo "unknown stage '$stage'; stages: ${STAGES[*]} (or all)" >&2
        exit 2
    fi
done
for stage in "${requested[@]}"; do
    echo "gpu_repro: stage $stage"
    "stage_$stage"
done
