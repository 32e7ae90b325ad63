"""SmallTalk LM: asynchronous mixture of language models."""

__version__ = "0.1.0"


def load(results, **options):
    """The trained mixture in a results directory or an export of one, all its experts or
    `experts=[...]`, an export's files checked against its export.json unless `verify=False`:
    `smalltalk.serve.load` (imported on first use, so `import smalltalk` stays light for the
    command line)."""
    from smalltalk.serve import load as load_mixture

    return load_mixture(results, **options)
