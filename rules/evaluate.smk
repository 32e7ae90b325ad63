# Stage 6: route every test sequence by its prefix, score the routed expert and the dense
# model; per-sequence rows, so every aggregate is a DuckDB query. The validation split is
# scored the same way on request only (`snakemake results/eval/val/summary/overall.parquet`):
# it is where settings are chosen, so the test split stays untouched by the choice.


rule route_eval_part:
    input:
        tokens=get_part_tokens,
        router=get_eval_router,
        tokenizer=get_tokenizer_model,
    output:
        R("eval/{split}/routes/{router}/{part}.parquet"),
    log:
        R("logs/eval/{split}/routes/{router}/{part}.log"),
    benchmark:
        R("benchmarks/eval/{split}/routes/{router}/{part}.tsv")
    conda:
        get_conda_env("router_score")
    threads: get_cluster_threads("router_score")
    resources:
        **get_cluster_resources("router_score"),
    params:
        **rerun_when(prefix_lens="eval/prefix_lens", prefix_len="routing/prefix_len"),
        config=CONFIG_FILE,
        launcher=get_launcher(),
    shell:
        "{params.launcher:q} -m smalltalk route-part --config {params.config:q} "
        "--tokens {input.tokens:q} --tokenizer {input.tokenizer:q} --routers {input.router:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"


# One model at a time: retraining or adding an expert re-scores its own part only.
rule score_eval_part:
    input:
        tokens=get_part_tokens,
        weights=get_scored_weights,
        tokenizer=get_tokenizer_model,
    output:
        R("eval/{split}/scores/{model}/{part}.parquet"),
    log:
        R("logs/eval/{split}/scores/{model}/{part}.log"),
    benchmark:
        R("benchmarks/eval/{split}/scores/{model}/{part}.tsv")
    wildcard_constraints:
        model=r"e\d+|dense|dense_compute|dense_large",
    conda:
        get_conda_env("evaluate")
    threads: get_cluster_threads("evaluate")
    resources:
        **get_cluster_resources("evaluate"),
    params:
        **rerun_when(batch_size="eval/batch_size", prefix_len="routing/prefix_len"),
        config=CONFIG_FILE,
        launcher=get_launcher(),
        architecture=get_scored_architecture,
    shell:
        "{params.launcher:q} -m smalltalk score-part --config {params.config:q} "
        "--tokens {input.tokens:q} --tokenizer {input.tokenizer:q} --weights {input.weights:q} "
        "--architecture {params.architecture:q} --out {output:q} --threads {threads} "
        "> {log:q} 2>&1"


