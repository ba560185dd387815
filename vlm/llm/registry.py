from vlm.registry import Registry

LLMS: Registry = Registry("llm")
