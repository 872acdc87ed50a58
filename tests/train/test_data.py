import json

import numpy as np
import pytest
import torch

from moekit.data import (
    ByteTokenizer,
    DataConfig,
    HFTokenizer,
    ShuffledBatches,
    TokenWindows,
    eval_batches,
    load_splits,
    stdlib_corpus,
)
from moekit.data.corpus import MIN_CORPUS_BYTES
from moekit.data.sources import load_tokens


def test_embedded_corpus_is_real_deterministic_text_of_the_budget():
    docs = stdlib_corpus(MIN_CORPUS_BYTES)
    assert sum(len(d.encode()) for d in docs) <= MIN_CORPUS_BYTES
    assert sum(len(d.encode()) for d in docs) > 0.99 * MIN_CORPUS_BYTES  # only undecodable bytes lost
    assert len(docs) > 20 and any("def " in d for d in docs) and any('"""' in d for d in docs)
    assert stdlib_corpus(MIN_CORPUS_BYTES) == docs
    with pytest.raises(ValueError, match="corpus_bytes"):
        stdlib_corpus(1000)


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "déjà vu — naïve ∑ 🙂"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eot_id]) == text


def test_hf_tokenizer_json(tmp_path, bpe_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_tokenizer))
    hf = HFTokenizer(bpe_tokenizer)
    assert hf.vocab_size == tok.get_vocab_size() and hf.eot_id == tok.token_to_id("<|endoftext|>")
    ids = hf.encode("def parse_args(self):")
    assert len(ids) < len("def parse_args(self):") and hf.decode(ids) == "def parse_args(self):"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        HFTokenizer(bad)


def test_hf_tokenizer_folder_is_refused_as_a_folder(tmp_path, bpe_tokenizer):
    """A model folder holding tokenizer.json was refused as "tokenizer file not found" though it is there."""
    with pytest.raises(ValueError, match=rf"data.tokenizer {tmp_path} is a folder: name its tokenizer.json file"):
        HFTokenizer(tmp_path)


def test_hf_tokenizer_reads_special_token_names_in_text_as_text(tmp_path, bpe_tokenizer):
    """A document that mentions "<|endoftext|>" must not be cut in two by the separator id."""
    hf = HFTokenizer(bpe_tokenizer)
    text = "split on <|endoftext|> here"
    ids = hf.encode(text)
    assert hf.eot_id not in ids and hf.decode(ids) == text
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "next"}) + "\n")
    tokens = load_tokens(str(docs), hf, "uint16", MIN_CORPUS_BYTES).tolist()
    assert tokens == ids + [hf.eot_id] + hf.encode("next") + [hf.eot_id]


def test_hf_tokenizer_finds_deepseek_end_of_sentence(tmp_path):
    """DeepSeek-V2/V3 end documents with "<｜end▁of▁sentence｜>" (full-width bars): without it the documents
    ran together with no separator."""
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken("<｜begin▁of▁sentence｜>"), AddedToken("<｜end▁of▁sentence｜>")])
    path = tmp_path / "deepseek.json"
    tok.save(str(path))
    assert HFTokenizer(path).eot_id == tok.token_to_id("<｜end▁of▁sentence｜>") == 3


