# Stage 5: E experts, each on its own shard only, and the dense baseline on all shards with
# as many tokens as the experts together (equal training FLOPs, §3.1). Fully independent jobs.


rule route_validation:
    input:
        val=get_token_files("val"),
        routers=get_final_routers(),
        tokenizer=get_tokenizer_model,
    output:
        routing=R("eval/val/routing.parquet"),
        pool=R("eval/val/all.parquet"),
        experts=expand(R("eval/val/expert={e}.parquet"), e=EXPERTS),
    log:
        R("logs/eval/route_validation.log"),
    benchmark:
        R("benchmarks/eval/route_validation.tsv")
    conda:
        get_conda_env("router_score")
    threads: get_cluster_threads("router_score")
    resources:
        **get_cluster_resources("router_score"),
    params:
        config=CONFIG_FILE,
        launcher=get_launcher(),
    shell:
        "{params.launcher:q} -m smalltalk route-validation --config {params.config:q} "
        "--val {input.val:q} --tokenizer {input.tokenizer:q} --routers {input.routers:q} "
        "--routing {output.routing:q} --pool {output.pool:q} --experts {output.experts:q} "
        "--threads {threads} > {log:q} 2>&1"


rule train_expert:
    input:
        shards=get_expert_shards,
        val=get_expert_validation,
        tokenizer=get_tokenizer_model,
        branch=get_branch_point,
    output:
        weights=R("experts/e{e}/model.safetensors"),
        summary=R("experts/e{e}/summary.json"),
        metrics=R("experts/e{e}/metrics.parquet"),
    log:
        R("logs/experts/e{e}.log"),
    benchmark:
        R("benchmarks/experts/e{e}.tsv")
    conda:
        get_conda_env("expert_train")
    threads: get_cluster_threads("expert_train")
    resources:
        **get_cluster_resources("expert_train"),
    params:
        **rerun_when(seed="seed", training="training/expert", model="models/expert"),
        config=CONFIG_FILE,
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_model_dir,
        branch=get_branch_flag,
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role expert "
        "--index {wildcards.e} --tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} "
        "--val {input.val:q} {params.branch:q} --threads {params.process_threads:q} "
        "{input.shards:q} > {log:q} 2>&1"


rule train_dense:
    input:
        shards=get_shard_files(),
        val=R("eval/val/all.parquet"),
        tokenizer=get_tokenizer_model,
        branch=get_branch_point,
    output:
        weights=R("dense/model.safetensors"),
        summary=R("dense/summary.json"),
        metrics=R("dense/metrics.parquet"),
    log:
        R("logs/dense.log"),
    benchmark:
        R("benchmarks/dense.tsv")
    # The longest job first: on a few cores the experts then run beside it, not after it.
    priority: 1
    conda:
        get_conda_env("dense_train")
    threads: get_cluster_threads("dense_train")
    resources:
        **get_cluster_resources("dense_train"),
    params:
        **rerun_when(
            seed="seed",
            training="training/expert",
            scale="training/dense_scale",
            model="models/expert",
        ),
        config=CONFIG_FILE,
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_model_dir,
        branch=get_branch_flag,
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role dense "
        "--tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} --val {input.val:q} "
        "{params.branch:q} --threads {params.process_threads:q} {input.shards:q} > {log:q} 2>&1"


# BTM's seed phase (training.branch_steps, an option): the dense baseline's first steps, trained
# once; the experts and the dense baseline then go on from its checkpoint.
rule train_trunk:
    input:
        shards=get_shard_files(),
        val=R("eval/val/all.parquet"),
        tokenizer=get_tokenizer_model,
    output:
        branch=get_branch_point(),
        weights=R("trunk/model.safetensors"),
        summary=R("trunk/summary.json"),
        metrics=R("trunk/metrics.parquet"),
    log:
        R("logs/trunk.log"),
    benchmark:
        R("benchmarks/trunk.tsv")
    conda:
        get_conda_env("dense_train")
    threads: get_cluster_threads("dense_train")
    resources:
        **get_cluster_resources("dense_train"),
    params:
        **rerun_when(seed="seed", training="training/expert", model="models/expert"),
        config=CONFIG_FILE,
        steps=lookup(dpath="training/branch_steps", within=config),  # an argument: --stop-at
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_model_dir,
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role dense "
        "--stop-at {params.steps} --tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} "
        "--val {input.val:q} --threads {params.process_threads:q} {input.shards:q} > {log:q} 2>&1"


# The dense baselines given the mixture's whole training budget (training.baselines): once the
# routers have scored every train sequence, what they spent is known, and so the steps of each.
rule baseline_budget:
    input:
        routers=get_router_summaries,
        em_scores=get_em_scores,
        shard_scores=expand(R("segmentation/scores/{chunk}.parquet"), chunk=CHUNKS),
        tokenizer=get_tokenizer_model,
    output:
        R("baselines/budget.json"),
    log:
        R("logs/baselines/budget.log"),
    benchmark:
        R("benchmarks/baselines/budget.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        **rerun_when(
            training="training/expert",
            scale="training/dense_scale",
            baselines="training/baselines",
            models="models",
        ),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk baseline-budget --config {params.config:q} "
        "--tokenizer {input.tokenizer:q} --router-summaries {input.routers:q} "
        "--em-scores {input.em_scores:q} --shard-scores {input.shard_scores:q} "
        "--out {output:q} > {log:q} 2>&1"


# From scratch on all shards at the dense batch, the steps that budget gives.
rule train_baseline:
    input:
        shards=get_shard_files(),
        val=R("eval/val/all.parquet"),
        tokenizer=get_tokenizer_model,
        budget=R("baselines/budget.json"),
    output:
        weights=R("baselines/{baseline}/model.safetensors"),
        summary=R("baselines/{baseline}/summary.json"),
        metrics=R("baselines/{baseline}/metrics.parquet"),
    log:
        R("logs/baselines/{baseline}.log"),
    benchmark:
        R("benchmarks/baselines/{baseline}.tsv")
    wildcard_constraints:
        baseline="dense_compute|dense_large",
    priority: 1
    conda:
        get_conda_env("dense_train")
    threads: get_cluster_threads("dense_train")
    resources:
        **get_cluster_resources("dense_train"),
    params:
        **rerun_when(
            seed="seed",
            training="training/expert",
            scale="training/dense_scale",
            models="models",
        ),
        config=CONFIG_FILE,
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_model_dir,
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role dense "
        "--baseline {wildcards.baseline:q} --budget {input.budget:q} "
        "--tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} --val {input.val:q} "
        "--threads {params.process_threads:q} {input.shards:q} > {log:q} 2>&1"
