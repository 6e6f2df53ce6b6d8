#!/usr/bin/env bash
# The embedded default: the SDXL recipe in miniature on the built-in `shapes` data, on a laptop CPU.
#
#   python3 -m venv .venv && .venv/bin/pip install -q -e . && bash run_default.sh [WORKDIR]
#
# 1. autoencoder (tiny VAE, EMA weights)          4. multi-aspect buckets + offset noise
# 2. latent + text-embedding cache of the data    5. sample a grid of prompts, incl. held-out combinations
# 3. base pre-training on it, 64x64 squares       6. score colour / shape / background of every sample
# Every step below is a plain command, printed before it runs: copy it to rerun or change one step.
# Rerunning the script resumes: finished stages are restored from their checkpoints, existing images kept.
# Environment: PYTHON (default .venv/bin/python if present, else python3); SMOKE=1 runs every stage for a
# few steps only (tests/test_run_default.py); XLA_CACHE: XLA's compilation cache (default WORKDIR/xla_cache).
set -euo pipefail
cd "$(dirname "$0")"

W="${1:-/tmp/sdxl_default}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
XLA_CACHE="${XLA_CACHE:-$W/xla_cache}"
# Must equal configs/shapes.py HOLDOUT (tests/test_run_default.py checks): never trained, sampled below.
HOLDOUT="red circle blue,green square yellow,blue triangle white,yellow diamond purple,purple cross orange,orange circle black,white square red,black triangle green"
# 8 seeds per prompt: 64 held-out and 64 seen images, so one accuracy has a standard error of ~5 points.
AE=":shapes"; BASE=""; MULTI=":multiaspect"; STEPS=20; PER_PROMPT=8
if [[ "${SMOKE:-0}" == 1 ]]; then
  AE=":smoke"; BASE=":smoke"; MULTI=":multiaspect,smoke"; STEPS=2; PER_PROMPT=1
fi
export TF_CPP_MIN_LOG_LEVEL=2  # quieter XLA start-up
mkdir -p "$W"
START=$SECONDS

run() {  # prints the command, runs it, and reports its wall and CPU time
  echo
  echo "+ $*"
  TIMEFORMAT="[run_default] step took %R s wall (CPU %U s user + %S s sys)"
  time "$@"
  echo "[run_default] total so far $((SECONDS - START)) s"
}

run "$PYTHON" train.py --config=configs/autoencoder.py$AE --workdir="$W/autoencoder" \
  --config.compilation_cache_dir="$XLA_CACHE"

# The frozen VAE encoder and text encoders run once per example here instead of once per training step.
ENCODE_ARGS=()
[[ "${SMOKE:-0}" == 1 ]] && ENCODE_ARGS=(--config_arg=smoke --set data.shapes_num_examples=64)
if [[ -f "$W/latents/index.json" ]]; then
  echo; echo "[run_default] $W/latents exists: skipping the encoding"
else
  run "$PYTHON" -m sdxl_jax.data.prepare --encode --config=configs/shapes.py --out="$W/latents" \
    --set vae_from="$W/autoencoder" --encode_batch_size=64 "${ENCODE_ARGS[@]}"
fi

run "$PYTHON" train.py --config=configs/shapes.py$BASE --workdir="$W/base" \
  --config.vae_from="$W/autoencoder" --config.data.source=array_record --config.data.path="$W/latents" \
  --config.compilation_cache_dir="$XLA_CACHE"

run "$PYTHON" train.py --config=configs/shapes.py$MULTI --workdir="$W/multiaspect" \
  --config.init_from="$W/base" --config.vae_from="$W/autoencoder" --config.compilation_cache_dir="$XLA_CACHE"

run "$PYTHON" -m sdxl_jax.eval.prompts --holdout="$HOLDOUT" --per_prompt=$PER_PROMPT --out="$W/prompts.jsonl"

run "$PYTHON" sample.py --weights="$W/multiaspect" --prompts_file="$W/prompts.jsonl" --outdir="$W/samples" \
  --height=64 --width=64 --steps=$STEPS --guidance=2.0 --sampler=euler --batch_size=32

run "$PYTHON" -m sdxl_jax.eval.shapes "$W/samples" --holdout="$HOLDOUT"

run "$PYTHON" -m sdxl_jax.eval.grid "$W/samples"

echo
echo "[run_default] done in $((SECONDS - START)) s: $W/samples/grid.png, $W/samples/eval_shapes.json"
