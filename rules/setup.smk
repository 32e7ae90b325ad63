# How the workflow starts: the config checked, the run's config file that every job reads, the
# shell every job runs in, and what re-runs a job. Paths and inputs: common.smk; what each job
# needs and how it starts Python: jobs.smk.
import os
import shlex
import sys

# The checkout this file is in: the workflow's own basedir when it is used as a module (the
# quality and robustness benchmarks) is the including Snakefile's folder, not the checkout.
REPO = os.path.dirname(os.path.abspath(str(workflow.current_basedir)))
sys.path.insert(0, REPO)

from snakemake.utils import validate

from smalltalk.config import (
    SCHEMA_PATH,
    read_config,
    validate_config,
    write_resolved_config,
)
from smalltalk.runlock import hold_run_lock, release_run_lock

# Snakemake keeps the last of a key given twice in a config file: refuse that instead.
for configfile in workflow.configfiles:
    read_config(configfile)
# All problems at once, each naming its key; then Snakemake's own pass sets the defaults.
validate_config(config)


validate(config, str(SCHEMA_PATH))


# Jobs read the resolved config (command-line overrides included) from one file, written by
# `onstart` (write_run_config): only when a run starts, holding the results' run lock
# (smalltalk/runlock.py: one run at a time per results directory, so no second run rewrites it
# under the first one's jobs), never by a dry run or while parsing, which would change the
# config of a running or finished run under its jobs. It is a param of every job, not an input:
# as the output of a job (there is no other way to make it an input that exists before the
# first run), any change would re-run that job, and Snakemake then stops looking at its
# descendants' own reasons to re-run ("masked" in snakemake.dag.update_needrun): with the file
# as an `ancient` input no job would ever re-run for a changed setting, without `ancient` every
# job would re-run for any. So each job re-runs when the settings it reads change, through its
# `rerun_when` params.
CONFIG_FILE = os.path.join(config["results"], "config.yaml")


def rerun_when(**settings):
    """Params that exist only to re-run a job when settings it reads change, as
    `params: **rerun_when(name="section/key", ...)`.

    The job reads them from the run's config file, not from these params; Snakemake's params
    trigger compares their values with those of the job's last run, so a changed setting re-runs
    exactly the jobs that name it, and a new setting read by a job must be named here too. A
    setting that a command takes as an argument is a plain `lookup` param (it re-runs the job
    all the same).
    """
    return {
        name: lookup(dpath=setting, within=config) for name, setting in settings.items()
    }


def write_run_config(settings=None, path=None):
    """Write the resolved config the jobs read (untouched if unchanged). Without `cluster`:
    what jobs ask a cluster for is no part of the experiment."""
    settings = config if settings is None else settings
    path = CONFIG_FILE if path is None else path
    write_resolved_config({k: v for k, v in settings.items() if k != "cluster"}, path)


# Jobs run `python -m smalltalk` from this checkout: under conda with the environment's
# python, else with the interpreter that runs Snakemake.
shell.prefix(
    # (Braces doubled twice: once for this f-string, once for Snakemake's formatting.)
    f"export PYTHONPATH={shlex.quote(REPO)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    + (
        ""
        if workflow.deployment_settings.deployment_method
        else f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; "
    )
)
