# Stages 1-2: tokenizer, then one tokenize job per input chunk.


rule train_tokenizer:
    input:
        get_tokenizer_sample,
    output:
        R("tokenizer/spm.model"),
    log:
        R("logs/train_tokenizer.log"),
    benchmark:
        R("benchmarks/train_tokenizer.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 4  # capped by --cores
    resources:
        **get_cluster_resources(),
        mem_mb=4000,
        runtime=120,
    params:
        config=CONFIG_FILE,
        tokenizer=lookup(dpath="tokenizer", within=config),
    shell:
        "python -m smalltalk train-tokenizer --config {params.config} --out {output} "
        "--threads {threads} {input} > {log} 2>&1"


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
        config=CONFIG_FILE,
        out_dir=get_tokens_dir,
        fields=lookup(dpath="fields", within=config),
        splits=lookup(dpath="splits", within=config),
        seq_len=lookup(dpath="seq_len", within=config),
        on_bad_record=lookup(dpath="on_bad_record", within=config),
    shell:
        "python -m smalltalk tokenize --config {params.config} --chunk {wildcards.chunk} "
        "--tokenizer {input.tokenizer} --out-dir {params.out_dir} --stats {output.stats} "
        "--threads {threads} {input.files} > {log} 2>&1"


rule summarize_tokens:
    input:
        expand(R("tokens/stats/{chunk}.json"), chunk=CHUNKS),
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
        "python -m smalltalk summarize-tokens --out {output} {input} > {log} 2>&1"
