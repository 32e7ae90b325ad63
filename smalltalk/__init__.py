"""SmallTalk LM: asynchronous mixture of language models."""

__version__ = "0.1.0"
