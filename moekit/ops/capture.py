"""Whether a CUDA graph is being captured: host-side checks that read device values must skip then."""

import torch


def is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
