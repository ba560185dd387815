"""The bench registry, kept apart from ``vlm.bench`` so that each bench module registers itself without importing
the package that imports it."""
from typing import Any, Callable

from vlm.registry import Registry

BENCHES: Registry[Callable[..., dict[str, Any]]] = Registry("bench")
