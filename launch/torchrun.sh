#!/bin/bash
# Plain torchrun, without Accelerate's launcher: several machines × GPUs, DDP. Run this script once on every
# machine, the same everywhere except NODE_RANK (0 on the machine whose address is MASTER_ADDR):
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh recipes/acl.yaml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh recipes/acl.yaml
# One machine:  NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 bash launch/torchrun.sh recipes/acl.yaml
# Use it where torchrun is the cluster's standard; `robustcl launch` does the same through Accelerate and adds
# DeepSpeed (which needs Accelerate's launcher). robustcl reads everything else from the recipe: precision from
# training.precision, and on machines without GPUs the processes join one gloo group on the CPU by themselves.
# Extra arguments go to `robustcl pretrain`, e.g. --set training.batch_size=1024 -o runs/acl-2n.
# The run directory must be on a filesystem every machine sees.
set -euo pipefail

NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}   # processes (GPUs) per machine
NODE_RANK=${NODE_RANK:?set NODE_RANK: 0 on the main machine, 1 … NNODES-1 on the others}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR: the address of the machine with NODE_RANK=0}
MASTER_PORT=${MASTER_PORT:-29500}     # free on that machine

RECIPE=${1:-recipes/acl.yaml}
if [ $# -gt 0 ]; then shift; fi

exec torchrun \
  --nnodes "$NNODES" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  -m robustcl pretrain "$RECIPE" "$@"
