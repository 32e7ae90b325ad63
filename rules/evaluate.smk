# Stage 6: route every test sequence by its prefix, score the routed expert and the dense
# model; per-sequence rows, so every aggregate is a DuckDB query. The validation split is
# scored the same way on request only (`snakemake results/eval/val/summary/overall.parquet`):
# it is where settings are chosen, so the test split stays untouched by the choice.


rule evaluate_chunk:
    input:
        tokens=R("tokens/{split}/{chunk}.parquet"),
        routers=get_final_routers(),
        experts=get_expert_models(),
        dense=get_dense("model.safetensors"),
        tokenizer=get_tokenizer_model,
    output:
        R("eval/{split}/{chunk}.parquet"),
    log:
        R("logs/eval/{split}/{chunk}.log"),
    benchmark:
        R("benchmarks/eval/{split}/{chunk}.tsv")
    conda:
        get_conda_env("evaluate")
    threads: get_cluster_threads("evaluate")
    resources:
        **get_cluster_resources("evaluate"),
    params:
        launcher=get_launcher(),
        config=CONFIG_FILE,
        eval=lookup(dpath="eval", within=config),
    shell:
        "{params.launcher:q} -m smalltalk evaluate --config {params.config:q} "
        "--tokens {input.tokens:q} --tokenizer {input.tokenizer:q} --routers {input.routers:q} "
        "--experts {input.experts:q} --dense {input.dense:q} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"


rule aggregate_eval:
    input:
        expand(R("eval/test/{chunk}.parquet"), chunk=CHUNKS),
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


use rule aggregate_eval as aggregate_val_eval with:
    input:
        expand(R("eval/val/{chunk}.parquet"), chunk=CHUNKS),
    output:
        expand(R("eval/val/summary/{table}.parquet"), table=EVAL_TABLES),
    log:
        R("logs/eval/aggregate_val.log"),
    benchmark:
        R("benchmarks/eval/aggregate_val.tsv")


rule flops_ledger:
    input:
        routers=get_router_summaries,
        em_scores=get_em_scores,
        shard_scores=expand(R("segmentation/scores/{chunk}.parquet"), chunk=CHUNKS),
        experts=expand(R("experts/e{e}/summary.json"), e=EXPERTS),
        dense=get_dense("summary.json"),
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
    shell:
        "python -m smalltalk ledger-flops --config {params.config:q} "
        "--tokenizer {input.tokenizer:q} --router-summaries {input.routers:q} "
        "--em-scores {input.em_scores:q} --shard-scores {input.shard_scores:q} "
        "--expert-summaries {input.experts:q} "
        "--dense-summary {input.dense:q} --out {output.flops:q} --paper-out {output.paper:q} "
        "> {log:q} 2>&1"
