"""Working precision of the numerically touchy bits (norms, gates, decays, rotary angles)."""

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
