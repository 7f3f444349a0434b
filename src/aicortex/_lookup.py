"""Module-level catalog functions: offline, on the bundled catalog.

Kept apart from the online functions so that using them never imports the
HTTP stack.
"""

from __future__ import annotations

from ._catalog import ModelInfo, ServerEntry, default_catalog

__all__ = [
    "families",
    "llm_params",
    "model_info",
    "model_servers",
    "models",
    "random_llm_params",
]


def families() -> list[str]:
    """Model families in the bundled catalog."""
    return default_catalog().families()


def models(family: str | None = None) -> list[str]:
    """Model names in the bundled catalog, optionally of one family."""
    return default_catalog().models(family)


def model_info(model: str) -> ModelInfo:
    """Catalog facts about ``model``; raises :class:`ModelNotFoundError` with suggestions."""
    return default_catalog().model_info(model)


def model_servers(model: str) -> list[ServerEntry]:
    """The servers the catalog lists for ``model``."""
    return default_catalog().model_servers(model)


def llm_params(model: str) -> dict[str, int | float]:
    """The catalog's default generation parameters for ``model``."""
    return default_catalog().llm_params(model)


def random_llm_params(model: str, seed: int | None = None) -> dict[str, int | float]:
    """Generation parameters drawn within the catalog's ranges; same seed, same result."""
    return default_catalog().random_llm_params(model, seed=seed)
