"""common.training.train_steps: a client round's dropout is a function of its seed alone."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from common.config import parse_run_config
from common.training import dropout_seed, make_optimizer, train_steps

pytestmark = pytest.mark.unit


class DropoutNet(nn.Module):
    """The smallest model with the interface train_steps drives: keyword batch in, `.loss` out, dropout inside."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(8, 2)

    def forward(self, features, attention_mask, labels):
        return SimpleNamespace(loss=F.cross_entropy(self.lin(self.drop(features)), labels))


def data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(32, 8, generator=gen),
        "attention_mask": torch.ones(32, 8, dtype=torch.long),
        "labels": torch.randint(0, 2, (32,), generator=gen),
    }


def round_of(net: nn.Module, seed: int) -> tuple[list[float], torch.Tensor]:
    net = copy.deepcopy(net)
    opt = make_optimizer(net.parameters(), parse_run_config({}).train)
    losses = train_steps(net, data(), [list(range(i, i + 8)) for i in range(0, 32, 8)], [opt], seed)
    return losses, net.lin.weight.detach().clone()


def test_the_same_seed_gives_the_same_round_whatever_the_process_ran_before():
    torch.manual_seed(1)
    net = DropoutNet()
    torch.manual_seed(123)  # a worker that ran other clients first: its global generator is elsewhere
    first = round_of(net, 7)
    torch.rand(1000)
    second = round_of(net, 7)
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])
    other = round_of(net, 8)
    assert other[0] != first[0]  # the seed does reach the dropout: another seed, other masks


def test_the_global_generator_is_left_as_it_was():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    round_of(DropoutNet(), 7)  # DropoutNet() draws its init from the generator too: compare after the same draws
    after = torch.rand(4)
    torch.manual_seed(5)
    DropoutNet()
    assert torch.equal(after, torch.rand(4))
    assert not torch.equal(expected, after)  # the comparison above is not vacuous: init did draw


@pytest.mark.parametrize("change", [{"seed": 2}, {"server_round": 3}, {"partition_key": "p1"}])
def test_dropout_seed_depends_on_run_seed_round_and_partition(change):
    base = {"seed": 1, "server_round": 2, "partition_key": "p0"}
    args = {**base, **change}

    def seed_of(a):
        return dropout_seed(parse_run_config({"seed": a["seed"]}), a["server_round"], a["partition_key"])

    assert seed_of(args) != seed_of(base)
    assert seed_of(base) == seed_of(dict(base))
