# Stage 7: figures and tables as report(...) outputs; `snakemake --report` gathers them.


rule plot_perplexity_vs_flops:
    input:
        experts=expand(R("experts/e{e}/metrics.parquet"), e=EXPERTS),
        dense=get_dense("metrics.parquet"),
        baselines=expand(R("baselines/{baseline}/metrics.parquet"), baseline=BASELINES),
        ledger=R("ledger/flops.parquet"),
        overall=R("eval/summary/overall.parquet"),
    output:
        report(
            R("report/perplexity_vs_flops.png"),
            caption="../reports/perplexity_vs_flops.rst",
            category="Training",
        ),
    log:
        R("logs/report/perplexity_vs_flops.log"),
    benchmark:
        R("benchmarks/report/perplexity_vs_flops.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        baselines=lambda wildcards, input: [
            f"{name}={path}" for name, path in zip(BASELINES, input.baselines)
        ],
    shell:
        "python -m smalltalk plot perplexity_vs_flops --experts {input.experts:q} "
        "--dense {input.dense:q} --baselines {params.baselines:q} --ledger {input.ledger:q} "
        "--overall {input.overall:q} --out {output:q} > {log:q} 2>&1"


rule plot_expert_load:
    input:
        check=R("segmentation/check.json"),
        load=R("eval/summary/load.parquet"),
    output:
        report(
            R("report/expert_load.png"),
            caption="../reports/expert_load.rst",
            category="Routing",
        ),
    log:
        R("logs/report/expert_load.log"),
    benchmark:
        R("benchmarks/report/expert_load.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        prefix_len=lookup(dpath="routing/prefix_len", within=config),  # an argument
    shell:
        "python -m smalltalk plot expert_load --check {input.check:q} --load {input.load:q} "
        "--prefix-len {params.prefix_len:q} --out {output:q} > {log:q} 2>&1"


rule plot_segment_perplexity:
    input:
        R("eval/summary/per_segment.parquet"),
    output:
        report(
            R("report/segment_perplexity.png"),
            caption="../reports/segment_perplexity.rst",
            category="Evaluation",
        ),
    log:
        R("logs/report/segment_perplexity.log"),
    benchmark:
        R("benchmarks/report/segment_perplexity.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        prefix_len=lookup(dpath="routing/prefix_len", within=config),  # an argument
    shell:
        "python -m smalltalk plot segment_perplexity --per-segment {input:q} "
        "--prefix-len {params.prefix_len:q} --out {output:q} > {log:q} 2>&1"


rule plot_prefix_sensitivity:
    input:
        R("eval/summary/overall.parquet"),
    output:
        report(
            R("report/prefix_sensitivity.png"),
            caption="../reports/prefix_sensitivity.rst",
            category="Evaluation",
        ),
    log:
        R("logs/report/prefix_sensitivity.log"),
    benchmark:
        R("benchmarks/report/prefix_sensitivity.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        prefix_len=lookup(dpath="routing/prefix_len", within=config),  # an argument
    shell:
        "python -m smalltalk plot prefix_sensitivity --overall {input:q} "
        "--prefix-len {params.prefix_len:q} --out {output:q} > {log:q} 2>&1"


rule plot_em_convergence:
    input:
        diagnostics=R("routers/diagnostics.parquet"),
        em=R("routers/final/em.json"),
    output:
        report(
            R("report/em_convergence.png"),
            caption="../reports/em_convergence.rst",
            category="Routing",
        ),
    log:
        R("logs/report/em_convergence.log"),
    benchmark:
        R("benchmarks/report/em_convergence.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m smalltalk plot em_convergence --diagnostics {input.diagnostics:q} "
        "--em {input.em:q} --out {output:q} > {log:q} 2>&1"


rule plot_segment_source:
    input:
        R("eval/summary/segment_source.parquet"),
    output:
        report(
            R("report/segment_source.png"),
            caption="../reports/segment_source.rst",
            category="Routing",
        ),
    log:
        R("logs/report/segment_source.log"),
    benchmark:
        R("benchmarks/report/segment_source.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        prefix_len=lookup(dpath="routing/prefix_len", within=config),  # an argument
    shell:
        "python -m smalltalk plot segment_source --segment-source {input:q} "
        "--prefix-len {params.prefix_len:q} --out {output:q} > {log:q} 2>&1"


rule results_table:
    input:
        unpack(get_results_tables),
    output:
        report(
            R("report/results.html"),
            caption="../reports/results_table.rst",
            category="Evaluation",
        ),
    log:
        R("logs/report/results_table.log"),
    benchmark:
        R("benchmarks/report/results_table.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        tables=get_results_table_flags,
    shell:
        "python -m smalltalk tables --out {output:q} {params.tables:q} > {log:q} 2>&1"


rule ledger_table:
    input:
        unpack(get_ledger_tables),
    output:
        report(
            R("report/ledger.html"),
            caption="../reports/ledger_table.rst",
            category="Costs",
        ),
    log:
        R("logs/report/ledger_table.log"),
    benchmark:
        R("benchmarks/report/ledger_table.tsv")
    conda:
        "../envs/smalltalk.yaml"
    threads: 1
    resources:
        **get_cluster_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        tables=get_ledger_table_flags,
    shell:
        "python -m smalltalk tables --out {output:q} {params.tables:q} > {log:q} 2>&1"
