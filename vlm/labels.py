"""The label convention shared by the processor, the collators, the model and the objectives.

``IGNORE_INDEX``: the label of a position no loss trains on (prompt tokens, image placeholders, padding, the first
token of each packed segment). It is ``torch.nn.functional.cross_entropy``'s default ``ignore_index`` and the value
transformers' models use, so our ``labels`` tensors drive a transformers model unchanged.
"""

IGNORE_INDEX = -100
