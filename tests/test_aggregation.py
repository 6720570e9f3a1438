import pytest
import torch

from thinwire.config import MethodConfig
from thinwire.methods.aggregate import weighted_mean
from thinwire.methods.base import Reply, client_weights
from thinwire.methods.server_opt import ServerOptimizer
from thinwire.wire import Payload


def _reply(n):
    return Reply(client_id=0, payload=Payload(), num_examples=n)


def test_example_and_equal_weights():
    assert client_weights([_reply(1), _reply(3)], "examples") == [0.25, 0.75]
    assert client_weights([_reply(1), _reply(3)], "equal") == [0.5, 0.5]


def test_weighted_mean_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([[0.0]])}
    mean = weighted_mean([a, b], [0.25, 0.75])
    assert torch.allclose(mean["w"], torch.tensor([2.5, -1.0]))
    assert torch.allclose(mean["b"], torch.tensor([[1.0]]))


def test_plain_server_step():
    w = {"w": torch.tensor([1.0, 1.0])}
    ServerOptimizer(MethodConfig(server_lr=0.5)).step(w, {"w": torch.tensor([2.0, -4.0])})
    assert torch.allclose(w["w"], torch.tensor([0.0, 3.0]))


def test_fedavgm_by_hand():
    w = {"w": torch.tensor([0.0])}
    opt = ServerOptimizer(MethodConfig(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5))
    opt.step(w, {"w": torch.tensor([1.0])})  # m = 1, w = -1
    opt.step(w, {"w": torch.tensor([1.0])})  # m = 1.5, w = -2.5
    assert w["w"].item() == pytest.approx(-2.5)


def test_fedadam_by_hand():
    w = {"w": torch.tensor([0.0])}
    cfg = MethodConfig(server_optimizer="fedadam", server_lr=0.1, server_momentum=0.9, server_beta2=0.99,
                       server_tau=1e-3)
    opt = ServerOptimizer(cfg)
    opt.step(w, {"w": torch.tensor([2.0])})
    m, v = 0.1 * 2.0, 0.01 * 4.0
    assert w["w"].item() == pytest.approx(-0.1 * m / (v ** 0.5 + 1e-3))
