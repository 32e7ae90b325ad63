# Stages 1-2: tokenizer, then one tokenize job per input chunk.


rule train_tokenizer:
    input:
        sample=get_tokenizer_sample,
    output:
        R("tokenizer/spm.model"),
    log:
        R("logs/train_tokenizer.log"),
    benchmark:
        R("benchmarks/train_tokenizer.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: get_cluster_threads("tokenizer")
    resources:
        **get_cluster_resources("tokenizer"),
    params:
        **rerun_when(seed="seed", tokenizer="tokenizer"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk train-tokenizer --config {params.config:q} --out {output:q} "
        "--threads {threads} {input.sample:q} > {log:q} 2>&1"


rule tokenize_chunk:
    input:
        files=get_chunk_files,
        tokenizer=get_tokenizer_model,
    output:
        train=R("tokens/train/{chunk}.parquet"),
        val=R("tokens/val/{chunk}.parquet"),
        test=R("tokens/test/{chunk}.parquet"),
        stats=R("tokens/stats/{chunk}.json"),
    log:
        R("logs/tokenize/{chunk}.log"),
    benchmark:
        R("benchmarks/tokenize/{chunk}.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: get_cluster_threads("tokenize")
    resources:
        **get_cluster_resources("tokenize"),
    params:
        **rerun_when(
            fields="fields",
            splits="splits",
            seq_len="seq_len",
            on_bad_record="on_bad_record",
        ),
        config=CONFIG_FILE,
        out_dir=get_tokens_dir,
    shell:
        "python -m smalltalk tokenize --config {params.config:q} --chunk {wildcards.chunk} "
        "--tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} --stats {output.stats:q} "
        "--threads {threads} {input.files:q} > {log:q} 2>&1"


rule summarize_tokens:
    input:
        expand(R("tokens/stats/{chunk}.json"), chunk=ALL_CHUNKS),
    output:
        R("tokens/summary.tsv"),
    log:
        R("logs/summarize_tokens.log"),
    benchmark:
        R("benchmarks/summarize_tokens.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m smalltalk summarize-tokens --out {output:q} {input:q} > {log:q} 2>&1"
