# What each job asks for (threads, GPUs, memory, time; config `cluster`, README: Running on a
# SLURM cluster), the software environment it runs in, how it starts Python, and the SLURM
# pre-flight check of those requests.


def get_cluster_threads(kind):
    """CPUs of a job kind: its Snakemake threads, requested as SLURM's --cpus-per-task."""
    return config["cluster"][kind]["cpus"]


def get_cluster_resources(kind=None):
    """A rule's SLURM requests, as `resources: **get_cluster_resources(kind)`.

    Partition, account and QoS for every rule; GPUs, memory and runtime for the kinds in
    `cluster` (other rules keep their own mem_mb and runtime). Unset values are left out,
    so the cluster's defaults apply. `gpu` and `gpu_model` are the SLURM executor's
    generic GPU request (--gpus=model:n).
    """
    cluster = config["cluster"]
    job = cluster[kind] if kind else {}
    gpus = 0 if cluster["cpu_only"] else job.get("gpus", 0)
    resources = {
        "slurm_partition": (gpus and cluster["gpu_partition"]) or cluster["partition"],
        "slurm_account": cluster["account"],
        "qos": cluster["qos"],
        "gpu": gpus or None,
        "gpu_model": job.get("gpu_model") if gpus else None,
        "mem_mb": job.get("mem_mb"),
        "runtime": job.get("runtime"),
    }
    return {name: value for name, value in resources.items() if value is not None}


def get_conda_env(kind):
    """The CUDA environment for jobs that get GPUs, the CPU one for the rest (from rules/)."""
    if "gpu" in get_cluster_resources(kind):
        return "../envs/smalltalk-cuda.yaml"
    return "../envs/smalltalk.yaml"


def get_launcher(data_parallel=False):
    """How a job starts Python, as arguments (a params function). A job that asks for GPUs starts
    through smalltalk.devices, which gives it GPUs of this machine that no other job holds (a lock
    each; under SLURM the job's own); granted n > 1, a `data_parallel` job (training) runs n
    processes under torchrun, and smalltalk.train trains them with DistributedDataParallel. Read
    from the granted resources: --set-resources train_expert:gpu=4 launches 4 as well.
    """

    def launcher(wildcards, resources):
        gpus = resources.get("gpu", 0)
        if not gpus:
            return ["python"]
        devices = ["python", "-m", "smalltalk.devices", "--gpus", gpus, "--"]
        if data_parallel and gpus > 1:
            return [*devices, "torchrun", "--standalone", "--nproc-per-node", gpus]
        return [*devices, "python"]

    return launcher


def get_process_threads(wildcards, threads, resources):
    """CPU threads of each training process: the job's threads shared among its torchrun
    processes, one per GPU, so that they do not oversubscribe the job's CPUs."""
    return max(1, threads // max(1, resources.get("gpu", 0)))


def check_slurm_requests(jobs):
    """Stop before the first submission if a rule asks for more than its partition's nodes
    have; checks what the jobs will request, with --max-threads and --set-* applied."""
    from snakemake.exceptions import WorkflowError

    from smalltalk.preflight import ClusterError, Request, check_partitions

    requests = {}
    for job in jobs:
        if job.is_local:
            continue
        resources = job.resources
        request = Request(
            partition=resources.get("slurm_partition"),
            cpus=job.threads,
            mem_mb=resources.get("mem_mb"),
            gpus=resources.get("gpu", 0),
            gpu_model=resources.get("gpu_model"),
        )
        requests.setdefault(job.rule.name, set()).add(request)
    try:
        check_partitions(requests)
    except ClusterError as error:
        raise WorkflowError(str(error)) from None
