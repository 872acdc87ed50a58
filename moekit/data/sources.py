"""Read a token stream from the embedded corpus, text / JSONL files or a pre-tokenized ``.bin``."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np

from moekit.data.corpus import stdlib_corpus
from moekit.data.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")


def read_text(path: Path) -> str:
    """A file's UTF-8 text; other bytes (another encoding, a compressed file) are an error naming it."""
    data = path.read_bytes()
    # A leading byte-order mark (Windows editors write one) marks the encoding: it is not text.
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + exc.start  # counted in the file's own bytes
        line = data[:at].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte {at} (line {line}) is {data[at]:#04x} "
                         "(convert it to UTF-8; compressed files are not read)") from None


def check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: 'text' holds an unpaired surrogate {text[exc.start]!r} (a \\u escape that "
                         "is not a character: fix or drop the record)") from None


def read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    # split on newlines only: JSON strings may hold other line separators (U+2028) unescaped
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path} line {lineno}: expected an object with a string 'text' field")
        if "\\u" in line:  # only an escape can hold a lone surrogate, which no tokenizer encodes
            check_unicode(record["text"], f"{path} line {lineno}")
        texts.append(record["text"])
    return texts


def read_documents(path: Path) -> list[str]:
    """Documents of one text / JSONL file, or of every such file in a directory (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [doc for f in files for doc in read_documents(f)]
    if path.suffix == ".jsonl":
        return read_jsonl_texts(path)
    return [read_text(path)]


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One stream: each document's tokens followed by the end-of-text token (if the tokenizer has one)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.asarray(ids, dtype=dtype)


def load_token_file(path: Path, token_dtype: str, vocab_size: int) -> np.ndarray:
    """A pre-tokenized ``.bin`` file: a flat array of ``token_dtype`` ids, memory-mapped."""
    top = np.iinfo(token_dtype).max
    if vocab_size - 1 > top:  # a wider file read as this dtype gives small ids that pass every range check
        raise ValueError(f"data.token_dtype={token_dtype} holds ids up to {top} but the tokenizer has {vocab_size} "
                         f"tokens: set data.token_dtype=uint32 (for {path})")
    itemsize = np.dtype(token_dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"token file {path} has {size} bytes, not a multiple of {token_dtype}'s {itemsize}")
    if size == 0:
        raise ValueError(f"token file {path} is empty")
    return np.memmap(path, dtype=token_dtype, mode="r")


def load_tokens(path: str | None, tokenizer: Tokenizer, token_dtype: str, corpus_bytes: int) -> np.ndarray:
    """The token stream of ``path`` (None: the embedded corpus). Errors name the file."""
    if path is None:
        return encode_documents(stdlib_corpus(corpus_bytes), tokenizer)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".bin":
        return load_token_file(p, token_dtype, tokenizer.vocab_size)
    docs = read_documents(p)
    if not any(doc.strip() for doc in docs):
        raise ValueError(f"data file {p} holds no text (empty corpus)")
    return encode_documents(docs, tokenizer)
