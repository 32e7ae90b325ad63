# Stage 3: router EM (paper §2.2, Algorithm 1). Round 0 assigns block 0 at random; in round
# r >= 1 router e trains on its share of block r-1, scores block r, and one gather job makes
# the balanced assignment. Score vectors are all the routers exchange. The gather job is a
# checkpoint: its diagnostics decide whether round r+1 runs (routing.stop), and final_routers
# copies the last round's routers to routers/final/, the one path every later stage reads.


rule sample_em_blocks:
    input:
        train=get_em_token_files("train"),
        val=get_em_token_files("val"),
    output:
        blocks=expand(R("routers/blocks/b{r}.parquet"), r=ROUNDS),
        probe=R("routers/probe.parquet"),
    log:
        R("logs/routers/sample_em_blocks.log"),
    benchmark:
        R("benchmarks/routers/sample_em_blocks.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=4000,
        runtime=60,
    params:
        **rerun_when(seed="seed", routing="routing"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk em-sample --config {params.config:q} --train {input.train:q} "
        "--val {input.val:q} --blocks {output.blocks:q} --probe {output.probe:q} > {log:q} 2>&1"


rule fit_router:
    input:
        sample=expand(R("routers/blocks/b{r}.parquet"), r=ROUNDS),
        tokenizer=get_tokenizer_model,
    output:
        R("routers/{method}.npz"),
    log:
        R("logs/routers/fit_{method}.log"),
    benchmark:
        R("benchmarks/routers/fit_{method}.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=8000,
        runtime=60,
    params:
        **rerun_when(seed="seed", routing="routing"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk fit-router --config {params.config:q} --tokenizer {input.tokenizer:q} "
        "--out {output:q} {input.sample:q} > {log:q} 2>&1"


rule assign_first_round:
    input:
        block=R("routers/blocks/b0.parquet"),
        tokenizer=get_tokenizer_model,
    output:
        assignment=R("routers/r0/assignment.parquet"),
        diagnostics=R("routers/r0/diagnostics.parquet"),
        contingency=R("routers/r0/contingency.parquet"),
    log:
        R("logs/routers/r0/assign.log"),
    benchmark:
        R("benchmarks/routers/r0/assign.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        **rerun_when(seed="seed", init="routing/init", tfidf="routing/tfidf"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk assign --config {params.config:q} --round 0 --block {input.block:q} "
        "--tokenizer {input.tokenizer:q} --out {output.assignment:q} --diagnostics {output.diagnostics:q} "
        "--contingency {output.contingency:q} > {log:q} 2>&1"


rule train_router:
    input:
        unpack(get_router_training_inputs),
    output:
        weights=R("routers/r{r}/e{e}.safetensors"),
        summary=R("routers/r{r}/e{e}/summary.json"),
    log:
        R("logs/routers/r{r}/train_e{e}.log"),
    benchmark:
        R("benchmarks/routers/r{r}/train_e{e}.tsv")
    conda:
        get_conda_env("router_train")
    threads: get_cluster_threads("router_train")
    resources:
        **get_cluster_resources("router_train"),
    params:
        **rerun_when(seed="seed", training="training/router", model="models/router"),
        config=CONFIG_FILE,
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_router_work_dir,
        init=get_router_init_flag,
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role router "
        "--index {wildcards.e} --round {wildcards.r} --assignment {input.assignment:q} "
        "{params.init:q} --tokenizer {input.tokenizer:q} --out-dir {params.out_dir:q} "
        "--weights {output.weights:q} --threads {params.process_threads:q} {input.block:q} "
        "> {log:q} 2>&1"


rule score_router:
    input:
        weights=R("routers/r{r}/e{e}.safetensors"),
        block=R("routers/blocks/b{r}.parquet"),
        probe=R("routers/probe.parquet"),
        tokenizer=get_tokenizer_model,
    output:
        scores=R("routers/r{r}/scores/e{e}.parquet"),
        probe=R("routers/r{r}/probe/e{e}.parquet"),
    log:
        R("logs/routers/r{r}/score_e{e}.log"),
    benchmark:
        R("benchmarks/routers/r{r}/score_e{e}.tsv")
    conda:
        get_conda_env("router_score")
    threads: get_cluster_threads("router_score")
    resources:
        **get_cluster_resources("router_score"),
    params:
        config=CONFIG_FILE,
        launcher=get_launcher(),
    shell:
        "{params.launcher:q} -m smalltalk score-router --config {params.config:q} "
        "--weights {input.weights:q} --tokenizer {input.tokenizer:q} --tokens {input.block:q} "
        "--out {output.scores:q} --tokens {input.probe:q} --out {output.probe:q} "
        "--threads {threads} > {log:q} 2>&1"


checkpoint assign_round:
    input:
        unpack(get_assignment_inputs),
    output:
        assignment=R("routers/r{r}/assignment.parquet"),
        diagnostics=R("routers/r{r}/diagnostics.parquet"),
        contingency=R("routers/r{r}/contingency.parquet"),
    log:
        R("logs/routers/r{r}/assign.log"),
    benchmark:
        R("benchmarks/routers/r{r}/assign.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        config=CONFIG_FILE,
        previous_probe=get_previous_probe_flag,
    shell:
        "python -m smalltalk assign --config {params.config:q} --round {wildcards.r} "
        "--block {input.block:q} --scores {input.scores:q} --probe {input.probe:q} "
        "--probe-scores {input.probe_scores:q} {params.previous_probe:q} "
        "--out {output.assignment:q} --diagnostics {output.diagnostics:q} "
        "--contingency {output.contingency:q} > {log:q} 2>&1"


rule final_routers:
    input:
        routers=get_last_em_routers,
        diagnostics=get_em_files("routers/r{r}/diagnostics.parquet", first=1),
    output:
        routers=expand(R("routers/final/e{e}.safetensors"), e=EXPERTS),
        summary=R("routers/final/em.json"),
    log:
        R("logs/routers/final.log"),
    benchmark:
        R("benchmarks/routers/final.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        **rerun_when(routing="routing"),
        config=CONFIG_FILE,
    shell:
        "python -m smalltalk em-final --config {params.config:q} "
        "--diagnostics {input.diagnostics:q} --routers {input.routers:q} "
        "--out-routers {output.routers:q} --summary {output.summary:q} > {log:q} 2>&1"


rule em_diagnostics:
    input:
        get_em_files("routers/r{r}/diagnostics.parquet"),
    output:
        R("routers/diagnostics.parquet"),
    log:
        R("logs/routers/em_diagnostics.log"),
    benchmark:
        R("benchmarks/routers/em_diagnostics.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m smalltalk concat --out {output:q} {input:q} > {log:q} 2>&1"


rule em_contingency:
    input:
        get_em_files("routers/r{r}/contingency.parquet"),
    output:
        R("routers/contingency.parquet"),
    log:
        R("logs/routers/em_contingency.log"),
    benchmark:
        R("benchmarks/routers/em_contingency.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m smalltalk concat --out {output:q} {input:q} > {log:q} 2>&1"


# `grow`: the router of a corpus added later, trained on that corpus alone (its segment), as
# long as each EM router trained over all its rounds; EM's routers stay as they are.
rule train_grown_router:
    input:
        train=get_grown_token_files("train"),
        em=R("routers/final/em.json"),
        tokenizer=get_tokenizer_model,
    output:
        weights=R("routers/final/e{e}.safetensors"),
    log:
        R("logs/routers/grown_e{e}.log"),
    benchmark:
        R("benchmarks/routers/grown_e{e}.tsv")
    wildcard_constraints:
        e="|".join(map(str, GROWN_EXPERTS)) or "(?!)",  # no grow entry: matches nothing
    conda:
        get_conda_env("router_train")
    threads: get_cluster_threads("router_train")
    resources:
        **get_cluster_resources("router_train"),
    params:
        **rerun_when(
            seed="seed",
            training="training/router",
            model="models/router",
            routing="routing",
        ),
        config=CONFIG_FILE,
        launcher=get_launcher(data_parallel=True),
        process_threads=get_process_threads,
        out_dir=get_router_work_dir,
        entry=get_grow_entry,  # its own entry only: a later entry re-runs nothing here
    shell:
        "{params.launcher:q} -m smalltalk train --config {params.config:q} --role router "
        "--index {wildcards.e} --em-summary {input.em:q} --tokenizer {input.tokenizer:q} "
        "--out-dir {params.out_dir:q} --weights {output.weights:q} "
        "--threads {params.process_threads:q} {input.train:q} > {log:q} 2>&1"


# What grown router e takes of the run's own train split at inference: its expert trains on it
# beside its corpus, as an EM expert trains on what its router wins.
rule capture_for_grown_expert:
    input:
        tokens=R("tokens/train/{chunk}.parquet"),
        shard_scores=R("segmentation/scores/{chunk}.parquet"),
        router=R("routers/final/e{e}.safetensors"),
        tokenizer=get_tokenizer_model,
    output:
        R("grow/e{e}/captured/{chunk}.parquet"),
    log:
        R("logs/grow/e{e}/capture_{chunk}.log"),
    benchmark:
        R("benchmarks/grow/e{e}/capture_{chunk}.tsv")
    conda:
        get_conda_env("router_score")
    threads: get_cluster_threads("router_score")
    resources:
        **get_cluster_resources("router_score"),
    params:
        **rerun_when(prefix_len="routing/prefix_len"),
        config=CONFIG_FILE,
        launcher=get_launcher(),
    shell:
        "{params.launcher:q} -m smalltalk capture --config {params.config:q} "
        "--tokens {input.tokens:q} --shard-scores {input.shard_scores:q} "
        "--router {input.router:q} --tokenizer {input.tokenizer:q} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"
