#!/usr/bin/env bash
# The GPU benchmark suite (issue 11): ours vs diffusers' PyTorch on the same GPU in one run, JSON lines out.
#
# 1. Here (a machine with pip and the network), once per checkout:
#        bash bench/gpu_suite.sh fetch        # wheels the GPU image lacks -> .whl/ (git-ignored via exclude)
#        PY=/work/gpu13venv/bin/python bash bench/gpu_suite.sh preflight     # about 40 minutes, idle host
#    Preflight compiles our parts for the GPU here, without it (XLA:GPU from the gpu-aot extra in a Python
#    3.12 venv: the GPU image's jax 0.11.2 and CUDA 13; bench/aot.py), and keeps each part's executables
#    in .aot/<part>/ (git-ignored), while the carry has room: a lowering error or an out-of-memory shows
#    here, not in the lent GPU's minutes, and the GPU run loads the programs instead of compiling them.
# 2. On the GPU machine (device `run`, carry [".whl", ".aot"], timeout_s 600):
#        bash bench/gpu_suite.sh 2>&1 | tee $OUT/suite.log; cp bench_out/*.jsonl $OUT/ 2>/dev/null; \
#          tar czf $OUT/part_logs.tgz bench_out/*.log; tar czf $OUT/trace_f.tgz bench_out/trace_f; \
#          tar czf $OUT/trace_c.tgz bench_out/trace_c
#    (each part's whole output, and parts f's and c's traces; 8 files come back at most, 16 MiB each)
#    Its parts share 545 s on one GPU. They all start at once: a part with executables in .aot/ loads them
#    (under a minute); the others compile on the host's CPUs side by side (one XLA compile of the full
#    base is minutes of mostly serial work: 197 s for part f on the H200's host, session 20), at a lower
#    CPU priority than the part that is timing. Then they time one at a time, each in its turn and with a
#    limit on it (bench/progress.py), so a slow or failing part costs at most its turn and the rest still
#    run; a part that fails with loaded executables runs again, compiled there (<part>_live). suite.log
#    streams, so a killed run keeps its lines. Turns, in order:
#      f. ours:  bench/train_step.py  base UNet 1024^2 train step (cached inputs, AdamW + EMA) at 4 rows
#                per GPU, --attention=cudnn, no remat: the issue's 50% MFU target (bench/roofline.py
#                estimates 0.569 for it on an H100, 0.659 on an H200; 1 row cannot reach it, since the
#                optimizer and EMA cost ~28 ms a step whatever the batch: bench/RESULTS.md, sessions 18,
#                19, 22, 23, 24); then it traces 2 more steps: every kernel measured against its estimate
#      c. ours:  bench/sample_sdxl.py  30 Euler steps, CFG 5, 1024^2, bf16, cuDNN attention, + VAE decode;
#                then it traces one more batch
#      d. torch: bench/torch_reference.py sample (StableDiffusionXLPipeline, bf16, SDPA)
#      a. ours:  the train step at batch 1, --attention=xla
#      b. torch: bench/torch_reference.py train  (diffusers UNet2DConditionModel, bf16 autocast, SDPA)
#      e. ours:  part a with scanned transformer blocks (--set model.scan_blocks=True: compiles about 5x
#                faster; its step time against a's decides the option's default), the train step with
#                --attention=cudnn, part f with XLA's autotuning, the train step with remat=dots +
#                chunked attention, sampling with chunked attention
#    Only part f_autotuned autotunes (AUTOTUNE below); it compiles on the GPU, which autotuning needs, and
#    runs only where no part loads executables (or AUTOTUNED=1): its compile times candidate kernels on
#    the device, which would overlap the other parts' turns.
#    (a uses --attention=xla, the materialised baseline; the configs' default is chunked)
#    (stage 2, 512^2 batch 8: bench/train_step.py --config=stage2_512 --size=512x512 --per_device_batch=8)
#    then prints the ratios (diffusers time / ours: > 1 means ours is faster) and MFU.
# Record the output in bench/RESULTS.md with the date and the device line.
set -u
cd "$(dirname "$0")/.."
{  # the whole script is read before it runs: editing this file during a run cannot change that run

if [ "${1:-}" = "fetch" ]; then
    for d in /.whl/ /.aot/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
    ls -la .whl
    # The GPU machine installs these with --no-deps and reaches no index: each requirement must be in its
    # image (bench/gpu_image_packages.txt) or fetched here (importlib_metadata 10 declares lazy-importer).
    python3 bench/wheel_closure.py .whl bench/gpu_image_packages.txt
    exit
fi

# Sizes of the GPU run; `bash bench/gpu_suite.sh smoke` runs every part with tiny models on this CPU host
# instead (about 5 minutes: the script, the parts' command lines and the summary, not their speed), and
# `SMOKE=1 bash bench/gpu_suite.sh preflight` compiles them for this CPU first (into AOT_DIR, by default
# bench_out/smoke_aot/), as preflight does for the GPU, so that the smoke run loads them.
MODE=${1:-}
[ "$MODE" = smoke ] && SMOKE=1
SMOKE=${SMOKE:-}
TRAIN="--size=1024x1024 --per_device_batch=1 --steps=10 --warmup=2"
# The roofline estimate of a part's step (bench/roofline.py) next to its measured step time; a device it
# has no figures for (the smoke run's CPU) reports roofline_error and keeps the measurement.
ROOFLINE="--roofline=15"
SAMPLE="--size=1024 --batch=1 --steps=30 --repeats=2"
TORCH_TRAIN="--size=1024 --batch=1 --steps=10"
TORCH_SAMPLE="--size=1024 --batch=1 --steps=30 --repeats=2"
if [ -n "$SMOKE" ]; then
    PY=${PY:-.venv/bin/python}
    OUTDIR=${OUTDIR:-bench_out/smoke}
    export JAX_PLATFORMS=cpu
    unset XLA_FLAGS  # one device, as on the one-GPU machine (the tests force 8 CPU devices)
    TRAIN="--config=stage1_256 --config_arg=smoke --size=64x64 --per_device_batch=2 --steps=2 --warmup=1"
    SAMPLE="--preset=tiny --vae=tiny --size=64 --batch=1 --steps=3 --repeats=1"
    TORCH_TRAIN="--preset=tiny --vae=tiny --device=cpu --size=64 --batch=2 --steps=2 --warmup=1"
    TORCH_SAMPLE="--preset=tiny --vae=tiny --device=cpu --size=64 --batch=1 --steps=3 --repeats=1"
    BUDGET=${BUDGET:-1800} SCALE=${SCALE:-4}  # CPU compiles on a shared 2-core host
    AOT_DIR=${AOT_DIR:-bench_out/smoke_aot}  # CPU executables, not the GPU's in .aot/
fi
# Our parts' executables, one folder per part (bench/aot.py), at most AOT_MAX_MB in all: the device call
# carries 64 MiB, the wheels take 6.
AOT_DIR=${AOT_DIR:-.aot}
AOT_MAX_MB=${AOT_MAX_MB:-56}
# `PY=/path/to/gpu-aot/python bash bench/gpu_suite.sh preflight` compiles our parts for an H200
# (TOPOLOGY=gpu:<bench/gpu_specs name>) on this CPU host (XLA:GPU without a GPU: pip install -e
# '.[gpu-aot]' in its own environment; 2-6 minutes a part on 2 idle cores, 90 minutes for all at most)
# and keeps their executables in AOT_DIR; a lowering error or an out-of-memory shows here. Its lines carry
# XLA:GPU's memory analysis (compiler_peak_gib) and roofline estimates. Run it on an idle host.
PREFLIGHT=
if [ "$MODE" = preflight ]; then
    OUTDIR=${OUTDIR:-bench_out/preflight}
    export JAX_PLATFORMS=cpu
    unset XLA_FLAGS
    TRAIN_SAVE="--compile_only --devices=1" SAMPLE_SAVE="--compile_only"
    if [ -z "$SMOKE" ]; then
        PY=${PY:?set PY to the python of an environment with the gpu-aot extra}
        TOPOLOGY=${TOPOLOGY:-gpu:h200}
        TRAIN_SAVE="$TRAIN_SAVE --topology=$TOPOLOGY" SAMPLE_SAVE="$SAMPLE_SAVE --topology=$TOPOLOGY"
    else
        ROOFLINE=  # no figures for a CPU, and a compile-only run refuses what it cannot estimate
    fi
    BUDGET=${BUDGET:-5400} SCALE=${SCALE:-30} PREFLIGHT=1 SERIAL=1  # 2 cores: one compile at a time
    rm -rf "$AOT_DIR"
fi
# seconds for all parts (the device call adds ~30 s of installs and imports); multiplier of turn limits
BUDGET=${BUDGET:-545} SCALE=${SCALE:-1}
READY_BY=${READY_BY:-$((BUDGET * 3 / 5))}  # the first turn waits for all compiles until then at most
# XLA's autotuning (timing each GEMM's and convolution's candidate kernels on the GPU while compiling) is
# off except in the part named _autotuned: on the H200 it kept part f compiling past 212 s (session 20),
# and concurrent compiles would time their candidates against each other. Without it XLA compiles the
# program that a deviceless compile (and so bench/roofline.py's estimate) sees. AUTOTUNE=1: on in all.
AUTOTUNE=${AUTOTUNE:-0}
AUTOTUNED_FLAGS=${XLA_FLAGS:-}
[ "$AUTOTUNE" = 0 ] && [ -z "$PREFLIGHT" ] && export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
PY=${PY:-python3}
OUTDIR=${OUTDIR:-bench_out}
mkdir -p "$OUTDIR"
RES="$OUTDIR/suite.jsonl"
: > "$RES"
if [ -z "$MODE" ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The parts share the GPU while they compile (the sampling parts' first calls run then): no process
# takes the device's memory up front, each grows to what it uses.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if [ -z "$PREFLIGHT" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY -c "import jax, flax, optax, orbax.checkpoint as ocp, torch, diffusers, transformers, ml_collections; \
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', \
ocp.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', \
transformers.__version__, 'cuDNN', torch.backends.cudnn.version(), 'CUDA', torch.version.cuda)" \
        || echo '{"error": "imports"}'
fi
START=$(date +%s)
# Every part starts at once: ours load their executables from AOT_DIR where they have them, or compile
# (XLA's compiles of the full base take minutes of mostly serial host work each: 197 s for part f on the
# H200's host in session 20), at nice 10; then each waits for its turn (bench/progress.py). One part at a
# time has the device: the first in the launch order that is ready; it runs at nice 0 (renice: root).
# The first turn waits until every part that loads its executables and the torch parts are ready (every
# part, where none loads), or until READY_BY seconds into the suite; each turn's line says how many parts
# were still compiling beside it (compiling_beside > 0: the host's CPUs were busy while it timed).
# SERIAL=1 (preflight) runs the parts one after another instead.
trap 'kill $(jobs -p) 2>/dev/null' EXIT  # no part outlives the suite
TURNS="$OUTDIR/turns"
rm -rf "$TURNS"
mkdir -p "$TURNS"
NAMES=() EARLY=()
declare -A PIDS TURN_LIMIT RELAUNCH=()
launch() {  # launch NAME TURN_S CMD...: CMD starts now, under the suite's time limit; its turn gets TURN_S
    local name=$1 turn=$(($2 * SCALE)); shift 2
    NAMES+=("$name")
    TURN_LIMIT[$name]=$turn
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ -n "${SERIAL:-}" ]; then
        [ "$left" -lt 30 ] && return
        timeout "$left" "$@" > "$OUTDIR/$name.log" 2>&1
        echo $? > "$TURNS/$name.rc"
    else
        BENCH_TURN="$TURNS/$name" timeout "$left" "$@" > "$OUTDIR/$name.log" 2>&1 &
        PIDS[$name]=$!
    fi
}
ours() {  # ours NAME TURN_S train|sample ARGS...: one of our parts, through its executables (bench/aot.py)
    local name=$1 turn=$2 script=bench/train_step.py save=${TRAIN_SAVE:-}
    [ "$3" = sample ] && script=bench/sample_sdxl.py save=${SAMPLE_SAVE:-}
    shift 3
    if [ -n "$PREFLIGHT" ]; then  # compiled here; kept while the carry has room
        launch "$name" "$turn" $PY $script "$@" $save --aot=save --aot_dir="$AOT_DIR/$name"
        if [ "$(du -sm "$AOT_DIR" | cut -f1)" -gt "$AOT_MAX_MB" ]; then
            rm -rf "${AOT_DIR:?}/$name"
            echo "$name: its executables would take the carry past $AOT_MAX_MB MB; it compiles on the GPU"
        fi
    elif [ -d "$AOT_DIR/$name" ]; then  # loaded; should it fail, it runs again compiled (<name>_live)
        RELAUNCH[$name]=$(printf '%q ' "${name}_live" "$turn" nice -n 10 $PY $script "$@")
        EARLY+=("$name")
        # FAIL_AOT_PART=<name> (the smoke test): that part's loading run fails, to exercise the rerun
        local fail=
        [ "${FAIL_AOT_PART:-}" = "$name" ] && fail=--no_such_flag
        launch "$name" "$turn" $PY $script "$@" --aot=load --aot_dir="$AOT_DIR/$name" $fail
    else
        launch "$name" "$turn" nice -n 10 $PY $script "$@"
    fi
}
torch_part() {  # torch_part NAME TURN_S ARGS...: a diffusers part (ready at once: it builds in its turn)
    local name=$1
    EARLY+=("$name")
    launch "$@"
}
alive() { [ -n "${PIDS[$1]:-}" ] && kill -0 "${PIDS[$1]}" 2>/dev/null; }
compiling() {  # how many of these parts (default: all) are still before their turn
    local n=0 p
    [ $# -eq 0 ] && set -- "${NAMES[@]}"
    for p in "$@"; do alive "$p" && [ ! -e "$TURNS/$p.ready" ] && n=$((n + 1)); done
    echo $n
}
elapsed() { echo $(($(date +%s) - START)); }

# Parts f and c also trace 2 steps / 1 batch after their timing (--trace_steps, --trace_batches): each
# kernel's measured time next to its roofline estimate, in $OUTDIR/trace_f and trace_c (the XSpace and
# kernels.tsv) and their logs.
ours ours_train_1024_cudnn_b4 90 train $TRAIN --per_device_batch=4 --remat=none --attention=cudnn \
    --mesh=data=-1,fsdp=1,tensor=1 $ROOFLINE --trace_steps=2 --trace_dir="$OUTDIR/trace_f"
ours ours_sample_1024 40 sample $SAMPLE --attention=cudnn $ROOFLINE --trace_batches=1 \
    --trace_dir="$OUTDIR/trace_c"
[ -z "$PREFLIGHT" ] && torch_part torch_sample_1024 60 $PY bench/torch_reference.py sample $TORCH_SAMPLE
ours ours_train_1024 60 train $TRAIN --remat=none --attention=xla --mesh=data=-1,fsdp=1,tensor=1 $ROOFLINE
[ -z "$PREFLIGHT" ] && torch_part torch_train_1024 90 $PY bench/torch_reference.py train $TORCH_TRAIN
# Part a scanned: XLA:GPU's peak estimate is 71.5 GiB (a: 60.5).
ours ours_train_1024_scan 60 train $TRAIN --remat=none --attention=xla --mesh=data=-1,fsdp=1,tensor=1 \
    --set model.scan_blocks=True
ours ours_train_1024_cudnn 60 train $TRAIN --remat=none --attention=cudnn --mesh=data=-1,fsdp=1,tensor=1 \
    $ROOFLINE
# Part f with XLA's autotuning (the suite's other parts compile without it, AUTOTUNE=0 above): compiled on
# the GPU, which autotuning needs, while the parts before it time there; so by default only where none
# of them loads executables, and all compile for minutes anyway.
AUTOTUNED=${AUTOTUNED:-$([ ${#RELAUNCH[@]} -eq 0 ] && echo 1)}
[ -z "$PREFLIGHT" ] && [ "$AUTOTUNE" = 0 ] && [ -n "$AUTOTUNED" ] \
    && launch ours_train_1024_cudnn_b4_autotuned 90 env XLA_FLAGS="$AUTOTUNED_FLAGS" nice -n 10 \
        $PY bench/train_step.py $TRAIN --per_device_batch=4 --remat=none --attention=cudnn \
        --mesh=data=-1,fsdp=1,tensor=1
ours ours_train_1024_dots 60 train $TRAIN --remat=dots --attention=chunked --mesh=data=-1,fsdp=1,tensor=1
ours ours_sample_1024_chunked 40 sample $SAMPLE --attention=chunked
echo "launched ${#NAMES[@]} parts at $(elapsed) s"
[ -n "$PREFLIGHT" ] && { du -sm "$AOT_DIR"/* 2>/dev/null; echo "$AOT_DIR: $(du -sm "$AOT_DIR" | cut -f1) MB"; }

collect() {  # collect NAME RC [TURN_LINE]: the part's JSON lines (and its turn's), its rc where it failed
    grep '^{' "$OUTDIR/$1.log" | sed "s/^{/{\"part\": \"$1\", /" | tee -a "$RES"
    [ -n "${3:-}" ] && echo "$3" | tee -a "$RES"
    if [ "$2" -ne 0 ]; then
        echo "{\"part\": \"$1\", \"rc\": $2}" | tee -a "$RES"
        grep -v 'Delay kernel timed out' "$OUTDIR/$1.log" | tail -n 15
    fi
}
if [ -n "${SERIAL:-}" ]; then
    for name in "${NAMES[@]}"; do
        if [ -e "$TURNS/$name.rc" ]; then collect "$name" "$(cat "$TURNS/$name.rc")"
        else echo "{\"part\": \"$name\", \"skipped\": \"suite time used up\"}" | tee -a "$RES"; fi
    done
else
    [ ${#RELAUNCH[@]} -eq 0 ] && EARLY=("${NAMES[@]}")  # no part loads executables: all compile here
    while [ "$(compiling "${EARLY[@]}")" -gt 0 ] && [ "$(elapsed)" -lt "$READY_BY" ]; do sleep 2; done
    declare -A DONE=([none]=1)  # (a key, so that set -u takes the empty set)
    while [ "${#DONE[@]}" -le "${#NAMES[@]}" ]; do
        # the first part in the order that is ready (or has ended) takes the device next
        next=
        for name in "${NAMES[@]}"; do
            [ -n "${DONE[$name]:-}" ] && continue
            if ! alive "$name" || [ -e "$TURNS/$name.ready" ]; then next=$name; break; fi
        done
        [ -z "$next" ] && { sleep 1; continue; }
        DONE[$next]=1
        turn_line=
        if alive "$next"; then
            beside=$(compiling) t=$(date +%s) limit=${TURN_LIMIT[$next]}
            echo "=== $next: its turn at $(elapsed) s (limit $limit s; $beside parts compiling beside it)"
            renice -n 0 -p $(pgrep -P "${PIDS[$next]}") >/dev/null 2>&1  # from nice 10, where it was
            touch "$TURNS/$next.go"
            while alive "$next" && [ $(($(date +%s) - t)) -lt "$limit" ]; do sleep 0.5; done
            alive "$next" && kill "${PIDS[$next]}"
            turn_line="{\"part\": \"$next\", \"ready_at_s\": $(($(stat -c %Y "$TURNS/$next.ready") - START)),"
            turn_line="$turn_line \"go_at\": $t, \"turn_s\": $(($(date +%s) - t)), \"compiling_beside\": $beside}"
        fi
        wait "${PIDS[$next]}"
        rc=$?
        collect "$next" $rc "$turn_line"
        # a part that failed by itself (not cut by its limit: 143, or the suite's: 124) with loaded
        # executables runs again, compiled here, where 150 s are left (the sampling parts compile in about
        # 120 s on the H200's host, part f's step in 197 s)
        if [ -n "${RELAUNCH[$next]:-}" ] && [ $rc -ne 0 ] && [ $rc -ne 143 ] && [ $rc -ne 124 ] \
                && [ $((BUDGET - $(elapsed))) -gt $((150 * SCALE)) ]; then
            echo "=== $next failed with loaded executables (rc $rc): it runs again, compiled (${next}_live)"
            eval "launch ${RELAUNCH[$next]}"
        fi
    done
fi

$PY - "$RES" <<'EOF'
import json, sys
rows, failed = {}, set()
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        continue
    row = rows.setdefault(r.get("part"), {})
    for k, v in r.items():  # a part's first line, plus what its later lines add (train_step's roofline line)
        row.setdefault(k, v)
    if r.get("rc") or r.get("skipped"):
        failed.add(r.get("part"))
for live in [k for k in rows if k and k.endswith("_live")]:  # a rerun, compiled, of a part that failed
    part = live.removesuffix("_live")
    if live not in failed and not any(k in rows.get(part, {}) for k in ("step_s", "batch_s")):
        rows[part] = dict(rows.pop(live), rerun_after=rows.get(part, {}).get("rc"))
        failed.discard(part)
def traced(r):  # a part's trace (--trace_steps, --trace_batches) against its timed step or batch
    if "trace_span_s" not in r:
        return r.get("trace_error")
    timed = r.get("step_s") or r.get("batch_s")
    out = {"span_over_timed": round(r["trace_span_s"] / timed, 3) if timed else None,
           "busy_over_timed": round(r["trace_busy_s"] / timed, 3) if timed else None,
           "kernels": r.get("trace_ops")}
    for p in ("trace_", "trace_loop_"):  # the estimate's kernels (part c: the sampling loop's)
        if r.get(p + "matched_estimated_s"):
            measured, estimated = r[p + "matched_measured_s"], r[p + "matched_estimated_s"]
            out[p[6:] + "measured_over_estimated"] = round(measured / estimated, 3)
            out[p[6:] + "unlisted_s"] = r.get(p + "unmatched_s")
    return out
def ratio(a, b, key):
    if a in rows and b in rows and key in rows[a] and key in rows[b]:
        return round(rows[b][key] / rows[a][key], 3)
print(json.dumps({
    "summary": True,
    "device": next((r.get("device") for r in rows.values() if r.get("device")), None),
    "train_1024_mfu": rows.get("ours_train_1024", {}).get("mfu"),
    "train_1024_cudnn_mfu": rows.get("ours_train_1024_cudnn", {}).get("mfu"),
    "train_1024_cudnn_b4_mfu": rows.get("ours_train_1024_cudnn_b4", {}).get("mfu"),
    "train_1024_cudnn_b4_autotuned_mfu": rows.get("ours_train_1024_cudnn_b4_autotuned", {}).get("mfu"),
    "autotune_speedup": ratio("ours_train_1024_cudnn_b4_autotuned", "ours_train_1024_cudnn_b4", "step_s"),
    "train_1024_dots_mfu": rows.get("ours_train_1024_dots", {}).get("mfu"),
    "train_1024_scan_mfu": rows.get("ours_train_1024_scan", {}).get("mfu"),
    "scan_speedup": ratio("ours_train_1024_scan", "ours_train_1024", "step_s"),
    "train_speedup_vs_diffusers": ratio("ours_train_1024", "torch_train_1024", "step_s"),
    "train_speedup_vs_diffusers_cudnn": ratio("ours_train_1024_cudnn", "torch_train_1024", "step_s"),
    "sample_speedup_vs_diffusers": ratio("ours_sample_1024", "torch_sample_1024", "batch_s"),
    "sample_speedup_vs_diffusers_chunked": ratio("ours_sample_1024_chunked", "torch_sample_1024", "batch_s"),
    "compiler_peak_gib": {k: r["compiler_peak_gib"] for k, r in rows.items() if "compiler_peak_gib" in r},
    "roofline_mfu": {k: r["roofline_mfu"] for k, r in rows.items() if r.get("roofline_mfu")},
    # measured step time over bench/roofline.py's estimate from the same program (1.0: as estimated)
    "measured_over_roofline": {k: round(r[t] / r[f"roofline_{t}"], 3) for k, r in rows.items()
                               for t in ("step_s", "batch_s") if r.get(t) and r.get(f"roofline_{t}")},
    "roofline_errors": {k: r["roofline_error"] for k, r in rows.items() if r.get("roofline_error")},
    # a traced part (--trace_steps): its traced steps' span and busy time over the timed step; the measured
    # time of the kernels the estimate lists over their estimate; measured time in kernels it does not list
    "trace": {k: traced(r) for k, r in rows.items() if "trace_span_s" in r or "trace_error" in r},
    # a part whose vendor kernel was replaced by chunked attention measured chunked, whatever its name says
    "attention_fallbacks": {k: r["attention_fallbacks"] for k, r in rows.items() if r.get("attention_fallbacks")},
    # when each part had compiled (s into the suite), its turn's seconds, and the compiles beside it
    "turns": {k: {f: r[f] for f in ("ready_at_s", "turn_s", "compiling_beside")} for k, r in rows.items()
              if "turn_s" in r},
    "compile_s": {k: r["compile_s"] for k, r in rows.items() if "compile_s" in r},
    # the parts that loaded executables compiled ahead of time (bench/aot.py): what each program did
    "aot": {k: r["aot"] for k, r in rows.items() if "aot" in r},
    "rerun_compiled": sorted(k for k, r in rows.items() if "rerun_after" in r),
    "failed_or_skipped": sorted(failed),
}))
EOF
echo "suite done in $(( $(date +%s) - START )) s"
exit
}
