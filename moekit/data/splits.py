"""Training and held-out token windows from a ``DataConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.data.config import DataConfig
from moekit.data.loader import TokenWindows
from moekit.data.sources import load_tokens
from moekit.data.tokenizer import Tokenizer


@dataclass
class Splits:
    train: TokenWindows
    val: TokenWindows


def check_held_out_apart(cfg: DataConfig) -> None:
    """For training: a ``val_path`` that is ``path`` or inside it would be trained on too, and a ``path``
    inside a ``val_path`` folder (read whole) would be held out too. (Evaluating a checkpoint on any
    file, its training text included, is fine.)"""
    if cfg.val_path is None or cfg.path is None:
        return
    train_path, val_path = Path(cfg.path).resolve(), Path(cfg.val_path).resolve()
    if val_path == train_path or train_path in val_path.parents:
        raise ValueError(f"data.val_path {cfg.val_path} is inside data.path {cfg.path}: the held-out text "
                         "would be in the training stream too")
    if val_path in train_path.parents:
        raise ValueError(f"data.path {cfg.path} is inside data.val_path {cfg.val_path}: the training text "
                         "would be held out too")


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )


def load_held_out(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, vocab_size: int) -> TokenWindows:
    """The held-out split alone: with ``cfg.val_path`` only that file is read (evaluating must not
    need the training text, which may have moved since)."""
    if cfg.val_path is None:
        return load_splits(cfg, tokenizer, seq_len, vocab_size).val
    check_vocab(tokenizer, vocab_size)
    val = load_tokens(cfg.val_path, tokenizer, cfg.token_dtype, cfg.corpus_bytes)
    return TokenWindows(val, seq_len, vocab_size, cfg.val_path)


def load_splits(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, vocab_size: int) -> Splits:
    """Held out: ``cfg.val_path`` if given, else the last ``val_fraction`` of the stream."""
    check_vocab(tokenizer, vocab_size)
    name = cfg.path or "the embedded corpus"
    tokens = load_tokens(cfg.path, tokenizer, cfg.token_dtype, cfg.corpus_bytes)
    if cfg.val_path is not None:
        val = load_tokens(cfg.val_path, tokenizer, cfg.token_dtype, cfg.corpus_bytes)
        return Splits(TokenWindows(tokens, seq_len, vocab_size, name),
                      TokenWindows(val, seq_len, vocab_size, cfg.val_path))
    if len(tokens) < 2 * seq_len:  # else the cut below is negative and the parts' lengths are made up
        raise ValueError(f"{name} holds {len(tokens)} tokens, fewer than the 2 windows of seq_len={seq_len} a "
                         "training part and a held-out part need: give more text, or a data.val_path")
    cut = len(tokens) - max(seq_len, int(len(tokens) * cfg.val_fraction))
    return Splits(TokenWindows(tokens[:cut], seq_len, vocab_size, f"{name} (training part)"),
                  TokenWindows(tokens[cut:], seq_len, vocab_size, f"{name} (held-out part)"))
