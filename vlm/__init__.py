"""vlm: compose a vision-language model from swappable parts and train it in stages."""
import logging as _logging

# transformers imports torchao when it is installed (the `quant` extra), and torchao 0.18 registers two Enum classes
# with torch's pytree, which torch 2.14 answers with a deprecation warning per class at every start: not ours to fix
# and not the user's, so it is silenced here (only that logger, only below ERROR).
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

from vlm.compose import build
from vlm.inference.draw import draw_boxes
from vlm.loading import load
from vlm.model import VLM
from vlm.persistence import VLMConfig

__all__ = ["VLM", "VLMConfig", "build", "draw_boxes", "load"]
__version__ = "0.1.0"
