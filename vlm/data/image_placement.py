"""Image placement: where a turn's images sit relative to its text, and what separates them.

Training data writes images into the text itself (LLaVA's ``"<image>\\nWhat is ..."``, the shapes dataset's
``[image, "\\n", question]``, ``"Image 1: <image>\\nImage 2: <image>\\n..."`` for two images). A chat turn, a
transformers message (``[{"type": "image"}, {"type": "text", "text": q}]``) or an lmms-eval request gives the images
and the text *apart*; the placement is how they are joined so that the prompt is the one the model was trained on:

- ``position``: ``"before"`` (images, then the text) or ``"after"`` (the text, then the images);
- ``separator``: written after each image (``before``) or before each image (``after``), e.g. ``"\\n"``;
- ``label``: written before each image of a turn that has several (``"Image {n}: "``, ``{n}`` = 1, 2, ...);
  ``None``: no label.

``ImagePlacement.infer(samples)`` reads it off a dataset's samples (a training run records it in the model's
``config.json`` as ``image_placement``), ``arrange`` applies it to structured messages (``model.chat``), and
``jinja_image`` writes it into an exported chat template, so chat, the exported template and served transformers
build the same prompt. ``DEFAULT`` (images first, each followed by ``"\\n"``: LLaVA's convention) is the placement of a
model that recorded none.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vlm.data.sample import ImageRef, Sample

POSITIONS = ("before", "after")
_IMG = "\ue001"  # a private-use character standing for an image while a message's placement is read


@dataclass(frozen=True)
class ImagePlacement:
    """How a message's images and text are joined (see the module docstring)."""

    position: str = "before"
    separator: str = "\n"
    label: str | None = None

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"image_placement.position={self.position!r}; expected one of {POSITIONS}")
        if not isinstance(self.separator, str):
            raise ValueError(f"image_placement.separator must be a string; got {self.separator!r}")
        if self.label is not None and not isinstance(self.label, str):
            raise ValueError(f"image_placement.label must be a string or null; got {self.label!r}")

    # ------------------------------------------------------------------------------------------------ record
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None) -> ImagePlacement | None:
        """The placement a ``config.json`` ``image_placement`` record describes (``None`` stays ``None``: the model's
        chat template places images). Unknown keys are a ``ValueError`` naming them."""
        if record is None or isinstance(record, ImagePlacement):
            return record
        unknown = sorted(set(record) - {"position", "separator", "label"})
        if unknown:
            raise ValueError(f"image_placement: unknown key(s) {unknown}; expected position, separator, label")
        return cls(**dict(record))

    def describe(self) -> str:
        """One line for logs: ``images before the text, each followed by '\\n'``."""
        side = "followed" if self.position == "before" else "preceded"
        label = f", labelled {self.label!r} when several" if self.label else ""
        return f"images {self.position} the text, each {side} by {json.dumps(self.separator)}{label}"

    # ----------------------------------------------------------------------------------------------- apply
    def label_for(self, k: int, n: int) -> str:
        """The label of image ``k`` (1-based) of a message with ``n`` images (empty for one image or no label)."""
        return self.label.replace("{n}", str(k)) if self.label and n > 1 else ""

    def order(self, images: list[Any], text: list[Any]) -> list[Any]:
        """A new turn's parts: ``images`` then ``text`` (``before``) or ``text`` then ``images`` (``after``)."""
        return [*images, *text] if self.position == "before" else [*text, *images]

    def arrange(self, content: Sequence[Any], is_image: Any) -> list[Any]:
        """``content`` (a message's parts in order; ``is_image(part)`` tells images) with each image's label and
        separator inserted as text parts (``{"type": "text", "text": ...}``). The order of the parts is kept."""
        n = sum(1 for p in content if is_image(p))
        out: list[Any] = []
        k = 0
        for part in content:
            if not is_image(part):
                out.append(part)
                continue
            k += 1
            before = self.label_for(k, n) if self.position == "before" else self.separator + self.label_for(k, n)
            after = self.separator if self.position == "before" else ""
            out += [{"type": "text", "text": before}] if before else []
            out.append(part)
            out += [{"type": "text", "text": after}] if after else []
        return out

    #: Jinja statements a macro runs on its list content ``c`` before looping over its parts (see ``jinja_image``)
    JINJA_SETUP = ("{%- set placement_ns = namespace(k=0) -%}"
                   "{%- set n_images = c | selectattr('type', 'equalto', 'image') | list | length -%}")

    def jinja_expression(self, image_text: str) -> str:
        """A Jinja expression: the text of the image part numbered ``placement_ns.k`` (its label, ``image_text`` and
        separator), in a message whose image count is ``n_images`` (both set up by ``JINJA_SETUP``, ``placement_ns.k``
        counted up before each image)."""
        from vlm.data.templates.jinja import jinja_literal as q

        label = "''"
        if self.label:
            label = f"({q(self.label)}.replace('{{n}}', placement_ns.k | string) if n_images > 1 else '')"
        image = q(image_text)
        return (f"{label} + {image} + {q(self.separator)}" if self.position == "before"
                else f"{q(self.separator)} + {label} + {image}")

    def jinja_image(self, image_text: str) -> str:
        """Jinja statements that write one image part with its label and separator, inside a ``for p in c`` loop
        over a message's parts after ``JINJA_SETUP``."""
        return "{%- set placement_ns.k = placement_ns.k + 1 -%}{{- " + self.jinja_expression(image_text) + " -}}"

    # ----------------------------------------------------------------------------------------------- infer
    @classmethod
    def infer(cls, samples: Iterable[Sample]) -> ImagePlacement | None:
        """The placement most messages with images and text in ``samples`` follow (``None``: no message shows one).

        A message is read as ``[label_1] image sep [label_2 image sep ...] text`` (``before``) or ``text [sep
        label_1 image ...]`` (``after``); messages that fit neither (an image in the middle of the text) do not
        vote. The label (``"Image {n}: "``, numbers generalized) comes from messages with several images."""
        votes: Counter[tuple[str, str]] = Counter()
        labels: Counter[tuple[str, str, str]] = Counter()
        for sample in samples:
            for message in sample.messages:
                found = read_placement(message.parts)
                if found is None:
                    continue
                position, separator, label = found
                votes[(position, separator)] += 1
                if label is not None:
                    labels[(position, separator, label)] += 1
        if not votes:
            return None
        position, separator = votes.most_common(1)[0][0]
        label = next((lab for (p, s, lab), _ in labels.most_common() if (p, s) == (position, separator)), None)
        return cls(position, separator, label or None)


