import os
import sys
from pathlib import Path

import torch  # (importing torch does not import triton)

# The Triton interpreter is process-wide and fixed when triton is first imported (torch or
# transformers may import it early): without a GPU, enable it before anything else, so the
# kernel tests run instead of skipping. The engine's own kernels dispatch ignores it
# (ENGINE_TRITON_INTERPRET). With a GPU the kernels must compile for it, so it stays off.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
