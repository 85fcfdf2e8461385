"""The network as two consecutive blocks: FedSPZO's split perturbations, and FedKSeed's reuse of what runs
below the parameters it perturbs.

Block 1 is everything that runs before transformer block `split_layer` (embeddings, the first
`split_layer` blocks; a negative `split_layer` counts from the end, -1 = the last block); block 2 is the
rest (the remaining blocks, final norm, pooler, classification head).
Block 1 may hold no perturbed parameter (zo.params = "head"): then only block 2 is trained (spzo.p1 = 0).
FedKSeed cuts at `deepest_split` (the first block that runs a perturbed parameter): its block 1 holds none
of them, so h0 is the same for every perturbation and each estimate runs only block 2 on it, which gives the
same losses as the whole network (to float rounding: the same operations on the same inputs).
Which parameter belongs to which block is found by running the model once and noting which modules run
before block `split_layer` starts, so encoders (BERT, RoBERTa) and decoders (LLaMA family) split alike.

    h0 = block1(x)                  one clean pass, stopped at the input of block `split_layer`
    loss_block2(h0) = L(block2(h0))  the model with its block list cut to [split_layer:], fed h0 there
                                     (the embedding lookup still runs: it is a table read, no compute)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass once block 1's output is known."""


def transformer_blocks(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the block list, attribute name): the ModuleList of config.num_hidden_layers blocks."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and n:
                return module, attr
    raise ValueError("cannot find the model's transformer blocks (a ModuleList of config.num_hidden_layers)")


def stages(model: nn.Module, blocks: nn.ModuleList) -> dict[int, int]:
    """id(parameter) -> the index of the last transformer block started when its module first runs in a
    forward pass (-1: before block 0, e.g. the embeddings and their norm; len(blocks) - 1 for the final norm,
    pooler and head, which run after the last block). Found by running the model once on a dummy input; a
    parameter that does not run is absent (it cannot change the loss: callers place it last)."""
    stage: dict[int, int] = {}
    current = {"block": -1}

    def note(module, args):
        for p in module.parameters(recurse=False):
            stage.setdefault(id(p), current["block"])

    def enter(i):
        def hook(module, args):
            current["block"] = i

        return hook

    # The blocks' own hooks first: a block's pre-hook must set its index before its children note theirs.
    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [m.register_forward_pre_hook(note) for m in model.modules()]
    try:
        ids = torch.zeros((1, 4), dtype=torch.long)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return stage


def deepest_split(model: nn.Module, params: Mapping[str, torch.Tensor]) -> int:
    """The deepest transformer block the network can be cut at with every parameter of `params` in block 2:
    the first block that runs one of them, at most the last block (block 2 always holds a block, which h0 is
    fed to). 0 when one of them runs before block 0 (the embeddings' norm): nothing below them to reuse."""
    owner, attr = transformer_blocks(model)
    blocks = getattr(owner, attr)
    stage = stages(model, blocks)
    first = min((stage.get(id(p), len(blocks)) for p in params.values()), default=0)
    return max(0, min(first, len(blocks) - 1))


class SplitModel:
    def __init__(self, model: nn.Module, split_layer: int, params: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.owner, self.attr = transformer_blocks(model)
        self.blocks: nn.ModuleList = getattr(self.owner, self.attr)
        n = len(self.blocks)
        at = split_layer + n if split_layer < 0 else split_layer  # negative: counted from the last block
        if not 1 <= at < n:
            raise ValueError(
                f"spzo.split-layer must be in 1..{n - 1} (or -{n - 1}..-1, counted from the end) for this model "
                f"({n} transformer blocks), got {split_layer}"
            )
        self.split_layer = at
        self.block1, self.block2 = self._partition(params)

    def _partition(self, params: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Split `params` by whether their module runs before block `split_layer` in a forward pass."""
        stage = stages(self.model, self.blocks)
        block1 = {n: p for n, p in params.items() if stage.get(id(p), len(self.blocks)) < self.split_layer}
        block2 = {n: p for n, p in params.items() if n not in block1}
        if not block2:
            raise ValueError(f"spzo.split-layer {self.split_layer} leaves block 2 without parameters to perturb")
        return block1, block2

    @torch.no_grad()
    def hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """h0: the input of block `split_layer` (block 1's output), from one clean pass through block 1."""
        captured: dict[str, torch.Tensor] = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.blocks[self.split_layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"]

    @contextlib.contextmanager
    def _block2_only(self, h0: torch.Tensor):
        """The model runs blocks [split_layer:] only, with h0 in place of their input."""

        def feed(module, args, kwargs):
            if args:
                return (h0, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h0}

        handle = self.blocks[self.split_layer].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(self.owner, self.attr, nn.ModuleList(list(self.blocks)[self.split_layer :]))
        try:
            yield
        finally:
            setattr(self.owner, self.attr, self.blocks)
            handle.remove()

    @torch.no_grad()
    def loss_block2(self, batch: Mapping[str, torch.Tensor], h0: torch.Tensor) -> float:
        with self._block2_only(h0):
            return float(self.model(**batch).loss)

    @torch.no_grad()
    def loss(self, batch: Mapping[str, torch.Tensor]) -> float:
        return float(self.model(**batch).loss)
