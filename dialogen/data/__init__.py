"""Dialogue data: file formats -> conversations, seeded splits, training examples."""

from .formats import FORMATS, Turn, read_conversations
from .splits import SPLITS, load_split

__all__ = ["FORMATS", "SPLITS", "Turn", "load_split", "read_conversations"]
