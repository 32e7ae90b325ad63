# SmallTalk LM: an asynchronous mixture of language models (Filippova et al., arXiv:2410.03529).
# Stages: data -> routers (EM) -> shards -> experts -> evaluation -> report.


from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "reports/workflow.rst"


include: "rules/setup.smk"
include: "rules/common.smk"
include: "rules/jobs.smk"
include: "rules/data.smk"
include: "rules/routers.smk"
include: "rules/shard.smk"
include: "rules/experts.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/harness.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),


onstart:
    write_run_config()
    # Only SLURM runs: local ones submit nothing and need no sinfo.
    if workflow.executor_plugin.name == "slurm":
        check_slurm_requests(workflow.dag.needrun_jobs())
