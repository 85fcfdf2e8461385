"""Zero-order mathematics: seeded perturbations, the two-sided estimate, the split, replay = training."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from common.config import parse_run_config
from common.split import SplitModel, deepest_split
from common.training import batch, client_data
from common.zeroorder import Perturbation, aggregate_scalars, spsa_step, zo_parameters
from methods.fedkseed import kseed
from methods.fedspzo import spzo

DRAW = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from common.zeroorder import Perturbation
p = Perturbation({"w": torch.zeros(1000, 37), "b": torch.zeros(5)}, sys.argv[2])
print(",".join(f"{v:.9g}" for v in torch.cat([p.z(1234, "w").flatten(), p.z(1234, "b")]).tolist()[::97]))
"""


@pytest.mark.integration
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_perturbations_are_the_same_in_every_process(distribution):
    here = Perturbation({"w": torch.zeros(1000, 37), "b": torch.zeros(5)}, distribution)
    mine = ",".join(f"{v:.9g}" for v in torch.cat([here.z(1234, "w").flatten(), here.z(1234, "b")]).tolist()[::97])
    for threads in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", DRAW, threads, distribution], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == mine
    assert not torch.equal(here.z(1234, "w").clone(), here.z(1235, "w"))  # another seed, another z
    assert not torch.equal(here.z(1234, "w")[:1, :5].clone(), here.z(1234, "b"))  # another name, another z


@pytest.mark.unit
def test_rademacher_signs_and_gaussian_moments():
    p = Perturbation({"w": torch.zeros(200_003)}, "rademacher")
    z = p.z(7, "w")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(float(z.mean())) < 0.01
    g = Perturbation({"w": torch.zeros(200_003)}, "gaussian").z(7, "w")
    assert abs(float(g.mean())) < 0.01 and abs(float(g.var()) - 1) < 0.02


@pytest.mark.unit
def test_perturb_and_restore_leave_parameters_in_place():
    w = torch.randn(64, 33)
    before = w.clone()
    p = Perturbation({"w": w})
    ptr = w.data_ptr()
    p.add(5, 1e-3)
    assert not torch.equal(w, before)
    p.add(5, -1e-3)
    torch.testing.assert_close(w, before, rtol=0, atol=1e-7)
    assert w.data_ptr() == ptr  # in place: no copy of the parameters


