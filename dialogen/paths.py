"""Where dialogen keeps files it can rebuild: $XDG_CACHE_HOME/dialogen (~/.cache/dialogen)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dialogen"
