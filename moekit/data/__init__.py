"""Training data: the embedded corpus, text / JSONL / token files, tokenizers, resumable batches."""

from moekit.data.config import DataConfig
from moekit.data.corpus import stdlib_corpus
from moekit.data.loader import ShuffledBatches, TokenWindows, eval_batches
from moekit.data.splits import Splits, load_held_out, load_splits
from moekit.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "ShuffledBatches",
    "Splits",
    "TokenWindows",
    "Tokenizer",
    "eval_batches",
    "load_held_out",
    "load_splits",
    "load_tokenizer",
    "stdlib_corpus",
]
