"""Tokenizers: a file-free byte-level tokenizer for tests and tiny models, and a safe local loader.

``byte_tokenizer()`` builds a ``transformers`` fast tokenizer in code with the ``tokenizers`` library: ids 0..255 are
the raw bytes (so any text round-trips, id == byte value), followed by a handful of special tokens. It carries a Jinja
chat template (``chatml``, ``llama3`` or ``vicuna_v1``, with ``{% generation %}`` blocks so
``return_assistant_tokens_mask`` works) and round-trips through ``save_pretrained`` /
``AutoTokenizer.from_pretrained``.

``TOKENIZERS`` names the tokenizers a run config can ask for (``byte``: the file-free byte-level tokenizer; ``hf``: a
local transformers tokenizer directory; ``byte_bpe``: byte-level BPE trained on the run's data). Each can add
``extra_tokens`` and ``number_tokens: N`` (the integers ``0..N-1`` as single tokens, e.g. 1000 for Qwen-VL style
``[0, 1000)`` box coordinates, so a coordinate is one prediction instead of three digits).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from vlm.data.byte_level import bytes_to_unicode as _bytes_to_unicode
from vlm.data.templates.vicuna import VicunaV1
from vlm.registry import Registry

#: Special tokens of the byte tokenizer, in id order after the 256 bytes (ids 256..).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>", "<|bos|>", "<|eos|>",                                   # generic
    "<|im_start|>", "<|im_end|>",                                      # chatml
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
    "<image>", "<img>", "</img>",                                      # image placeholder and markers
)

# Content may be a string or a list of {"type": "text"|"image"} parts; images render as "<image>".
_CONTENT = ("{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c -%}"
            "{%- if p['type'] == 'image' -%}<image>{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}{%- endmacro -%}")

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CONTENT + (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}"
        "{{- '<|im_start|>assistant\\n' -}}{% generation %}{{- content(m['content']) + '<|im_end|>' -}}"
        "{% endgeneration %}{{- '\\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + content(m['content']) + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama3": _CONTENT + (
        "{{- '<|begin_of_text|>' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if m['role'] == 'assistant' -%}"
        "{% generation %}{{- content(m['content']) + '<|eot_id|>' -}}{% endgeneration %}"
        "{%- else -%}{{- content(m['content']) + '<|eot_id|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
    "vicuna_v1": VicunaV1().as_jinja(),  # LLaVA-1.5: the template class owns its Jinja form
}
_EOS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "vicuna_v1": "</s>"}
#: Tokens a built-in chat template writes beyond :data:`SPECIAL_TOKENS` (appended after them, ids unchanged).
_TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {"vicuna_v1": ("</s>",)}


def _special_tokens(chat_template: str, extra_tokens: Sequence[str]) -> list[str]:
    """:data:`SPECIAL_TOKENS`, then the chat template's own tokens, then ``extra_tokens`` (no repeats)."""
    return list(dict.fromkeys([*SPECIAL_TOKENS, *_TEMPLATE_TOKENS.get(chat_template, ()), *extra_tokens]))


