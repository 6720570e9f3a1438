import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from thinwire.config import load_config  # noqa: E402


@pytest.fixture
def smoke_config():
    """The smoke config with overrides: a tiny federated run in a few seconds."""
    from thinwire.cli import EXAMPLES

    def make(*overrides: str):
        return load_config(EXAMPLES / "smoke.toml", list(overrides))

    return make
