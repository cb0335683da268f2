"""Dialogue data: file formats -> conversations, seeded splits, training examples."""

from .formats import FORMATS, Turn, read_conversations
from .splits import ALL, SPLITS, load_split

__all__ = ["ALL", "FORMATS", "SPLITS", "Turn", "load_split", "read_conversations"]
