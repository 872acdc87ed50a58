"""The input precision of Triton dots on float32 operands, following torch's TF32 switch."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """"ieee" for float32 inputs unless TF32 matmuls are allowed (as torch.matmul decides);
    Triton's own default is TF32, which would make a float32 model differ from its reference by
    ~1e-3. 16-bit dots ignore the setting."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
