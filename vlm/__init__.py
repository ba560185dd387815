"""vlm: compose a vision-language model from swappable parts and train it in stages."""
from vlm.compose import build
from vlm.inference.draw import draw_boxes
from vlm.loading import load
from vlm.model import VLM
from vlm.persistence import VLMConfig

__all__ = ["VLM", "VLMConfig", "build", "draw_boxes", "load"]
__version__ = "0.1.0"
