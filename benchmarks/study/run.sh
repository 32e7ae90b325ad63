#!/usr/bin/env bash
# The validation study behind the defaults (README: How the defaults were chosen). Each argument
# CORPUS/VARIANT runs the workflow on data/CORPUS/ with the shipped config.yaml and the overlay
# benchmarks/study/VARIANT.yaml, into results/study/CORPUS/VARIANT/, as far as the validation and
# test summaries; then every finished run is tabulated on the validation split (where settings are
# chosen) into benchmarks/study/validation.md. CORPUS/VARIANT@SEED runs the overlay at another seed.
# From the repo root:
#   bash benchmarks/study/run.sh general/default general/random-init demo/default demo/rounds8@1
set -euo pipefail
snakemake=${SNAKEMAKE:-.venv/bin/snakemake}
smalltalk=${SMALLTALK:-.venv/bin/smalltalk}
for run in "$@"; do
  corpus=${run%%/*} variant=${run#*/} out=results/study/$run seed=()
  if [[ $variant == *@* ]]; then seed=("seed=${variant#*@}") variant=${variant%@*}; fi
  # The shipped defaults are also the robustness benchmark's runs: one run, two tables.
  if [[ $variant == default ]]; then
    out=results/robustness/$corpus/default@$(sed 's/seed=//' <<<"${seed[0]:-seed=1234}")
  fi
  "$snakemake" "$out/eval/val/summary/overall.parquet" "$out/eval/summary/overall.parquet" \
    "$out/ledger/flops.parquet" \
    --cores all --configfile config.yaml "benchmarks/study/$variant.yaml" \
    --config "inputs=[data/$corpus/*.jsonl.zst]" "results=$out" "${seed[@]}"
done
runs=()
for summary in results/robustness/*/default@*/eval/val/summary/overall.parquet \
  results/study/*/*/eval/val/summary/overall.parquet; do
  [[ -e $summary ]] || continue
  out=${summary%/eval/val/summary/overall.parquet} name=${out#results/*/}
  runs+=(--run "${name%@1234}=$out")
done
"$smalltalk" compare --split val "${runs[@]}" --out results/study/validation.parquet \
  --markdown benchmarks/study/validation.md --stamp
cat benchmarks/study/validation.md
