import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the machine's cores: one torch thread each, not one per core
# each, which would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (hf_oracle, model_configs)

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_patching

    interpreter_patching.install()  # where it cannot, test_interpreter_patching says why


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
