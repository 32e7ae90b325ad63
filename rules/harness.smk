# Using the trained mixture: lm-evaluation-harness on an offline multiple-choice task built from
# the test split, the routed mixture next to the dense baseline (the paper's Fig. 3, in small).


rule harness_task:
    input:
        tokens=get_token_files("test"),
        tokenizer=get_tokenizer_model,
    output:
        data=R("harness/continuation_choice/continuation_choice.jsonl"),
        task=R("harness/continuation_choice/continuation_choice.yaml"),
    log:
        R("logs/harness/task.log"),
    benchmark:
        R("benchmarks/harness/task.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        **rerun_when(seed="seed", harness="harness"),
        config=CONFIG_FILE,
        out_dir=get_summary_dir,
    shell:
        "python -m smalltalk harness-task --config {params.config:q} "
        "--tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} {input.tokens:q} "
        "> {log:q} 2>&1"


rule lm_eval:
    input:
        task=R("harness/continuation_choice/continuation_choice.yaml"),
        data=R("harness/continuation_choice/continuation_choice.jsonl"),
        routers=get_final_routers(),
        experts=get_expert_models(),
        dense=get_dense("model.safetensors"),
        tokenizer=get_tokenizer_model,
    output:
        scores=R("harness/scores.parquet"),
        raw=R("harness/lm_eval.json"),
    log:
        R("logs/harness/lm_eval.log"),
    benchmark:
        R("benchmarks/harness/lm_eval.tsv")
    conda:
        get_conda_env("evaluate")
    threads: get_cluster_threads("evaluate")
    resources:
        **get_cluster_resources("evaluate"),
    params:
        launcher=get_launcher(),
        results=get_results_dir,
    shell:
        "{params.launcher:q} -m smalltalk lm-eval --results {params.results:q} "
        "--tasks continuation_choice --models mixture dense --out {output.scores:q} "
        "--raw {output.raw:q} --threads {threads} > {log:q} 2>&1"


rule harness_table:
    input:
        R("harness/scores.parquet"),
    output:
        report(
            R("report/harness.html"),
            caption="../reports/harness_table.rst",
            category="Evaluation",
        ),
    log:
        R("logs/report/harness_table.log"),
    benchmark:
        R("benchmarks/report/harness_table.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m smalltalk tables --out {output:q} "
        "--table 'lm-evaluation-harness: mixture and dense baseline='{input:q} > {log:q} 2>&1"
