"""The adaptive attacks of bench/adaptive.py: what each sends (the mathematics), that every one of them passes
every check of every method's server (so the benchmark measures the defence, not a rejected reply), and the
page's verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from bench import adaptive, adaptive_page
from bench.robust import flat_weights
from common.config import parse_run_config
from common.methods import METHODS
from common.nodestore import STATE_DIR_ENV
from common.records import RunRecorder
from harness.fakes import NodeList
from server_app.app import build_setup


@pytest.mark.unit
def test_alie_z_is_the_papers_z_max_and_at_least_one():
    assert adaptive.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-5)
    assert adaptive.normal_quantile(0.5) == pytest.approx(0.0, abs=1e-9)
    # Baruch et al.: n = 50, f = 12: s = 26 - 12 = 14, z = Phi^-1(36/50) = 0.583 -> at least 1
    assert adaptive.alie_z(50, 12) == 1.0
    assert adaptive.alie_z(10, 1) == 1.0  # z_max = Phi^-1(0.5) = 0 would send the mean


@pytest.mark.unit
def test_each_attack_sends_what_its_docstring_says():
    rng = np.random.default_rng(0)
    honest = [rng.normal(size=50) * s for s in (1.0, 2.0, 3.0, 4.0, 5.0)]
    own = honest[-1]
    norms = sorted(float(np.linalg.norm(u)) for u in honest)
    # two attackers in place of the last two: the server's lower median of the three honest norms left and two
    # above every honest one is the largest of the three
    median = max(float(np.linalg.norm(u)) for u in honest[:3])
    limit = 0.999 * 2.0 * median
    ipm, lying = adaptive.adapt("IPM", honest, own, 2, 2.0)
    mu = np.mean(honest, axis=0)
    assert not lying and np.linalg.norm(ipm) == pytest.approx(limit)
    assert np.dot(ipm, mu) / (np.linalg.norm(ipm) * np.linalg.norm(mu)) == pytest.approx(-1.0)
    flip, lying = adaptive.adapt("flip + lying count", honest, own, 2, 2.0)
    assert lying and np.linalg.norm(flip) == pytest.approx(limit)
    assert np.dot(flip, own) / (np.linalg.norm(flip) * np.linalg.norm(own)) == pytest.approx(-1.0)
    alie, _ = adaptive.adapt("ALIE", honest, own, 2, 0.0)  # no cap: exactly mu - z sigma
    np.testing.assert_allclose(alie, mu - adaptive.alie_z(5, 2) * np.std(honest, axis=0))
    bias, _ = adaptive.adapt("bias", honest, own, 2, 2.0)
    assert np.linalg.norm(bias - own) == pytest.approx(adaptive.BIAS * norms[2])
    bound, lying = adaptive.adapt("bound + 1e12", honest, own, 2, 2.0)
    assert lying and np.all(np.sign(bound) == np.where(own >= 0, 1, -1))
    with pytest.raises(ValueError, match="unknown attack 'nope'; choose one of: ALIE"):
        adaptive.adapt("nope", honest, own, 2, 2.0)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))


def _cfg(method, model, glue_dir, tmp_path):
    return parse_run_config(
        {
            "method": method, "model": model, "task": "rte", "data-dir": glue_dir,
            "results-dir": str(tmp_path / "results"), "run-name": f"adaptive-{method}", "train.local-steps": 2,
            "train.batch-size": 4, "train.max-length": 32, "train.lr": 1e-2, "krso.k": 2, "krso.rank": 4,
            "krso.intervals": 2, "zo.lr": 1e-2, "zo.eps": 1e-2, "spzo.split-layer": 1, "spzo.p1": 1, "spzo.p2": 2,
            "kseed.k": 64, "tt.bottleneck": 8, "tt.rank": 3, "min-clients": 1,
        }
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.usefixtures("state_dir", "task_identity")
@pytest.mark.parametrize("method", METHODS)
def test_every_adaptive_attack_passes_every_check_of_the_server(method, tiny_bert, glue_dir, tmp_path):
    """Each attack of bench/adaptive.py, from one hostile node of three, is accepted by the method's real
    strategy at its defaults (nothing rejected, the model finite and moved): the benchmark's ratios measure the
    aggregation, not a wire check."""
    cfg = _cfg(method, tiny_bert, glue_dir, tmp_path)

    def setup():
        recorder = RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat())
        return recorder, build_setup(cfg, recorder)

    _, honest_setup = setup()
    msgs, contents = adaptive.train_round(cfg, honest_setup, 1, 3, 0)
    for attack in adaptive_page.ATTACKS:
        recorder, s = setup()
        w0 = flat_weights(cfg, s)
        new = {
            m.metadata.dst_node_id: m for m in s.strategy.configure_train(1, None, ConfigRecord(), NodeList([1, 2, 3]))
        }
        s.strategy.aggregate_train(1, adaptive.attacked(cfg, s, new, contents, attack, 1, 3))
        row = recorder.end_round(1, None)
        assert (row["rejected"], row["failures"], row["clients"]) == (0, 0, 3), (attack, row)
        w1 = flat_weights(cfg, s)
        assert torch.isfinite(w1).all() and not torch.equal(w0, w1), attack


def _record(method, attack, f, n, ratio, rule=None, rounds=1, **extra):
    return {
        "method": method, "attack": attack, "hostile": f, "clients": n, "rounds": rounds, "seed": 0,
        "rule": rule or adaptive_page.shipped_rule(method, n), "settings": {"local_steps": 8, "max_length": 64},
        "ratio": ratio, "deviation": 0.5, "finite": True, **extra,
    }  # fmt: skip


@pytest.mark.unit
def test_the_adaptive_section_judges_the_worst_attack_against_the_issues_aims():
    records = (
        [
            _record("fedspzo", a, 3, 10, r)
            for a, r in zip(adaptive_page.ATTACKS, (1.2, 1.9, 1.1, 1.0, 0.9, 1.3), strict=True)
        ]
        + [_record("fedspzo", a, 1, 3, 1.6) for a in adaptive_page.ATTACKS]
        + [
            _record("fedspzo", "IPM", 1, 3, 9.0, rule="geometric-median"),
            _record("fedspzo", None, 0, 10, None, rounds=10, accuracy=0.80, loss=0.5),
            _record("fedspzo", "IPM", 1, 10, None, rounds=10, accuracy=0.785, loss=0.6),
        ]
    )
    page = "\n".join(adaptive_page.section(records))
    shipped = adaptive_page.shipped_rule("fedspzo", 10)
    row3 = next(r for r in page.splitlines() if r.startswith(f"| FedSPZO | 3 of 10 | {shipped} |"))
    assert "1.90x (0.50)" in row3 and row3.endswith("| <= 2.0x | met, 0.100x to spare |")
    row1 = next(
        r
        for r in page.splitlines()
        if r.startswith(f"| FedSPZO | 1 of 3 | {adaptive_page.shipped_rule('fedspzo', 3)} |")
    )
    assert "not met" in row1 and "<= 1.5x" in row1
    assert "The same under `geometric-median`" in page and "9.00x" in page  # the other rule's table, apart
    many = next(r for r in page.splitlines() if r.startswith("| FedSPZO | IPM | 10 |"))
    assert "| +1.50 |" in many and "not met" in many
    assert adaptive_page.section([]) == []
