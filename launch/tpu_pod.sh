#!/bin/bash
# SDXL on a Cloud TPU VM pod slice: create (or reuse) the slice, install sdxl_jax on every worker, and run
# the same `python train.py` on all of them; the workdir is a bucket path all workers share.
#
#   launch/tpu_pod.sh create                                  # once: the slice
#   launch/tpu_pod.sh install                                 # copy this checkout + pip install, all workers
#   launch/tpu_pod.sh check  gs://BUCKET/sdxl/check            # launch/check_cluster.py on all workers
#   launch/tpu_pod.sh train  configs/stage1_256.py gs://BUCKET/sdxl/stage1 [--config.k=v ...]
#   launch/tpu_pod.sh logs | stop | delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-256, v6e-64), RUNTIME (TPU VM image),
# PROJECT, SPOT=1 for spot/preemptible capacity. `train` runs under nohup with output in ~/sdxl_train.log on
# each worker; re-running `train` with the same workdir resumes from the newest checkpoint (after a
# preemption: `create` again if the slice was deleted, `install`, `train`). Every worker calls
# jax.distributed.initialize() with --distributed=on: JAX reads the slice's topology from the TPU metadata.
set -euo pipefail

TPU_NAME=${TPU_NAME:-sdxl}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=sdxl_jax
GC=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

on_all() {  # run a shell command on every worker of the slice
  "${GC[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create)
    if "${GC[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
      echo "reusing the existing slice $TPU_NAME"
    else
      extra=()
      [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
      "${GC[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    fi
    ;;
  install)
    tar -C "$REPO" --exclude=.venv --exclude=.git --exclude='*.egg-info' -czf /tmp/sdxl_jax.tgz .
    "${GC[@]}" scp /tmp/sdxl_jax.tgz "$TPU_NAME":~/sdxl_jax.tgz --worker=all
    on_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/sdxl_jax.tgz && cd ~/$REMOTE_DIR && \
      python3 -m pip install -q -U 'jax[tpu]' -e . && python3 -m pip install -q gcsfs"
    ;;
  check)
    on_all "cd ~/$REMOTE_DIR && python3 launch/check_cluster.py --distributed=on --workdir=${1:?workdir}"
    ;;
  train)
    config=${1:?usage: tpu_pod.sh train CONFIG WORKDIR [--config.k=v ...]}
    workdir=${2:?usage: tpu_pod.sh train CONFIG WORKDIR [--config.k=v ...]}
    shift 2
    on_all "cd ~/$REMOTE_DIR && nohup python3 train.py --config=$config --workdir=$workdir \
      --distributed=on $* > ~/sdxl_train.log 2>&1 &"
    echo "started on every worker; follow with: $0 logs"
    ;;
  logs)
    "${GC[@]}" ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/sdxl_train.log"
    ;;
  stop)  # SIGTERM: the run saves a checkpoint at a step all hosts agree on, then exits
    on_all "pkill -TERM -f '[t]rain.py --config' || true"
    ;;
  delete)
    "${GC[@]}" delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    ;;
esac
