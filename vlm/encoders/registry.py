from vlm.registry import Registry

ENCODERS: Registry = Registry("encoder")
