"""dialogen: a dialogue-generation toolkit."""

__version__ = "0.1.0"