def byte_tokenizer(chat_template: str = "chatml", extra_tokens: Sequence[str] = (), generation_tags: bool = True,
                   eos_token: str | None = None) -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) built without files.

    Args:
        chat_template: ``"chatml"``, ``"llama3"`` or ``"vicuna_v1"`` (built-in Jinja templates, each rendering
            exactly what the template of that name renders; ``vicuna_v1`` adds the special token ``</s>``), or a raw
            Jinja string.
        extra_tokens: more special tokens to append (e.g. ``"<IMG_CONTEXT>"``).
        generation_tags: keep the ``{% generation %}`` markers in the built-in templates (``False`` gives a template
            without them, to exercise the prefix-diff path of the ``tokenizer`` template).
        eos_token: defaults to the template's end-of-turn token (``<|im_end|>`` / ``<|eot_id|>`` / ``</s>``), else
            ``<|eos|>``.

    Vocabulary: 256 bytes (id == byte value), then :data:`SPECIAL_TOKENS`, then the template's own tokens, then
    ``extra_tokens`` (< 300 in total).
    """
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = _special_tokens(chat_template, extra_tokens)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    template = CHAT_TEMPLATES.get(chat_template, chat_template)
    if not generation_tags:
        template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
        eos_token=eos_token or _EOS.get(chat_template, "<|eos|>"),
        extra_special_tokens=[s for s in specials if s not in ("<|pad|>", "<|bos|>")],
    )
    fast.chat_template = template
    return fast


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str = "chatml",
                       extra_tokens: Sequence[str] = (), split_digits: bool = True, eos_token: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained in code on ``texts`` (deterministic for the same texts in the same order).

    Like :func:`byte_tokenizer` (same special tokens and chat templates, every byte representable, no files), but
    frequent character sequences of the corpus merge into single tokens, so sequences get several times shorter — the
    lever that matters most when a tiny model trains on a CPU. With ``split_digits`` every digit stays its own token,
    so a coordinate such as ``344`` is always the three tokens ``3 4 4`` (numbers tokenize consistently).
    """
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(chat_template, extra_tokens)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    template = CHAT_TEMPLATES.get(chat_template, chat_template)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
        eos_token=eos_token or _EOS.get(chat_template, "<|eos|>"),
        extra_special_tokens=[s for s in specials if s not in ("<|pad|>", "<|bos|>")],
    )
    fast.chat_template = template
    return fast


#: tokenizers built in code, named by a ``"<kind>"`` or ``"<kind>:<chat template>"`` spec (``load_tokenizer``)
BUILT_IN_TOKENIZERS = {"byte": byte_tokenizer}


def qwen_tiktoken(path: str | os.PathLike) -> Any:
    """``vlm.data.qwen_tokenizer.load_qwen_tokenizer`` (imported when a directory needs it)."""
    from vlm.data.qwen_tokenizer import load_qwen_tokenizer

    return load_qwen_tokenizer(path)


#: vocabulary files that make a directory's tokenizer one we build in code (no remote code): file name -> builder
DIRECTORY_TOKENIZERS = {"qwen.tiktoken": qwen_tiktoken}
#: ``config.json`` ``model_type`` of directories whose tokenizer is only one of those files -> the file
REQUIRED_VOCAB_FILES = {"qwen": "qwen.tiktoken"}


def directory_tokenizer(name: str) -> Any:
    """The builder of a local directory whose tokenizer is a :data:`DIRECTORY_TOKENIZERS` file, else ``None``.
    ``FileNotFoundError`` naming the file when the directory's ``config.json`` says its tokenizer is such a file
    (e.g. ``model_type: qwen`` and ``qwen.tiktoken``) and the file is missing."""
    import json
    from pathlib import Path

    path = Path(name)
    if not path.is_dir():
        return None
    for file, builder in DIRECTORY_TOKENIZERS.items():
        if (path / file).is_file():
            return builder
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    required = REQUIRED_VOCAB_FILES.get(model_type) if isinstance(model_type, str) else None
    if required is not None:
        raise FileNotFoundError(f"{str(path / required)!r} does not exist: {str(path / 'config.json')!r} says "
                                f"model_type {model_type!r}, whose tokenizer is that vocabulary file (vlm builds it "
                                f"without remote code); copy {required} from the published checkpoint")
    return None


def load_tokenizer(path_or_name: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """Load a tokenizer from a local directory (never the network).

    ``"byte"`` / ``"byte:chatml"`` / ``"byte:llama3"`` / ``"byte:vicuna_v1"`` build :func:`byte_tokenizer`. A directory
    holding ``qwen.tiktoken`` (Qwen / Qwen-VL) gets Qwen's tokenizer built from it (:data:`DIRECTORY_TOKENIZERS`,
    ``vlm.data.qwen_tokenizer``), never its remote code. A directory whose ``tokenizer_config.json`` names a
    remote-code class vlm reads as data (``vlm.data.sentencepiece_tokenizer.REMOTE_TOKENIZERS``: InternLM2's) is
    built without its code. Anything else goes to ``AutoTokenizer.from_pretrained(..., local_files_only=True)`` (a
    local directory or an already-cached hub name); remote code runs only when the caller opts in (the
    ``trust_remote_code`` flag, off by default), and no question is ever asked (the flag is passed explicitly).
    """
    from transformers import AutoTokenizer

    from vlm.data.sentencepiece_tokenizer import remote_tokenizer

    name = os.fspath(path_or_name)
    kind, sep, chat_template = name.partition(":")
    built_in = BUILT_IN_TOKENIZERS.get(kind)
    if built_in is not None:
        return built_in(chat_template if sep else "chatml", **kwargs)
    directory = directory_tokenizer(name)
    if directory is not None:
        return directory(name)
    if os.path.isdir(name) and not trust_remote_code:
        ours = remote_tokenizer(Path(name))
        if ours is not None:
            return ours
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True,
                                             **kwargs)
    except OSError as e:
        raise OSError(f"cannot load a tokenizer from {name!r}: not a local tokenizer directory (and not cached; "
                      f"the network is never used). Pass a directory written by save_pretrained, or 'byte'.") from e