def test_jsonl_text_field_and_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text(json.dumps({"text": "alpha beta"}) + "\n\n" + json.dumps({"text": "gamma", "id": 3}) + "\n")
    tokens = load_tokens(str(good), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)
    assert tokens.tolist() == list(b"alpha beta") + [256] + list(b"gamma") + [256]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl line 2: .*'text'"):
        load_tokens(str(missing), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "unterminated\n')
    with pytest.raises(ValueError, match="broken.jsonl line 1: invalid JSON"):
        load_tokens(str(broken), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)
    separator = tmp_path / "separator.jsonl"  # U+2028 inside a JSON string is not a line break
    separator.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_tokens(str(separator), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES).tolist() == \
        list("a\u2028b".encode()) + [256]


def test_jsonl_unpaired_surrogate_escape_is_named(tmp_path):
    """JSON may escape a lone surrogate ("\\ud800"), which no tokenizer can encode: the error named no file."""
    path = tmp_path / "scraped.jsonl"
    path.write_text('{"text": "ok \\u00e9"}\n{"text": "cut emoji \\ud83d"}\n')
    with pytest.raises(ValueError, match=r"scraped.jsonl line 2: 'text' holds an unpaired surrogate '\\ud83d'"):
        load_tokens(str(path), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)
    path.write_text('{"text": "a pair \\ud83d\\ude00"}\n')  # an escaped pair is one character
    assert load_tokens(str(path), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES).tolist() == \
        list("a pair \U0001f600".encode()) + [256]


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_files_that_are_not_utf8_are_named(tmp_path, name):
    path = tmp_path / name
    text = "caf\u00e9" if name.endswith(".txt") else json.dumps({"text": "caf\u00e9"}, ensure_ascii=False)
    path.write_bytes(("ok\n" + text + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text: byte \d+ \(line 2\) is 0xe9"):
        load_tokens(str(path), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)


def test_utf8_signature_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: it is no part of the first document."""
    bom = "\ufeff".encode()
    text, jsonl = tmp_path / "bom.txt", tmp_path / "bom.jsonl"
    text.write_bytes(bom + "café".encode())
    jsonl.write_bytes(bom + (json.dumps({"text": "a"}) + "\n").encode())
    assert load_tokens(str(text), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES).tolist() == list("café".encode()) + [256]
    assert load_tokens(str(jsonl), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES).tolist() == [ord("a"), 256]
    text.write_bytes(bom + b"ok\ncaf\xe9")  # the error still counts the file's own bytes
    with pytest.raises(ValueError, match=r"bom.txt is not UTF-8 text: byte 9 \(line 2\) is 0xe9"):
        load_tokens(str(text), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)


def test_tokenizer_vocab_size_covers_its_largest_id(tmp_path):
    """Ids need not be dense: the model needs a row for every id up to the largest."""
    from tokenizers import Tokenizer, models

    path = tmp_path / "sparse.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 500}, unk_token="[UNK]")).save(str(path))
    assert HFTokenizer(path).vocab_size == 501


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenized_bin_memmap(tmp_path, dtype):
    ids = np.random.default_rng(0).integers(0, 257, size=1000).astype(dtype)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    tokens = load_tokens(str(path), ByteTokenizer(), dtype, MIN_CORPUS_BYTES)
    assert isinstance(tokens, np.memmap) and np.array_equal(tokens, ids)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="odd.bin"):
        load_tokens(str(odd), ByteTokenizer(), "uint16", MIN_CORPUS_BYTES)


def test_token_file_too_narrow_for_the_tokenizer_is_refused(tmp_path):
    """A uint32 file read as the default uint16 gives ids 0, id, 0, id, ...: all in range, silently wrong."""
    from tokenizers import Tokenizer, models

    tok_path = tmp_path / "big.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "z": 70_000}, unk_token="[UNK]")).save(str(tok_path))
    tok = HFTokenizer(tok_path)
    ids = np.array([1, 70_000, 1, 5], dtype=np.uint32)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    with pytest.raises(ValueError, match=r"data.token_dtype=uint16 holds ids up to 65535 but the tokenizer has "
                                         r"70001 tokens: set data.token_dtype=uint32"):
        load_tokens(str(path), tok, "uint16", MIN_CORPUS_BYTES)
    assert load_tokens(str(path), tok, "uint32", MIN_CORPUS_BYTES).tolist() == ids.tolist()


def test_out_of_vocab_token_file_names_the_file(tmp_path):
    path = tmp_path / "big_ids.bin"
    np.random.default_rng(1).integers(300, 1000, size=200).astype(np.uint16).tofile(path)
    windows = TokenWindows(load_tokens(str(path), ByteTokenizer(), "uint16", 0), 16, 257, str(path))
    with pytest.raises(ValueError, match=r"big_ids.bin: token id \d+ >= the model's vocab_size 257"):
        windows.batch([0])


def test_held_out_split_is_disjoint_tail(text_file):
    tok = ByteTokenizer()
    splits = load_splits(DataConfig(path=str(text_file), val_fraction=0.1), tok, 32, 257)
    stream = load_tokens(str(text_file), tok, "uint16", 0)
    n_train = len(splits.train.tokens)
    assert np.array_equal(np.concatenate([splits.train.tokens, splits.val.tokens]), stream)
    assert abs(len(splits.val.tokens) - 0.1 * len(stream)) <= 1
    assert splits.train.num_windows == n_train // 32


def test_stream_shorter_than_two_windows_is_refused_with_its_own_length(tmp_path):
    """Cut at len - seq_len < 0, the slices gave a training part of a made-up length."""
    path = tmp_path / "short.txt"
    path.write_text("x" * 19)  # 20 tokens with the separator
    with pytest.raises(ValueError, match=r"short.txt holds 20 tokens, fewer than the 2 windows of seq_len=32 .*"
                                         r"training part and a held-out part"):
        load_splits(DataConfig(path=str(path)), ByteTokenizer(), 32, 257)


def test_batches_cover_each_window_once_per_epoch_and_resume_exactly():
    tokens = np.random.default_rng(2).integers(0, 257, size=32 * 10 + 5).astype(np.uint16)
    windows = TokenWindows(tokens, 32, 257, "random ids")
    loader = ShuffledBatches(windows, batch_size=3, seed=7)
    seen = torch.cat([loader.next_batch() for _ in range(10)])  # 30 windows = 3 epochs of 10
    rows = {tuple(r.tolist()) for r in seen[:10]}
    expected = {tuple(tokens[i * 32 : (i + 1) * 32].tolist()) for i in range(10)}
    assert rows == expected
    assert not torch.equal(seen[:10], seen[10:20])  # each epoch is reshuffled

    first = ShuffledBatches(windows, 3, seed=7)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    resumed = ShuffledBatches(windows, 3, seed=7)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(first.next_batch(), resumed.next_batch())
    with pytest.raises(ValueError, match="seed"):
        ShuffledBatches(windows, 3, seed=8).load_state_dict(state)


def test_eval_batches_are_fixed_and_too_short_data_is_refused():
    tokens = np.random.default_rng(3).integers(0, 257, size=200).astype(np.uint16)
    windows = TokenWindows(tokens, 16, 257, "ids")
    batches = eval_batches(windows, 4, 2)
    assert [b.shape for b in batches] == [(4, 16), (4, 16)]
    assert torch.equal(batches[0][1], torch.from_numpy(tokens[16:32].astype(np.int64)))
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(tokens[:10], 16, 257, "short")


def test_one_token_windows_are_refused():
    """A window of one token predicts nothing: training logged NaN losses and the first evaluation
    crashed with ZeroDivisionError."""
    tokens = np.random.default_rng(3).integers(0, 257, size=200).astype(np.uint16)
    with pytest.raises(ValueError, match=r"train.seq_len=1: a window needs at least 2 tokens"):
        TokenWindows(tokens, 1, 257, "ids")
    assert TokenWindows(tokens, 2, 257, "ids").num_windows == 100


def test_embedded_corpus_with_packages_reaches_below_the_top_level():
    from moekit.data.corpus import stdlib_source_files

    top, every = stdlib_source_files(), stdlib_source_files(packages=True)
    assert set(top) < set(every) and any(p.parent.name == "json" for p in every)
    assert not any("site-packages" in p.parts for p in every)
    assert every == stdlib_source_files(packages=True)  # sorted, so the same corpus every run
    big = 2 * MIN_CORPUS_BYTES
    docs = stdlib_corpus(big, packages=True)
    assert sum(len(d.encode()) for d in docs) > 0.99 * big and docs == stdlib_corpus(big, packages=True)


def test_data_position_is_refused_on_another_stream_and_old_positions_still_load():
    tokens = np.random.default_rng(4).integers(0, 257, size=32 * 10).astype(np.uint16)
    loader = ShuffledBatches(TokenWindows(tokens, 32, 257, "ids"), 3, seed=7)
    loader.next_batch()
    state = loader.state_dict()
    assert {k: state[k] for k in ("num_windows", "seq_len")} == {"num_windows": 10, "seq_len": 32}

    longer = ShuffledBatches(TokenWindows(tokens, 64, 257, "ids"), 3, seed=7)
    expected = ("data position saved for 10 windows of seq_len 32; this run has 5 windows of seq_len 64: "
                "resume with the same data and train.seq_len")
    with pytest.raises(ValueError, match=expected):
        longer.load_state_dict(state)
    other = np.random.default_rng(5).integers(0, 257, size=32 * 10).astype(np.uint16)
    with pytest.raises(ValueError, match="this run's other ids has as many windows but other tokens"):
        ShuffledBatches(TokenWindows(other, 32, 257, "other ids"), 3, seed=7).load_state_dict(state)
    # the same stream in a wider dtype (another data.token_dtype) is the same data
    ShuffledBatches(TokenWindows(tokens.astype(np.uint32), 32, 257, "ids"), 3, seed=7).load_state_dict(state)

    # A checkpoint from before the stream keys (and before the (seed, epoch) order seeding).
    legacy = ShuffledBatches(TokenWindows(tokens, 32, 257, "ids"), 3, seed=7)
    legacy.order_seeding = 1
    legacy.next_batch()
    old = {k: legacy.state_dict()[k] for k in ("epoch", "index", "seed")}
    resumed = ShuffledBatches(TokenWindows(tokens, 32, 257, "ids"), 3, seed=7)
    resumed.load_state_dict(old)
    for _ in range(5):  # across the epoch boundary too
        assert torch.equal(resumed.next_batch(), legacy.next_batch())
    short = ShuffledBatches(TokenWindows(tokens[:32 * 3], 32, 257, "ids"), 3, seed=7)
    with pytest.raises(ValueError, match="data position 3 is past this run's 3 windows"):
        short.load_state_dict(old)


def test_training_refuses_a_held_out_file_inside_the_training_data(tmp_path, make_config):
    from moekit.data import DataConfig
    from moekit.data.splits import check_held_out_apart
    from moekit.train.config import TrainConfig
    from moekit.train.trainer import Trainer

    values, _ = make_config()
    values["data"]["val_path"] = values["data"]["path"]
    with pytest.raises(ValueError, match="would be in the training stream too"):
        Trainer(TrainConfig.from_dict(values))

    folder = tmp_path / "corpus"
    folder.mkdir()
    for val in (folder / "val.txt", folder):
        with pytest.raises(ValueError, match="is inside data.path .* would be in the training stream too"):
            check_held_out_apart(DataConfig(path=str(folder), val_path=str(val)))
    check_held_out_apart(DataConfig(path=str(folder), val_path=str(tmp_path / "val.txt")))  # apart: fine


def test_training_refuses_a_held_out_folder_that_holds_the_training_data(tmp_path):
    """A data.val_path folder is read whole: the training file inside it would be held out too."""
    from moekit.data.splits import check_held_out_apart

    folder = tmp_path / "corpus"
    (folder / "train").mkdir(parents=True)
    for train in (folder / "train.txt", folder / "train", folder / "train" / "part.jsonl"):
        with pytest.raises(ValueError, match=r"data.path .* is inside data.val_path .* would be held out too"):
            check_held_out_apart(DataConfig(path=str(train), val_path=str(folder)))
    check_held_out_apart(DataConfig(path=str(folder / "train"), val_path=str(folder / "val.txt")))  # apart: fine


def test_neighbouring_seeds_do_not_share_epoch_orders():
    """Seeding each epoch from seed + epoch gave seed 0's second epoch the order of seed 1's first."""
    windows = TokenWindows(np.arange(32 * 50, dtype=np.uint16) % 257, 32, 257, "ids")
    orders = {}
    for seed in (0, 1):
        loader = ShuffledBatches(windows, 50, seed)
        orders[seed] = [loader.next_batch()[:, 0].tolist() for _ in range(2)]  # two epochs
    assert orders[0][1] != orders[1][0] and orders[0][0] != orders[1][0]
