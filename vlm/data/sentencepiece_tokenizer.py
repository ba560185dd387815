"""A SentencePiece tokenizer read as data: ``tokenizer.model`` plus the added tokens of ``tokenizer_config.json``
(``added_tokens_decoder``) / ``added_tokens.json``, never the directory's remote tokenizer code.

Remote-code tokenizer classes whose whole behaviour is "SentencePiece, then the added tokens split out first, a BOS
in front" (InternLM2's ``InternLM2Tokenizer``, used by InternVL2 / InternVL2.5 originals) are listed in
``REMOTE_TOKENIZERS``: ``vlm.data.tokenizer.load_tokenizer`` builds them with :class:`SentencePieceTokenizer` instead
of asking for remote code. Another remote class is one more row there (its builder reading its own files).

Encoding: text between added tokens is ``sentencepiece``'s own ``encode`` of that text (no prefix space added or
removed, the model's normalizer as trained), so ids equal ``SentencePieceProcessor.encode``; ``add_bos_token`` /
``add_eos_token`` (the config's keys) put BOS / EOS around a sequence. Decoding joins pieces with
``decode_pieces`` (byte-fallback pieces become their UTF-8 text).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SP_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


class SentencePieceTokenizer(SentencePieceBackend):
    """``tokenizer.model`` + added tokens; BOS / EOS added as ``add_bos_token`` / ``add_eos_token`` say."""

    vocab_files_names = {"vocab_file": SP_MODEL_FILE}
    #: transformers' ``AutoTokenizer`` does not know this class (a transformers export writes no processor with it)
    loads_in_transformers = False
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = False,
                 **kwargs: Any) -> None:
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        pattern = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}
        kwargs["special_tokens_pattern"] = pattern[(self.add_bos_token, self.add_eos_token)]
        kwargs.setdefault("legacy", True)  # sentencepiece's own encoding of each text run
        kwargs.pop("auto_map", None)
        super().__init__(vocab_file=vocab_file, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, character offsets [start, end) per id)`` of ``text`` without special tokens around it: the
        ids of ``self(text, add_special_tokens=False)`` (added tokens split out first, each text run
        ``sentencepiece``'s encoding), with the offsets ``vlm.data.processor`` needs to tokenize a whole prompt in
        one call as a fast tokenizer's ``offset_mapping`` gives them (a byte-fallback piece spans its character)."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for chunk in self.tokens_trie.split(text):
            if chunk in self._added_tokens_encoder:
                ids.append(self._added_tokens_encoder[chunk])
                offsets.append((pos, pos + len(chunk)))
            elif chunk:
                raw = chunk.encode("utf-8")
                char_of = [i for i, ch in enumerate(chunk) for _ in range(len(ch.encode("utf-8")))]
                for piece in self.sp_model.encode(chunk, return_type="proto").pieces:
                    start = char_of[piece.begin] if piece.begin < len(raw) else len(chunk)
                    end = char_of[piece.end - 1] + 1 if piece.end > piece.begin else start
                    ids.append(piece.id)
                    offsets.append((pos + start, pos + end))
            pos += len(chunk)
        return ids, offsets

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """transformers drops ``add_bos_token`` / ``add_eos_token`` from the written config; they are written back."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        cfg_file = Path(save_directory) / TOKENIZER_CONFIG
        cfg = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in ("is_local", "local_files_only")}
        cfg.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return files


def load_sentencepiece(path: Path, config: dict[str, Any]) -> SentencePieceTokenizer:
    """The :class:`SentencePieceTokenizer` of directory ``path`` (``config``: its parsed ``tokenizer_config.json``).
    ``ValueError`` naming the file when ``tokenizer.model`` is missing, or when an added token's id in the config
    disagrees with the id the tokenizer gives it."""
    model_file = path / SP_MODEL_FILE
    if not model_file.is_file():
        raise ValueError(f"load_tokenizer: {str(path / TOKENIZER_CONFIG)!r} names tokenizer_class="
                         f"{config.get('tokenizer_class')!r}, a SentencePiece tokenizer, but {str(model_file)!r} is "
                         f"missing")
    tok = SentencePieceTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    expected = {str(v["content"]): int(k) for k, v in (config.get("added_tokens_decoder") or {}).items()}
    added_file = path / "added_tokens.json"
    if added_file.is_file():
        expected.update({str(k): int(v) for k, v in json.loads(added_file.read_text()).items()})
    wrong = {t: (i, tok.convert_tokens_to_ids(t)) for t, i in expected.items() if tok.convert_tokens_to_ids(t) != i}
    if wrong:
        raise ValueError(f"load_tokenizer: the added tokens of {str(path)!r} do not get the ids its files give them "
                         f"(token: (file id, tokenizer id)): {dict(list(wrong.items())[:8])}; expected contiguous "
                         f"ids after tokenizer.model's {tok.vocab_size} pieces")
    return tok


#: ``tokenizer_config.json``'s ``tokenizer_class`` (a remote-code class, or ours) -> its builder without remote code
REMOTE_TOKENIZERS: dict[str, Callable[[Path, dict[str, Any]], Any]] = {
    "InternLM2Tokenizer": load_sentencepiece,
    "InternLM2TokenizerFast": load_sentencepiece,
    "SentencePieceTokenizer": load_sentencepiece,
}


def remote_tokenizer(path: Path) -> Any | None:
    """The tokenizer of ``path`` built from ``REMOTE_TOKENIZERS`` when its ``tokenizer_config.json`` names one of
    those classes, else ``None``."""
    cfg_file = path / TOKENIZER_CONFIG
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_tokenizer: {str(cfg_file)!r} is not valid JSON ({e})") from e
    build = REMOTE_TOKENIZERS.get(str(cfg.get("tokenizer_class")))
    return None if build is None else build(path, cfg)
