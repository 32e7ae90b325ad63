# Stage 4: the final routers segment every train chunk into per-expert Hive-style shards.


rule shard_chunk:
    input:
        tokens=R("tokens/train/{chunk}.parquet"),
        routers=get_final_routers(),
        tokenizer=get_tokenizer_model,
    output:
        shards=expand(R("shards/expert={e}/{{chunk}}.parquet"), e=EXPERTS),
        scores=R("segmentation/scores/{chunk}.parquet"),
    log:
        R("logs/shard/{chunk}.log"),
    benchmark:
        R("benchmarks/shard/{chunk}.tsv")
    conda:
        get_conda_env("shard")
    threads: get_cluster_threads("shard")
    resources:
        **get_cluster_resources("shard"),
    params:
        config=CONFIG_FILE,
        launcher=get_launcher(),
    shell:
        "{params.launcher:q} -m smalltalk shard --config {params.config:q} "
        "--tokens {input.tokens:q} --tokenizer {input.tokenizer:q} --routers {input.routers:q} "
        "--shards {output.shards:q} --scores {output.scores:q} --threads {threads} > {log:q} 2>&1"


rule check_shards:
    input:
        train=get_token_files("train"),
        shards=get_shard_files(),
    output:
        R("segmentation/check.json"),
    log:
        R("logs/shard/check.log"),
    benchmark:
        R("benchmarks/shard/check.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=4000,
        runtime=30,
    params:
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk check-shards --config {params.config:q} --train {input.train:q} "
        "--shards {input.shards:q} --out {output:q} > {log:q} 2>&1"


rule communication_ledger:
    input:
        assignments=get_em_files("routers/r{r}/assignment.parquet"),
        shard_scores=expand(R("segmentation/scores/{chunk}.parquet"), chunk=CHUNKS),
    output:
        R("ledger/communication.parquet"),
    log:
        R("logs/ledger/communication.log"),
    benchmark:
        R("benchmarks/ledger/communication.tsv")
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
        "python -m smalltalk ledger --config {params.config:q} "
        "--assignments {input.assignments:q} --shard-scores {input.shard_scores:q} "
        "--out {output:q} > {log:q} 2>&1"
