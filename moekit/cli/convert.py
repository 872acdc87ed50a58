"""``moekit convert SRC DST``: a transformers checkpoint folder to a moekit one, or back.

The direction follows SRC: a transformers folder (its config.json names a ``model_type``) is
converted to a moekit checkpoint; a moekit checkpoint converted from transformers goes back
to its source architecture, saved with ``save_pretrained``. Tokenizer files (chat template
included) and the generation defaults travel along.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
# The files beside the weights that a user of the model needs: the tokenizer in its fast and
# slow forms, its chat template (transformers 5 saves it apart from tokenizer_config.json), and the
# sampling defaults (copied over the generation_config.json that save_pretrained derives from the config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between transformers and moekit checkpoints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a transformers checkpoint folder, or a moekit one")
    p.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the source's precision")
    p.set_defaults(func=run)


def refuse_training_checkpoint(folder: Path) -> None:
    """A `moekit train` run or checkpoint has no config.json; say what it is rather than only
    that the file is missing, since it is the first thing a user tries to convert."""
    if (folder / "manifest.json").is_file() or (folder / "checkpoints" / "latest").is_file():
        raise ValueError(f"{folder} is a `moekit train` run or checkpoint; convert reads save_pretrained "
                         "folders (transformers, or moekit models converted from them). A model trained from "
                         "scratch (no config.hf_config) has no transformers architecture to go back to; "
                         "load it with moekit.train.load.load_trained")


def source_kind(folder: Path) -> str:
    """'hf' or 'moekit', from the folder's config.json."""
    path = folder / "config.json"
    if not folder.exists():
        raise FileNotFoundError(f"source folder not found: {folder}")
    if not path.is_file():
        refuse_training_checkpoint(folder)
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if "layer_pattern" in values:
        return "moekit"
    if "model_type" in values:
        return "hf"
    raise ValueError(f"{path} is neither a transformers config (no model_type) nor a moekit one (no layer_pattern)")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.hf import from_hf, to_hf
    from moekit.models.model import MoEForCausalLM

    if args.dst.exists() and not args.dst.is_dir():
        raise ValueError(f"{args.dst} is a file; the output must be a new (or empty) folder")
    if args.dst.exists() and any(args.dst.iterdir()):
        raise ValueError(f"{args.dst} exists and is not empty; choose a new output folder")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if source_kind(args.src) == "hf":
        model = from_hf(args.src, dtype=dtype)
        model.save_pretrained(args.dst)
        what = f"{model.config.hf_config['model_type']} -> moekit"
    else:
        model = MoEForCausalLM.from_pretrained(args.src, dtype=dtype)
        hf_model = to_hf(model)
        hf_model.save_pretrained(args.dst)
        what = f"moekit -> {type(hf_model).__name__}"
    for name in TOKENIZER_FILES:
        if (args.src / name).is_file():
            shutil.copy2(args.src / name, args.dst / name)
    print(f"converted {args.src} ({what}, {model.num_parameters():,} parameters) to {args.dst}")
    return 0
