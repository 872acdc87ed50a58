import os

import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs two pytest workers on two cores: more threads per worker only oversubscribes them.
torch.set_num_threads(1)