# No model loaded: routing, oracle and top-k mixture from the routes and scores.
rule evaluate_part:
    input:
        tokens=get_part_tokens,
        routes=get_route_files,
        experts=get_expert_score_files,
        dense=R("eval/{split}/scores/dense/{part}.parquet"),
        baselines=get_baseline_score_files,
    output:
        R("eval/{split}/{part}.parquet"),
    log:
        R("logs/eval/{split}/{part}.log"),
    benchmark:
        R("benchmarks/eval/{split}/{part}.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=4000,
        runtime=30,
    params:
        **rerun_when(topk="eval/topk", temperature="eval/temperature"),
        config=CONFIG_FILE,
        experts=[],
        baselines=get_baseline_scores_flag,
    shell:
        "python -m smalltalk merge-part --config {params.config:q} --tokens {input.tokens:q} "
        "--routes {input.routes:q} --expert-scores {input.experts:q} "
        "--dense-scores {input.dense:q} {params.baselines:q} {params.experts:q} "
        "--out {output:q} > {log:q} 2>&1"


# The rows of a subset of the experts (`{kept}`: indices joined by "-", e.g. 0-2) from the same
# pieces, no model run again: a mixture with experts retired, or as it was before it grew.
use rule evaluate_part as evaluate_part_subset with:
    output:
        R("eval/{split}/subsets/{kept}/{part}.parquet"),
    log:
        R("logs/eval/{split}/subsets/{kept}/{part}.log"),
    benchmark:
        R("benchmarks/eval/{split}/subsets/{kept}/{part}.tsv")
    params:
        **rerun_when(topk="eval/topk", temperature="eval/temperature"),
        config=CONFIG_FILE,
        experts=get_subset_flag,
        baselines=get_baseline_scores_flag,


rule aggregate_eval:
    input:
        get_eval_files("eval/{split}/{part}.parquet", "test"),
    output:
        expand(R("eval/summary/{table}.parquet"), table=EVAL_TABLES),
    log:
        R("logs/eval/aggregate.log"),
    benchmark:
        R("benchmarks/eval/aggregate.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        out_dir=get_summary_dir,
    shell:
        "python -m smalltalk aggregate --out-dir {params.out_dir:q} {input:q} > {log:q} 2>&1"


use rule aggregate_eval as aggregate_subset_eval with:
    input:
        get_subset_eval_files,
    output:
        expand(
            R("eval/{{split}}/subsets/{{kept}}/summary/{table}.parquet"),
            table=EVAL_TABLES,
        ),
    log:
        R("logs/eval/{split}/subsets/{kept}/aggregate.log"),
    benchmark:
        R("benchmarks/eval/{split}/subsets/{kept}/aggregate.tsv")


use rule aggregate_eval as aggregate_val_eval with:
    input:
        get_eval_files("eval/{split}/{part}.parquet", "val"),
    output:
        expand(R("eval/val/summary/{table}.parquet"), table=EVAL_TABLES),
    log:
        R("logs/eval/aggregate_val.log"),
    benchmark:
        R("benchmarks/eval/aggregate_val.tsv")


rule grow_summary:
    input:
        after=get_eval_files("eval/{split}/{part}.parquet", "test"),
        before=get_eval_files(
            f"eval/{{split}}/subsets/{BEFORE_GROWING}/{{part}}.parquet", "test"
        ),
    output:
        table=R("eval/summary/grow.parquet"),
        markdown=R("eval/summary/grow.md"),
    log:
        R("logs/eval/grow.log"),
    benchmark:
        R("benchmarks/eval/grow.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        **rerun_when(grow="grow"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk grow-summary --config {params.config:q} --after {input.after:q} "
        "--before {input.before:q} --out {output.table:q} --markdown {output.markdown:q} "
        "> {log:q} 2>&1"


# The same on the validation split, on request (`snakemake results/eval/val/summary/grow.parquet`):
# where to choose a grow entry's `router_steps`, leaving the test split untouched.
use rule grow_summary as grow_summary_val with:
    input:
        after=get_eval_files("eval/{split}/{part}.parquet", "val"),
        before=get_eval_files(
            f"eval/{{split}}/subsets/{BEFORE_GROWING}/{{part}}.parquet", "val"
        ),
    output:
        table=R("eval/val/summary/grow.parquet"),
        markdown=R("eval/val/summary/grow.md"),
    log:
        R("logs/eval/grow_val.log"),
    benchmark:
        R("benchmarks/eval/grow_val.tsv")


rule flops_ledger:
    input:
        routers=get_router_summaries,
        em_scores=get_em_scores,
        shard_scores=expand(R("segmentation/scores/{chunk}.parquet"), chunk=CHUNKS),
        experts=expand(R("experts/e{e}/summary.json"), e=EXPERTS),
        dense=get_dense("summary.json"),
        baselines=expand(R("baselines/{baseline}/summary.json"), baseline=BASELINES),
        tokenizer=get_tokenizer_model,
    output:
        flops=R("ledger/flops.parquet"),
        paper=R("ledger/paper_table3.parquet"),
    log:
        R("logs/ledger/flops.log"),
    benchmark:
        R("benchmarks/ledger/flops.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        config=CONFIG_FILE,
        baselines=get_baseline_summaries_flag,
    shell:
        "python -m smalltalk ledger-flops --config {params.config:q} "
        "--tokenizer {input.tokenizer:q} --router-summaries {input.routers:q} "
        "--em-scores {input.em_scores:q} --shard-scores {input.shard_scores:q} "
        "--expert-summaries {input.experts:q} "
        "--dense-summary {input.dense:q} {params.baselines:q} --out {output.flops:q} "
        "--paper-out {output.paper:q} > {log:q} 2>&1"
