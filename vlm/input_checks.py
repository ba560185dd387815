"""``VLM``'s checks of what its ``forward`` / ``hidden_states`` / ``generate`` are given.

``InputChecks`` is a mixin of ``VLM`` (``vlm.model``): ``mm_token_type_ids`` must agree with ``input_ids``, and a
keyword nothing would consume (or one that moved, ``MOVED_KEYWORDS``) is refused. Below ``vlm.model``.
"""
from __future__ import annotations

from typing import Any

import torch

# Keywords ``VLM.forward`` once took, and where they are now: passing one is an error that says so
MOVED_KEYWORDS = {
    "loss_weighting": "loss_weighting moved to the lm objective: "
                      "vlm.objectives.build({'name': 'lm'}, loss_weighting='sample')(model, batch).loss in code, "
                      "stage.<name>.loss_weighting in a config (VLM.forward's loss is the token mean)",
    "objective": "objective moved out of the model: a stage trains vlm.objectives.base.TrainModule(model, "
                 "objective), built by vlm.objectives.build(...) (stage.<name>.objective in a config)",
}


class InputChecks:
    """Input checks of a ``VLM``: a mixin reading the parts ``VLM.__init__`` sets (``llm``, ``image_token_id``,
    ``video_token_id``)."""

    llm: Any
    image_token_id: int
    video_token_id: int | None

    def check_mm_token_types(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None) -> None:
        """``ValueError`` when ``mm_token_type_ids (B, L)`` (Qwen2-VL's processor: 0 text, 1 image, 2 video) marks
        other positions as image tokens (1) than ``input_ids == image_token_id``, or as video tokens (2) than
        ``input_ids == video_token_id``, naming the first row that differs; ``None`` passes."""
        if mm_token_type_ids is None:
            return
        if tuple(mm_token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"mm_token_type_ids has shape {tuple(mm_token_type_ids.shape)}; expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        for value, kind, token_id in ((1, "image", self.image_token_id), (2, "video", self.video_token_id)):
            is_token = input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
            differs = ((mm_token_type_ids == value) != is_token).any(dim=-1)
            if differs.any():
                row = int(differs.nonzero()[0, 0])
                raise ValueError(f"mm_token_type_ids row {row} marks {int((mm_token_type_ids[row] == value).sum())} "
                                 f"{kind} tokens (value {value}), but input_ids row {row} holds "
                                 f"{int(is_token[row].sum())} {kind} tokens (id {token_id}) at other positions; "
                                 f"they must agree")

    def check_keywords(self, kwargs: dict[str, Any], where: str, *, decoder: bool = False,
                       moved_only: bool = False) -> None:
        """Refuse keywords that nothing would consume: the transformers LM takes unknown keywords into its
        ``**kwargs`` and ignores them. Raises ``TypeError`` naming each one: for a keyword that moved
        (``MOVED_KEYWORDS``), where it went; otherwise what the LM's forward (``decoder``: its decoder's) accepts.
        ``moved_only``: check only the moved ones (``generate``, whose transformers checks the rest)."""
        moved = [MOVED_KEYWORDS[k] for k in kwargs if k in MOVED_KEYWORDS]
        if moved:
            raise TypeError(f"VLM.{where}() got a keyword that moved: " + "; ".join(moved))
        ask = getattr(self.llm, "accepted_keywords", None)
        accepted = ask(decoder=decoder) if ask is not None and not moved_only else None
        unknown = sorted(k for k in kwargs if accepted is not None and k not in accepted)
        if unknown:
            raise TypeError(f"VLM.{where}() got unexpected keyword argument(s) {unknown}: nothing consumes them "
                            f"(the LM would ignore them). Besides VLM.{where}'s own arguments, the LM's forward "
                            f"accepts {sorted(accepted)}")
