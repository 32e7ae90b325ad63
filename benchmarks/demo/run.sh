#!/usr/bin/env bash
# The demo's defaults over seeds on the test split: the workflow on the shipped config.yaml once
# per seed (into the robustness benchmark's folders, results/robustness/demo/default@SEED, so
# that benchmark reuses them), then one table of every ratio with its interval, over seeds too,
# into benchmarks/demo/results.md, stamped with the commit, processor, precision and date.
# From the repo root: bash benchmarks/demo/run.sh [SEED ...]   (default: 1234 1 2 3 4)
set -euo pipefail
snakemake=${SNAKEMAKE:-.venv/bin/snakemake}
smalltalk=${SMALLTALK:-.venv/bin/smalltalk}
seeds=("${@:-1234 1 2 3 4}")
read -ra seeds <<<"${seeds[*]}"
runs=()
for seed in "${seeds[@]}"; do
  out=results/robustness/demo/default@$seed
  "$snakemake" all --cores all --configfile config.yaml \
    --config "inputs=[data/demo/*.jsonl.zst]" "results=$out" "seed=$seed"
  runs+=(--run "demo@$seed=$out")
done
"$smalltalk" compare "${runs[@]}" --out results/robustness/demo/comparison.parquet \
  --markdown benchmarks/demo/results.md --stamp
cat benchmarks/demo/results.md
