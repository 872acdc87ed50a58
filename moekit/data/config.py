"""Where the training text comes from and how it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.data.corpus import DEFAULT_CORPUS_BYTES

TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class DataConfig:
    """``path``: None for the embedded corpus (see ``moekit.data.corpus``), else a ``.txt`` /
    ``.jsonl`` (one JSON object per line with a ``text`` field) / ``.bin`` (pre-tokenized,
    ``token_dtype`` memmap) file, or a directory of text and JSONL files (sorted order).
    ``val_path``: a held-out file; without it the last ``val_fraction`` of the tokens is held out.
    ``tokenizer``: "byte" or the path of a Hugging Face ``tokenizer.json``.
    """

    path: str | None = None
    val_path: str | None = None
    tokenizer: str = "byte"
    token_dtype: str = "uint16"
    val_fraction: float = 0.05
    corpus_bytes: int = DEFAULT_CORPUS_BYTES

    def __post_init__(self) -> None:
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