TOKENIZERS: Registry[Any] = Registry("tokenizer")
"""Tokenizers by name (``tokenizer.name`` of a run): ``byte``, ``hf``, ``byte_bpe``."""


def _add_tokens(tok: Any, extra_tokens: Sequence[str], number_tokens: int) -> Any:
    from tokenizers import AddedToken

    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)},
                               replace_extra_special_tokens=False)
    if number_tokens:
        # plain (non-special) added tokens: matched longest-first before the model's own splitting, kept on decode
        tok.add_tokens([AddedToken(str(i), single_word=False, normalized=False, special=False)
                        for i in range(int(number_tokens))])
    return tok


@TOKENIZERS.register("byte")
def byte(chat_template: str = "chatml", extra_tokens: Sequence[str] = (), number_tokens: int = 0) -> Any:
    """``vlm.data.tokenizer.byte_tokenizer`` (ids 0..255 are bytes) plus optional tokens."""
    return _add_tokens(byte_tokenizer(chat_template), extra_tokens, number_tokens)


@TOKENIZERS.register("hf")
def hf(path: str, extra_tokens: Sequence[str] = (), number_tokens: int = 0, pad_token: str | None = None,
       trust_remote_code: bool = False) -> Any:
    """A local tokenizer directory (``AutoTokenizer``, never the network). ``pad_token``: set one if missing
    (LLaVA uses ``<unk>`` for LLaMA/Vicuna); without one the eos token pads."""
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if pad_token is not None:
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return _add_tokens(tok, extra_tokens, number_tokens)


@TOKENIZERS.register("byte_bpe")
def byte_bpe(vocab_size: int = 512, corpus: Sequence[str] = ("pretrain", "sft"), corpus_samples: int = 2000,
             split_digits: bool = True, chat_template: str = "chatml", extra_tokens: Sequence[str] = (),
             number_tokens: int = 0, data: Any = None) -> Any:
    """``vlm.data.tokenizer.byte_bpe_tokenizer`` trained (deterministically) on the message texts of the first
    ``corpus_samples`` samples of each ``data`` key in ``corpus``: every byte stays representable, frequent strings
    of the corpus become single tokens (much shorter sequences for a tiny model), digits stay single tokens."""
    from vlm.data.datasets import build_dataset

    check_corpus(corpus, data)
    texts: list[str] = []
    for key in corpus:
        ds = build_dataset(data[key])
        for i in range(min(int(corpus_samples), len(ds))):
            texts += [f"{m.role}\n{m.text()}" for m in ds[i].messages]
    tok = byte_bpe_tokenizer(texts, vocab_size=int(vocab_size), chat_template=chat_template,
                             split_digits=split_digits)
    return _add_tokens(tok, extra_tokens, number_tokens)


def check_corpus(corpus: Sequence[str] = ("pretrain", "sft"), data: Any = None, **_: Any) -> None:
    """``byte_bpe``'s ``corpus`` names configured ``data`` keys (run by the config check, and before training)."""
    from vlm.registry import did_you_mean

    if data is None:
        raise ValueError("tokenizer byte_bpe needs the run's data config to train on")
    configured = [k for k in data if data[k] is not None]
    for key in corpus:
        if key not in configured:
            raise ValueError(f"corpus={list(corpus)}: names data.{key}, which is not configured; "
                             f"expected keys of data {configured} ({did_you_mean(key, configured)})")


byte_bpe.check_options = check_corpus  # type: ignore[attr-defined]
