"""``moekit generate --ckpt DIR "prompt"``: continue a prompt with a trained model."""

from __future__ import annotations

import argparse

DESCRIPTION = "Continue a prompt with a trained model."


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint", description=DESCRIPTION)
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (uses its latest)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy decoding, as --greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 disables top-k filtering")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """The model's decoding cache holds max_seq_len tokens; say so in terms of the options given
    (the model's own error names an internal max_len the user never set)."""
    if prompt_tokens >= max_seq_len:
        raise ValueError(f"the prompt is {prompt_tokens} tokens and the model's max_seq_len is {max_seq_len}: "
                         f"shorten it to at most {max_seq_len - 1} tokens")
    if prompt_tokens + max_new_tokens > max_seq_len:
        room = max(0, max_seq_len - prompt_tokens)
        raise ValueError(f"--max-new-tokens {max_new_tokens} plus the {prompt_tokens}-token prompt exceeds the "
                         f"model's max_seq_len {max_seq_len}: use --max-new-tokens at most {room}")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.train.evaluate import generate_text
    from moekit.train.load import load_trained
    from moekit.train.trainer import resolve_device

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device, "--device")
    model, _, tokenizer = load_trained(args.ckpt, device)
    check_length(len(tokenizer.encode(args.prompt)), args.max_new_tokens, model.config.max_seq_len)
    torch.manual_seed(args.seed)
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k or None, top_p=args.top_p, greedy=args.greedy, device=device))
    return 0
