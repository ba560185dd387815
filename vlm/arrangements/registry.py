"""The feature-arrangement registry (``arrangement: {name: <name>, ...}`` in a model config), kept apart from the
arrangements so that each registers itself without an import cycle."""
from vlm.registry import Registry

ARRANGEMENTS: Registry = Registry("feature arrangement")
