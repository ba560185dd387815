"""The image-layout registry (``stage.<name>.tiling: {kind: <name>, ...}``), kept apart from the layouts so that each
registers itself without an import cycle."""
from vlm.registry import Registry

LAYOUTS: Registry = Registry("image layout")
