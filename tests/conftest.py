import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from thinwire.config import load_config  # noqa: E402

# The tiny models run fastest single-threaded, and two threads on a busy 2-core machine thrash.
torch.set_num_threads(1)


@pytest.fixture
def smoke_config():
    """The smoke config with overrides: a tiny federated run in a few seconds."""
    from thinwire.config import EXAMPLES

    def make(*overrides: str):
        return load_config(EXAMPLES / "smoke.toml", list(overrides))

    return make
