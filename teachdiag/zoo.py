"""Short names for the embedded models (stub; the embedded-pair issue fills it in).

    from teachdiag import zoo
    zoo.resolve("smollm2-135m")   # -> a local folder, converted once into the cache
"""

from __future__ import annotations

SHORT_NAMES: dict[str, str] = {}


def resolve(name_or_path: str) -> str:
    """Map a short name to a local model folder; anything else is returned unchanged."""
    return name_or_path
