# Config validation, the results-root helper and input functions; logic lives in smalltalk/.
import os
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate

from smalltalk.config import SCHEMA_PATH, SPLITS, validate_config, write_resolved_config
from smalltalk.data import plan_chunks

# All problems at once, each naming its key; then Snakemake's own pass sets the defaults.
validate_config(config)


validate(config, str(SCHEMA_PATH))


# Jobs read the resolved config (command-line overrides included) from one file.
CONFIG_FILE = write_resolved_config(
    config, os.path.join(config["results"], "config.yaml")
)

# Jobs run `python -m smalltalk` from this checkout: under conda with the environment's
# python, else with the interpreter that runs Snakemake.
shell.prefix(
    # (Braces doubled twice: once for this f-string, once for Snakemake's formatting.)
    f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    + (
        ""
        if workflow.deployment_settings.deployment_method
        else f"export PATH={os.path.dirname(sys.executable)}:$PATH; "
    )
)
CHUNKS = {
    chunk.name: chunk
    for chunk in plan_chunks(config["inputs"], config["files_per_chunk"])
}


wildcard_constraints:
    chunk=r"c\d+",
    split="|".join(SPLITS),


def R(path):
    """A path under the results root."""
    return os.path.join(config["results"], path)


def get_tokens_dir(wildcards, output):
    """tokens/ from tokens/train/{chunk}.parquet."""
    return os.path.dirname(os.path.dirname(output.train))


def get_chunk_files(wildcards):
    return list(CHUNKS[wildcards.chunk].files)


def get_tokenizer_model(wildcards=None):
    return config["tokenizer"]["model"] or R("tokenizer/spm.model")


def get_tokenizer_sample(wildcards):
    from smalltalk.tokenizer import sample_files

    files = [path for chunk in CHUNKS.values() for path in chunk.files]
    return sample_files(files, config["tokenizer"]["sample_files"])


def get_token_files(split):
    return expand(R("tokens/{split}/{chunk}.parquet"), split=split, chunk=CHUNKS)


def get_final_outputs():
    return [*get_token_files(SPLITS), R("tokens/summary.tsv")]
