"""longboi: an LLM foundry for MPT-style models."""

__version__ = "0.1.0"
