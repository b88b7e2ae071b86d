#!/usr/bin/env bash
# Data-parallel scaling of one preset on this node: the same training command on 1 GPU, then on N GPUs, same
# global batch; prints the median tokens/s of the last steps from each run's metrics.jsonl.
#   tools/scaling.sh configs/pretrain_1b.yaml 2 [section.key=value ...]
set -euo pipefail
config=$1; n=$2; shift 2
out=${OUT:-runs/scaling}
for nproc in 1 "$n"; do
  run_dir="$out/dp$nproc"
  rm -rf "$run_dir"
  torchrun --standalone --nproc-per-node "$nproc" -m complexity_dist train "$config" \
    train.run_dir="$run_dir" tracking.enabled=false checkpoint.enabled=false "$@" > "$out/dp$nproc.log" 2>&1 \
    || { tail -30 "$out/dp$nproc.log"; exit 1; }
done
python - "$out" "$n" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
rates = {}
for nproc in (1, n):
    rows = [json.loads(l) for l in open(f"{out}/dp{nproc}/metrics.jsonl")]
    last = rows[len(rows) // 3:]  # past compilation and warm-up
    tps = statistics.median((b["tokens"] - a["tokens"]) / b["step_time_s"] for a, b in zip(last, last[1:]))
    rates[nproc] = tps
    print(f"{nproc} GPU(s): {tps:,.0f} tokens/s ({tps / nproc:,.0f} per GPU), steps {last[0]['step']}-{rows[-1]['step']}, "
          f"final loss {rows[-1]['loss']:.5f}, peak {rows[-1].get('peak_mem_gib', float('nan')):.1f} GiB")
print(f"scaling efficiency {rates[n] / (n * rates[1]):.1%} of {n} x one GPU")
PY
