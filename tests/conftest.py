import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from thinwire.config import load_config  # noqa: E402

def crash_in_round(monkeypatch, method: str, rnd: int, error: BaseException):
    """The server of `method` raises `error` when it aggregates round `rnd` (a power cut after the
    previous round's checkpoint); returns a function that restores it. Patched where `aggregate`
    is defined, so the method's classes keep their shape."""
    from thinwire.methods import get_method

    server_cls = next(c for c in get_method(method).server.__mro__ if "aggregate" in vars(c))
    original = server_cls.aggregate

    def aggregate(self, at, replies):
        if at == rnd:
            raise error
        return original(self, at, replies)

    monkeypatch.setattr(server_cls, "aggregate", aggregate)
    return lambda: monkeypatch.setattr(server_cls, "aggregate", original)


# The tiny models run fastest single-threaded, and two threads on a busy 2-core machine thrash.
torch.set_num_threads(1)


@pytest.fixture
def smoke_config():
    """The smoke config with overrides: a tiny federated run in a few seconds."""
    from thinwire.config import EXAMPLES

    def make(*overrides: str):
        return load_config(EXAMPLES / "smoke.toml", list(overrides))

    return make


@pytest.fixture
def first_upload(smoke_config):
    """A method's server after setup, and client 0's honest round-1 upload as the server receives it:
    make(*overrides) -> (server, payload, num_examples)."""
    from thinwire.data import build_federation
    from thinwire.methods import get_method
    from thinwire.methods.base import ClientState, RunContext, Workbench
    from thinwire.wire import Payload

    def make(*overrides: str):
        config = smoke_config(*overrides)
        ctx = RunContext(config, Workbench(config))
        spec = get_method(config.method.name)
        server, client = spec.server(ctx), spec.client(ctx)
        server.setup()
        upload = client.fit(1, 0, Payload.decode(server.download(1, 0).encode()), build_federation(config).clients[0],
                            ClientState())
        return server, Payload.decode(upload.payload.encode()), upload.num_examples

    return make
