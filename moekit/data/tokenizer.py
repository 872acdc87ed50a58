"""Tokenizers: raw bytes by default, or a Hugging Face ``tokenizer.json``.

Both expose the same small interface: ``vocab_size``, ``eot_id`` (the document separator),
``encode(text) -> list[int]`` and ``decode(ids) -> str``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

# Names the end-of-text token goes by in common tokenizer.json files (DeepSeek's has full-width bars).
_EOT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus token 256 to separate documents."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if path.is_dir():  # a model folder: it exists, so "not found" would mislead
            raise ValueError(f"data.tokenizer {path} is a folder: name its tokenizer.json file")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error text is opaque; name the file
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from None
        # Text is text: "<|endoftext|>" written in a document is encoded as its characters, not as the
        # separator id (which only encode_documents places, between documents).
        self._tok.encode_special_tokens = True
        # Ids need not be dense: the model needs one row per id up to the largest, not per token.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eot_id = next((i for n in _EOT_NAMES if (i := self._tok.token_to_id(n)) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(path: str | None) -> Tokenizer:
    """The byte tokenizer when ``path`` is None or "byte", else a ``tokenizer.json``."""
    if path is None or path == "byte":
        return ByteTokenizer()
    return HFTokenizer(path)
