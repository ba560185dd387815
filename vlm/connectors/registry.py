from vlm.registry import Registry

CONNECTORS: Registry = Registry("connector", common_args=("dtype",))  # dtype: see vlm.connectors.build