def read_placement(parts: Sequence[Any]) -> tuple[str, str, str | None] | None:
    """``(position, separator, label)`` of one message's parts (``label``: ``None`` with one image, ``""`` for
    several unlabelled images), or ``None`` when the message has no image, no text, or images inside its text."""
    text = "".join(_IMG if isinstance(p, ImageRef) else p for p in parts)
    pieces = text.split(_IMG)
    n = len(pieces) - 1
    if n == 0 or not text.replace(_IMG, "").strip():
        return None
    for position in POSITIONS:
        found = _read(pieces, n, position)
        if found is not None:
            return found
    return None


def _numbered(label: str, k: int) -> str:
    """``label`` with the first ``k`` replaced by ``{n}`` (as a template), or as is."""
    return label.replace(str(k), "{n}", 1) if str(k) in label else label


def _read(pieces: list[str], n: int, position: str) -> tuple[str, str, str | None] | None:
    if position == "before":
        rest = pieces[-1]
        if not rest.strip():
            return None
        separator = re.match(r"\s*", rest).group(0)
        if n == 1:
            return ("before", separator, None) if pieces[0] == "" else None
        label = _numbered(pieces[0], 1)
    else:
        if pieces[-1] != "" or not pieces[0].strip():
            return None
        if n == 1:
            head = pieces[0]
            separator = head[len(head.rstrip()):]
            return "after", separator, None
        separator = re.match(r"\s*", pieces[1]).group(0)
        label = _numbered(pieces[1][len(separator):], 2)
    placement = ImagePlacement(position, separator, label)
    rebuilt = placement.arrange([ImageRef(i) for i in range(n)], lambda p: isinstance(p, ImageRef))
    skeleton = "".join(_IMG if isinstance(p, ImageRef) else p["text"] for p in rebuilt)
    text = _IMG.join(pieces)
    question = text[len(skeleton):] if position == "before" else text[:len(text) - len(skeleton)]
    fits = text.startswith(skeleton) if position == "before" else text.endswith(skeleton)
    return (position, separator, label) if fits and question.strip() and _IMG not in question else None


#: the placement of a model that recorded none: images first, each followed by a newline (LLaVA's ``<image>\\n``)
DEFAULT = ImagePlacement()


def dataset_samples(dataset: Any, limit: int = 64) -> list[Sample]:
    """Up to ``limit`` ``Sample``s spread evenly over ``dataset`` (a dataset of ``Sample``s, or a
    ``ProcessedDataset`` over one: its ``samples``); samples that cannot be read are left out (this only looks)."""
    from vlm.data.errors import DataError

    source = getattr(dataset, "samples", dataset)
    n = len(source) if source is not None else 0
    out: list[Sample] = []
    for i in range(0, n, max(1, n // max(1, limit)))[:limit]:
        try:
            sample = source.sample(i) if hasattr(source, "sample") else source[i]
        except (DataError, OSError, IndexError):
            continue
        if isinstance(sample, Sample):
            out.append(sample)
    return out
