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


# One run at a time per results directory: a lock (RESULTS/run.lock, smalltalk/runlock.py)
# rather than a config snapshot per run, because two runs at once would still write the same
# files, leaving a results directory made by two configs. It is taken before the run's config
# is written, so a second run stops here having changed nothing, naming the first, and held by
# this process (on a cluster, the one on the login node), not its jobs, until the run ends or
# dies: the kernel drops it with the process, so a killed run leaves nothing to unlock.
onstart:
    hold_run_lock(config["results"])
    write_run_config()
    # Only SLURM runs: local ones submit nothing and need no sinfo.
    if workflow.executor_plugin.name == "slurm":
        check_slurm_requests(workflow.dag.needrun_jobs())


onsuccess:
    release_run_lock(config["results"])


onerror:
    release_run_lock(config["results"])
