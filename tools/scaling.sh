#!/usr/bin/env bash
# Scaling of one preset on this node: the same training command on 1 GPU, then on N GPUs under each layout,
# same global batch; prints the median tokens/s of the last steps from each run's metrics.jsonl and the
# scaling efficiency (N-GPU tokens/s over N x one GPU's).
#   tools/scaling.sh configs/pretrain_1b.yaml 2 [section.key=value ...]
#   LAYOUTS="dp;parallel.ep=2;parallel.tp=2 parallel.sequence_parallel=true" tools/scaling.sh ...
# LAYOUTS: ';'-separated override sets for the N-GPU runs ("dp" = data parallel only, the default). A layout's
# overrides come after the common ones, so weak scaling (the batch grows with the data-parallel size) is a layout
# with its own batch: LAYOUTS="train.global_batch=256;parallel.ep=4 train.global_batch=256" tools/scaling.sh
# configs/pretrain_1b.yaml 8 train.global_batch=32 train.micro_batch=8 (tokens/s per GPU against one GPU's).
# BASELINE=none: no one-GPU run; every layout is compared with the first (an A/B of flags on N GPUs): its
# tokens/s as a ratio of the first's, and the largest loss difference over the steps both logged, e.g.
#   BASELINE=none LAYOUTS="parallel.tp_comm_overlap=false;parallel.tp_comm_overlap=true" tools/scaling.sh \
#     configs/pretrain_1b.yaml 2 parallel.tp=2 parallel.sequence_parallel=true train.steps=8
set -euo pipefail
config=$1; n=$2; shift 2
out=${OUT:-runs/scaling}
mkdir -p "$out"
IFS=';' read -r -a layouts <<< "${LAYOUTS:-dp}"
names=()
launch() {  # name nproc overrides...
  local name=$1 nproc=$2; shift 2
  rm -rf "$out/$name"
  torchrun --standalone --nproc-per-node "$nproc" -m complexity_dist train "$config" \
    train.run_dir="$out/$name" tracking.enabled=false checkpoint.enabled=false "$@" > "$out/$name.log" 2>&1 \
    || { echo "$name FAILED:"; grep -m5 -E "Error|error:" "$out/$name.log"; return 1; }
}
if [[ ${BASELINE:-gpu1} != none ]]; then
  launch gpu1 1 "$@" || exit 1
  names+=(gpu1)
fi
for layout in "${layouts[@]}"; do
  name=$(echo "gpu$n $layout" | sed -e 's/parallel\.//g' -e 's/=/-/g' -e 's/sequence_parallel-true/sp/' | tr -c 'A-Za-z0-9_.\n-' '_')
  # shellcheck disable=SC2086  # a layout is several overrides
  launch "$name" "$n" "$@" $([[ $layout == dp ]] || echo "$layout") && names+=("$name")
done
python - "$out" "$n" "${names[@]}" <<'PY'
import sys
from complexity_dist.train.compare import read_losses
from complexity_dist.train.metrics import steady_throughput
out, n, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
base = None
for name in names:
    t = steady_throughput(f"{out}/{name}/metrics.jsonl")
    gpus = 1 if name == "gpu1" else n
    if base is None:
        base, eff = t.tokens_per_s, ""
    elif names[0] == "gpu1":
        eff = f", scaling {t.tokens_per_s / (n * base):.1%} of {n} x one GPU"
    else:  # an A/B: against the first layout, speed and losses
        a, b = read_losses(f"{out}/{names[0]}"), read_losses(f"{out}/{name}")
        diff = max((abs(b[s] - a[s]) for s in a.keys() & b.keys()), default=float("nan"))
        eff = f", {t.tokens_per_s / base:.1%} of {names[0]}, largest loss difference {diff:.2e}"
    mfu = f"{t.mfu:.1%}" if t.mfu is not None else "n/a"
    print(f"{name}: {t.tokens_per_s:,.0f} tokens/s ({t.tokens_per_s / gpus:,.0f} per GPU), MFU {mfu}, steps "
          f"{t.first_step}-{t.last_step}, final loss {t.final_loss or float('nan'):.5f}, "
          f"peak {t.peak_mem_gib or float('nan'):.1f} "
          f"GiB{eff}")
PY
