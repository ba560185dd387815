"""``vlm`` as an lmms-eval model: ``lmms-eval --model vlm --model_args pretrained=DIR --tasks ...``.

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``: ``vlm = "vlm.eval.lmms:manifest"``), so
an installed ``vlm`` is found by lmms-eval without any change to it; :func:`register` does the same by hand (e.g.
in a notebook, or when ``vlm`` is not pip-installed). ``pretrained`` is anything ``vlm.chat`` opens (a ``vlm.load``
directory, a run directory, a transformers LLaVA directory); ``template``, ``batch_size``, ``max_new_tokens`` and
``device`` are the other ``model_args``.

- ``generate_until``: each request's visuals and context become one chat turn (images first, as training renders
  them), answered with :func:`vlm.inference.chat.chat_batch` (greedy unless ``temperature > 0``; ``until`` strings
  stop each reply); requests with the same generation options are batched.
- ``loglikelihood``: ``log p(continuation | prompt)`` with the continuation as the start of the assistant reply,
  and whether it is the greedy continuation.

Needs lmms-eval installed (``pip install lmms-eval``; not a dependency of vlm).
"""
from __future__ import annotations

import json
from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

MODEL_NAME = "vlm"


def manifest() -> Any:
    """The lmms-eval ``ModelManifest`` of ``vlm`` (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VLMLmms")


def register() -> None:
    """Register ``vlm`` with lmms-eval in this process (what the entry point does for an installed vlm)."""
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    AVAILABLE_MODELS[MODEL_NAME] = "VLMLmms"


def _visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    return [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]


class VLMLmms(lmms):
    """lmms-eval's ``lmms`` interface over a ``vlm`` model (one process)."""

    def __init__(self, pretrained: str, template: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 128, device: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from vlm.inference.chat import processor_for
        from vlm.inference.load import open_model

        opened = open_model(pretrained, device=device)
        self.model = opened.model
        self.processor = processor_for(self.model, template or opened.template)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _options(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        opts: dict[str, Any] = {"max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens))}
        temperature = float(gen.pop("temperature", 0) or 0)
        if temperature > 0 and gen.get("do_sample", True):
            opts.update(do_sample=True, temperature=temperature)
            for key in ("top_p", "top_k"):
                if gen.get(key) is not None:
                    opts[key] = gen[key]
        return until, opts

    def generate_until(self, requests: list[Any]) -> list[str]:
        from vlm.inference.chat import chat_batch

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="vlm responding", disable=self.rank != 0)
        for indices in groups.values():
            until, opts = self._options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                images, texts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images.append(_visuals(doc_to_visual(self.task_dict[task][split][doc_id])) or None)
                    texts.append(context)
                replies = chat_batch(self.model, images, texts, processor=self.processor, stop=until, **opts)
                for i, (reply, _) in zip(chunk, replies):
                    out[i] = reply
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), reply)
                bar.update(len(chunk))
        bar.close()
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        from vlm.data.collate import MEDIA_KEYS
        from vlm.inference.chat import image_placement, prompt_item

        results = []
        device = next(self.model.parameters()).device
        for r in tqdm(requests, desc="vlm loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = r.args
            images = _visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
            item, _ = prompt_item(self.processor, None, images or None, context,
                                  placement=image_placement(self.model, self.processor))
            cont = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.cat([item["input_ids"], torch.tensor(cont, dtype=torch.long)])[None].to(device)
            media = {key: item[key].to(device) for key in MEDIA_KEYS if item.get(key) is not None}
            logits = self.model(ids, **media).logits[0, item["input_ids"].numel() - 1:-1].float()
            target = torch.tensor(cont, device=device)
            logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
            results.append((float(logp), bool((logits.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("vlm's lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported yet")
