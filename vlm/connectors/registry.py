from vlm.registry import Registry

CONNECTORS: Registry = Registry("connector")