@pytest.mark.unit
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_two_sided_estimate_is_the_directional_derivative_of_a_quadratic(distribution):
    torch.manual_seed(0)
    theta, target = torch.randn(50), torch.randn(50)
    start = theta.clone()
    pert = Perturbation({"t": theta}, distribution)
    z = pert.z(11, "t").clone()
    g, _ = spsa_step(pert, 11, 1e-2, 0.1, lambda: float(0.5 * ((theta.double() - target.double()) ** 2).sum()))
    # For L = |θ - a|² / 2 the central difference is exact: g = zᵀ(θ - a).
    assert g == pytest.approx(float(z.double() @ (start.double() - target.double())), rel=1e-5)
    torch.testing.assert_close(theta, start - 0.1 * g * z, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_nan_loss_restores_and_skips():
    w = torch.ones(10)
    pert = Perturbation({"w": w})
    g, loss = spsa_step(pert, 3, 1e-3, 1.0, lambda: float("nan"))
    assert g == 0.0 and np.isnan(loss)
    torch.testing.assert_close(w, torch.ones(10), rtol=0, atol=1e-6)


@pytest.mark.unit
def test_aggregate_scalars_is_the_example_weighted_mean():
    a, b = np.array([1.0, 0.0, 2.0], np.float32), np.array([3.0, 1.0, 0.0], np.float32)
    np.testing.assert_allclose(aggregate_scalars([1, 3], [a, b]), [2.5, 0.75, 0.5])
    assert aggregate_scalars([1, 3], [a, b]).dtype == np.float32


def _cfg(model, glue_dir, tmp_path, **extra):
    return parse_run_config(
        {
            "model": model, "task": "rte", "data-dir": glue_dir, "results-dir": str(tmp_path),
            "method": "fedspzo", "train.local-steps": 3, "train.batch-size": 4, "train.max-length": 32,
            "spzo.split-layer": 1, "spzo.p1": 1, "spzo.p2": 3, "zo.lr": 1e-2, "zo.eps": 1e-2, "kseed.k": 16, "zo.params": "all",
            **extra,
        }
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_llama"])
def test_split_forward_equals_whole_forward(kind, request, glue_dir, tmp_path):
    cfg = _cfg(request.getfixturevalue(kind), glue_dir, tmp_path, **{"head.kind": "classifier"})
    sm = spzo.build(cfg)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    x = batch(encoded, [0, 1, 2, 3])
    h0 = sm.split.hidden(x)
    assert h0.shape[:2] == x["input_ids"].shape
    assert sm.split.loss_block2(x, h0) == pytest.approx(sm.split.loss(x), abs=1e-6)
    # The blocks partition the perturbed parameters: layer 0 in block 1, layer 1 and the head in block 2.
    assert set(sm.pert1.params) | set(sm.pert2.params) == set(sm.params)
    assert not set(sm.pert1.params) & set(sm.pert2.params)
    assert any(".0." in n for n in sm.pert1.params) and not any(".1." in n for n in sm.pert1.params)
    assert any(n.startswith(("classifier", "score")) for n in sm.pert2.params)
    # Embedding tables are not perturbed by default.
    tables = {id(m.weight) for m in sm.zo.loaded.model.modules() if isinstance(m, torch.nn.Embedding)}
    assert tables and not tables & {id(p) for p in sm.params.values()}
    assert len(zo_parameters(sm.zo.loaded.model, True)) > len(sm.params)


@pytest.mark.integration
def test_split_layer_must_leave_two_blocks(tiny_bert, glue_dir, tmp_path):
    cfg = _cfg(tiny_bert, glue_dir, tmp_path)
    model = spzo.build(cfg).zo
    for bad in (0, 2, 5, -2):
        with pytest.raises(ValueError, match="split-layer must be in 1..1"):
            SplitModel(model.loaded.model, bad, model.params)
    # negative counts from the end: -1 is the last block on any depth (the shipped default)
    assert SplitModel(model.loaded.model, -1, model.params).split_layer == 1


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.integration
def test_fedspzo_replay_of_the_scalars_rebuilds_the_trained_model(tiny_bert, glue_dir, tmp_path):
    cfg = _cfg(tiny_bert, glue_dir, tmp_path)
    client, server = spzo.build(cfg), spzo.build(cfg)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    rho = spzo.round_seed(cfg.seed, 1)
    result = spzo.local_update(client, cfg, rho, cfg.zo.lr, encoded, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    assert result.g1.shape == (3, 1) and result.g2.shape == (3, 3) and np.all(result.g2 != 0)
    assert result.forward_passes == 3 * (1 + 2 * 3 + 2 * 1)
    assert (result.calls.full, result.calls.block1, result.calls.block2) == (3 * 2 * 1, 3, 3 * 2 * 3)
    start = _snapshot(server.params)
    spzo.replay(server, spzo.LogEntry(1, rho, cfg.zo.lr, result.g1, result.g2))
    moved = 0
    for n, p in server.params.items():
        # Float rounding of the client's perturb-and-restore only: relative to the weights' size (the
        # label-word head's weights are of order 10).
        torch.testing.assert_close(p, client.params[n], rtol=1e-6, atol=1e-6)
        moved += int(not torch.equal(p, start[n]))
    assert moved == len(start)  # every perturbed tensor moved


@pytest.mark.integration
def test_fedkseed_replay_of_the_scalars_rebuilds_the_trained_model(tiny_bert, glue_dir, tmp_path):
    cfg = _cfg(tiny_bert, glue_dir, tmp_path, method="fedkseed", **{"kseed.perturbations": 2})
    client, server = kseed.build(cfg), kseed.build(cfg)
    assert client.candidates == kseed.candidate_seeds(cfg.seed, 16) and len(set(client.candidates)) == 16
    encoded, _ = client_data(cfg, {"partition-id": 1, "num-partitions": 2})
    result = kseed.local_update(client, cfg, cfg.zo.lr, encoded, [[0, 1, 2, 3], [4, 5, 6, 7]], pick_seed=3)
    assert result.scalars.shape == (16,) and 1 <= np.count_nonzero(result.scalars) <= 4
    assert client.split is None  # "all" perturbs the embeddings' norm: nothing below it to reuse
    assert result.forward_passes == result.calls.full == 2 * 2 * 2
    kseed.replay(server, kseed.LogEntry(1, cfg.zo.lr, result.scalars), perturbations=2)
    for n, p in server.params.items():
        # Float rounding of the client's perturb-and-restore only: relative to the weights' size (the
        # label-word head's weights are of order 10).
        torch.testing.assert_close(p, client.params[n], rtol=1e-6, atol=1e-6)


@pytest.mark.integration
def test_zero_order_training_lowers_the_loss_of_a_fixed_batch(tiny_bert, glue_dir, tmp_path):
    """The estimator points downhill: a few dozen FedSPZO steps on one batch reduce its loss."""
    cfg = _cfg(tiny_bert, glue_dir, tmp_path, **{"zo.lr": 2e-2, "spzo.p2": 4})
    sm = spzo.build(cfg)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    # One class only: a random tiny model sits at log 2, and the head alone can move it down from there.
    idx = [i for i, y in enumerate(encoded["labels"].tolist()) if y == 0][:8]
    before = sm.split.loss(batch(encoded, idx))
    spzo.local_update(sm, cfg, 99, cfg.zo.lr, encoded, [idx] * 40)
    assert sm.split.loss(batch(encoded, idx)) < before - 0.01


@pytest.mark.integration
def test_deepest_split_is_the_first_block_that_runs_a_perturbed_parameter(tiny_bert):
    cfg = parse_run_config({"method": "fedkseed", "model": tiny_bert, "zo.params": "head"})
    zm = kseed.build(cfg).zo
    model = zm.loaded.model
    named = dict(model.named_parameters())
    assert deepest_split(model, zm.params) == 1  # the head runs after the last of the 2 blocks: cut at 1
    assert deepest_split(model, {n: p for n, p in named.items() if ".layer.1." in n}) == 1
    assert deepest_split(model, {n: p for n, p in named.items() if ".layer.0." in n}) == 0
    for subset in ("all", "bitfit"):  # both perturb the embeddings' norm, which runs before block 0
        assert deepest_split(model, zo_parameters(model, False, subset, zm.loaded.head)) == 0


def _block_calls(model) -> tuple[list[int], list]:
    """Counts of completed forward calls of each transformer block (hooks to remove when done): a forward
    hook, since the h0 pass stops in block split-layer's pre-hook, before it runs."""
    from common.split import transformer_blocks

    owner, attr = transformer_blocks(model)
    counts = [0] * len(getattr(owner, attr))

    def counter(i):
        def hook(module, args, output):
            counts[i] += 1

        return hook

    return counts, [b.register_forward_hook(counter(i)) for i, b in enumerate(getattr(owner, attr))]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_llama"])
def test_fedkseed_reuses_what_runs_below_the_head_with_the_same_estimates(kind, request, glue_dir, tmp_path):
    """With the head alone perturbed, one clean pass per step gives h0 and every loss runs the last block
    and the head only: the same loss differences as the whole network, to float rounding, the same trained
    model, and fewer transformer blocks run."""
    cfg = _cfg(request.getfixturevalue(kind), glue_dir, tmp_path, method="fedkseed",
               **{"zo.params": "head", "kseed.perturbations": 3, "head.kind": "classifier"})  # fmt: skip
    reused, whole = kseed.build(cfg), kseed.build(cfg)
    assert reused.split is not None and reused.split.split_layer == 1 and not reused.split.block1
    whole.split = None
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    runs = {}
    for name, km in (("reused", reused), ("whole", whole)):
        counts, hooks = _block_calls(km.zo.loaded.model)
        try:
            runs[name] = (kseed.local_update(km, cfg, cfg.zo.lr, encoded, batches, pick_seed=5), counts)
        finally:
            for h in hooks:
                h.remove()
    (r, blocks_r), (w, blocks_w) = runs["reused"], runs["whole"]
    np.testing.assert_allclose(r.scalars, w.scalars, rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(r.scalars) >= 2
    np.testing.assert_allclose(r.losses, w.losses, rtol=1e-5)
    for n, p in reused.params.items():
        torch.testing.assert_close(p, whole.params[n], rtol=1e-5, atol=1e-5)
    steps, p = len(batches), 3
    assert (w.calls.full, w.calls.block1, w.calls.block2) == (2 * p * steps, 0, 0)
    assert (r.calls.full, r.calls.block1, r.calls.block2) == (0, steps, 2 * p * steps)
    # The cost: block 0 runs once per step instead of 2·P times; block 1 runs 2·P times in both.
    assert blocks_w == [2 * p * steps, 2 * p * steps]
    assert blocks_r == [steps, 2 * p * steps]


@pytest.mark.integration
def test_model_calls_are_reported_by_kind_and_recorded_per_client(tmp_path):
    from common.records import RunRecorder
    from common.zeroorder import ModelCalls

    calls = ModelCalls(full=4, block1=2, block2=12)
    assert calls.metrics() == {"forward-passes": 18, "full-passes": 4, "block1-passes": 2, "block2-passes": 12}
    rec = RunRecorder(str(tmp_path), "run", {"method": "fedkseed"})
    rec.begin_round(1)
    other = {k: 2 * v for k, v in calls.metrics().items()}
    rec.add_replies(100, [{"train-seconds": 1.0, **calls.metrics()}, {"train-seconds": 3.0, **other}], 0, 0)
    row = rec.end_round(1, None)
    assert row["client_train_seconds"] == 2.0
    assert (row["client_forward_passes"], row["client_full_passes"]) == (27, 6)
    assert (row["client_block1_passes"], row["client_block2_passes"]) == (3, 18)
