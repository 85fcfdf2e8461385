"""docs/scale.md and its plots from bench/records/scale.json (bench/scale.py measures; this module only reads
the record): each figure against its aim, the plots, and how to read them.

    python -m bench.scale --report      # this page from the records, nothing run
"""

from __future__ import annotations

import os

AIMS = {"state": 2.0, "catchup": 1.2, "memory": 2.0, "per_reply_bytes": 64, "nodes": 200}


def mb(x: float) -> str:
    """MB to print: two decimals below 10 MB (the log methods' rounds are fractions of a MB)."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def per_reply_kb(p: dict) -> float:
    """What the peak grows by per reply between the first and the last point, in KB."""
    return (p["mb"][-1] - p["mb"][0]) * 1024 / max(1, p["replies"][-1] - p["replies"][0])


def verdicts(rec: dict) -> list[tuple[str, str, str, str]]:
    """(criterion, measured, aim, verdict) for each aim of the growth benchmark."""
    rows = []
    growth = {m: max(b) / b[0] for m, b in rec["state_write_bytes"].items() if b}
    over = [m for m, g in growth.items() if g > AIMS["state"]]
    rounds = rec["setting"]["rounds"]
    rows.append((
        f"state write per round over {rounds} rounds, within 2x of round 1 (every method)",
        ", ".join(f"{m} {g:.2f}x" for m, g in growth.items()),
        f"<= {AIMS['state']}x",
        "met" if growth and not over else f"not met ({', '.join(over)})",
    ))  # fmt: skip
    ref = rec["fedavg_download_bytes"] or float("nan")
    far = {m: (c["rounds_behind"][-1], c["bytes"][-1] / ref) for m, c in rec["catchup_bytes"].items() if c["bytes"]}
    bad = [m for m, (_, x) in far.items() if x > AIMS["catchup"]]
    rows.append((
        f"a node {max((k for k, _ in far.values()), default=0)} rounds behind receives <= 1.2 FedAvg downloads",
        ", ".join(f"{m} {x:.2f}x" for m, (_, x) in far.items()),
        f"<= {AIMS['catchup']}x of {ref / 2**20:.2f} MB",
        "met" if not bad else f"not met ({', '.join(bad)})",
    ))  # fmt: skip
    mean = rec.get("mean_peak_mb", {}).get("streaming", {})
    if mean.get("mb"):
        g = max(mean["mb"]) / mean["mb"][0]
        rows.append((
            f"server memory of the weighted mean, {mean['replies'][0]} to {mean['replies'][-1]} replies "
            "(common.robust alone)",
            f"{mean['mb'][0]:.1f} -> {max(mean['mb']):.1f} MB ({g:.2f}x)",
            f"<= {AIMS['memory']}x",
            "met" if g <= AIMS["memory"] else "not met",
        ))  # fmt: skip
    for m, p in rec["server_peak_mb"].items():
        if len(p["mb"]) > 1:
            g = max(p["mb"]) / p["mb"][0]
            rows.append((
                f"server memory of {m}'s aggregate_train under the {p.get('rule', 'shipped rule')}, "
                f"{p['replies'][0]} to {p['replies'][-1]} replies"
                + (" (round 2: nodes the server knows)" if p.get("first_round_mb") else ""),
                f"{mb(p['mb'][0])} -> {mb(max(p['mb']))} MB ({g:.1f}x; {per_reply_kb(p):+.2f} KB a reply"
                + (f", of {p['messages_mb'][0] * 1024 / p['replies'][0]:,.1f} KB on the wire)" if p.get("messages_mb") else ")"),
                f"<= {AIMS['memory']}x",
                "met" if g <= AIMS["memory"] else "not met",
            ))  # fmt: skip
    grows = {m: per_reply_kb(p) * 1024 for m, p in rec["server_peak_mb"].items() if len(p["mb"]) > 1}
    if grows:
        top = max(p["replies"][-1] for p in rec["server_peak_mb"].values())
        rows.append((
            f"what aggregate_train keeps per reply under the mean, 10 to {top} replies (every method): a few numbers, "
            "none of a reply's arrays (server_app.round.Accepted, the capped weights, the norms)",
            ", ".join(f"{m} {b:.0f} B" for m, b in grows.items()),
            f"<= {AIMS['per_reply_bytes']} B a reply",
            "met" if max(grows.values()) <= AIMS["per_reply_bytes"] else "not met",
        ))  # fmt: skip
    rows.append(reads_verdict(rec))
    sim = rec.get("simulation")
    rows.append((
        "a simulation of at least 200 nodes completes through `flwr run`",
        f"{sim['nodes']} nodes: {sim['status']}" if sim else "not run",
        f">= {AIMS['nodes']} nodes, finished:completed",
        "met" if sim and sim["nodes"] >= AIMS["nodes"] and sim["status"] == "finished:completed" else "not met",
    ))  # fmt: skip
    return rows


def read_series(rec: dict) -> list[tuple[str, dict]]:
    """(method, its server-memory series) of every method and rule measured, the robust rule's last."""
    return [*rec["server_peak_mb"].items(), *rec.get("server_peak_mb_robust", {}).items()]


def times(lo_hi: list[int]) -> str:
    return f"{lo_hi[0]}" if lo_hi[0] == lo_hi[1] else f"{lo_hi[0]}-{lo_hi[1]}"


def reads_verdict(rec: dict) -> tuple[str, str, str, str]:
    """Each reply's metrics validated once, its update decoded once when checked and once per aggregation pass
    (harness.readcount), in both rounds of every point of every method and rule."""
    from harness.readcount import read_once

    measured, bad = [], []
    for m, p in read_series(rec):
        reads = p.get("reads") or []
        if not reads:
            bad.append(f"{m} ({p.get('rule')}) not counted")
            continue
        both = [*reads, *p.get("first_round_reads", [])]
        passes = sorted({r["passes"] for r in both})
        metrics = [min(r["metrics"][0] for r in both), max(r["metrics"][1] for r in both)]
        decoded = [min(r["decoded"][0] for r in both), max(r["decoded"][1] for r in both)]
        measured.append(
            f"{m} ({p['rule']}, {p['replies'][0]}-{p['replies'][-1]}): metrics {times(metrics)}, "
            f"arrays {times(decoded)} in {'/'.join(map(str, passes))} pass(es)"
        )
        wrong = [n for n, r in zip(p["replies"] * 2, both, strict=True) if not read_once(r)]
        if wrong:
            bad.append(f"{m} ({p['rule']}) at {sorted(set(wrong))}")
    return (
        "each reply's metrics validated once, its arrays decoded once per aggregation pass (every method, every n; "
        "rounds 1 and 2)",
        "; ".join(measured) or "not counted",
        "metrics 1; arrays 1 (its check) + 1 per pass",
        "met" if measured and not bad else f"not met ({', '.join(bad)})",
    )


def plots(rec: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        names.append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, b in rec["state_write_bytes"].items():
        ax.plot(range(1, len(b) + 1), [x / 1024 for x in b], label=m)
    ax.set(xlabel="round", ylabel="server state written (KB)", yscale="log", title="State written per round")
    ax.legend()
    save(fig, "scale-state.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, c in rec["catchup_bytes"].items():
        ax.plot(c["rounds_behind"], [x / 2**20 for x in c["bytes"]], marker="o", label=m)
    ref = (rec["fedavg_download_bytes"] or float("nan")) / 2**20
    ax.axhline(ref, color="k", ls="--", lw=1, label="one FedAvg download")
    ax.axhline(AIMS["catchup"] * ref, color="r", ls=":", lw=1, label="aim: 1.2 FedAvg downloads")
    ax.set(xlabel="rounds behind", ylabel="instruction (MB)", xscale="log", yscale="log", title="Catch-up")
    ax.legend(fontsize=8)
    save(fig, "scale-catchup.png")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for m, p in rec["server_peak_mb"].items():
        ax.plot(p["replies"], p["mb"], marker="o", label=f"{m} aggregate_train ({p.get('rule', 'shipped rule')})")
    for m, p in rec.get("server_peak_mb_robust", {}).items():
        ax.plot(p["replies"], p["mb"], marker="^", ls=":", label=f"{m} aggregate_train ({p['rule']})")
    for kind, p in rec.get("mean_peak_mb", {}).items():
        if isinstance(p, dict) and p.get("mb"):
            ax.plot(p["replies"], p["mb"], marker="s", ls="--", label=f"mean alone, {kind.replace('_', ' ')}")
    ax.set(xlabel="replies", ylabel="peak MB (tracemalloc)", xscale="log", yscale="log", title="Server memory")
    ax.legend(fontsize=7)
    for m, s in rec["aggregate_seconds"].items():
        bx.plot(s["replies"], s["seconds"], marker="o", label=m)
    bx.set(xlabel="replies", ylabel="aggregate_train (s)", xscale="log", yscale="log", title="Aggregation time")
    bx.legend(fontsize=8)
    save(fig, "scale-server.png")
    return names


def write_page(rec: dict, out: str) -> str:
    s = rec["setting"]
    minutes = "unfinished run" if s["minutes"] is None else f"{s['minutes']:.1f} min"
    rows = verdicts(rec)
    names = plots(rec, os.path.dirname(os.path.abspath(out)))
    kb = lambda b: f"{b / 1024:,.1f} KB"  # noqa: E731
    lines = [
        "# Costs that grow with the run: state, catch-up, server memory, number of nodes",
        "",
        f"Produced by `{s['command'].strip()}` on {s['date']} ({s['machine']}, {minutes}), records in "
        "`bench/records/scale.json`; this page and its plots by `python -m bench.scale --report`, which runs "
        f"nothing. Model: {s['model']}. What is measured and how: the docstring of `bench/scale.py`.",
        "",
        "## Aims",
        "",
        "| criterion | measured | aim | verdict |",
        "| --- | --- | --- | --- |",
        *[f"| {c} | {m} | {a} | {v} |" for c, m, a, v in rows],
        "",
        "## State written per round",
        "",
        "| method | round 1 | round 10 | last round | largest / round 1 | write seconds (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, b in rec["state_write_bytes"].items():
        secs = sorted(rec["state_write_seconds"][m])
        lines.append(
            f"| {m} | {kb(b[0])} | {kb(b[min(9, len(b) - 1)])} | {kb(b[-1])} | {max(b) / b[0]:.2f}x | "
            f"{secs[len(secs) // 2]:.4f} |"
        )
    ref = rec["fedavg_download_bytes"] or float("nan")
    lines += [
        "",
        "## Catch-up of a node k rounds behind",
        "",
        f"One FedAvg download of the same model: {ref / 2**20:.2f} MB. A node k rounds behind holds round t-1-k "
        "when it is sent round t's instruction and lacks the updates of rounds t-k..t-1 (k = 1: it trained in "
        "round t-1, the usual case). Replay seconds: a fresh node that joins at round k+1 and replays k rounds, "
        "its time less its training, less the same for the up-to-date node of that round.",
        "",
        "| method | k | instruction | / FedAvg download | replay seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m, c in rec["catchup_bytes"].items():
        secs = dict(zip(*rec["catchup_seconds"][m].values(), strict=True))
        for k, b in zip(c["rounds_behind"], c["bytes"], strict=True):
            if k in (1, 10, 100) or k == c["rounds_behind"][-1]:
                r = secs.get(k)
                lines.append(f"| {m} | {k} | {kb(b)} | {b / ref:.3f} | {'-' if r is None else f'{r:.2f}'} |")
    lines += [
        "",
        "## Server memory and aggregation time against the number of replies",
        "",
        "Peak MB: what `aggregate_train` allocates (tracemalloc, after gc.collect()) in round 2, whose n replies "
        "come from the nodes of round 1; round 1: the same for nodes the server has not seen, which the log "
        "methods add to their map of the rounds nodes hold (the fleet's state, once per node). Reply Messages: "
        "the list of replies Flower hands the strategy and holds through the round, n x one reply's wire size, "
        "whatever the strategy does. Seconds: round 2, untraced. Metrics validated and arrays decoded a reply: "
        "round 2, counted on a third fresh strategy (harness/readcount.py: common.wire.checked_metrics wherever it "
        "is bound, the strategy's read_update), the fewest-most over the n replies, and the aggregation's passes "
        "over them (server_app.round.Replies): once when the reply is checked, once per pass.",
        "",
        "| method | rule | replies | peak MB | round 1 peak MB | reply Messages MB | seconds | metrics validated "
        "a reply | arrays decoded a reply (passes) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    series = [(m, p, rec["aggregate_seconds"][m]["seconds"]) for m, p in rec["server_peak_mb"].items()]
    series += [(m, p, p["seconds"]) for m, p in rec.get("server_peak_mb_robust", {}).items()]
    for m, p, secs in series:
        rule = p.get("rule", "shipped")
        held = p.get("messages_mb") or [None] * len(p["mb"])
        first = p.get("first_round_mb") or [None] * len(p["mb"])
        reads = p.get("reads") or [None] * len(p["mb"])
        for n, peak, one, msgs, sec, r in zip(p["replies"], p["mb"], first, held, secs, reads, strict=True):
            counted = "- | -" if r is None else f"{times(r['metrics'])} | {times(r['decoded'])} ({r['passes']})"
            lines.append(
                f"| {m} | {rule} | {n} | {mb(peak)} | {'-' if one is None else mb(one)} | "
                f"{'-' if msgs is None else mb(msgs)} | {sec:.2f} | {counted} |"
            )
        if p.get("left_out"):
            left = ", ".join(map(str, p["left_out"]))
            lines.append(f"| {m} | {rule} | {left} | left out: over the memory limit | | | | | |")
    nodes = {
        m: (p["first_round_mb"][-1] - p["mb"][-1]) * 2**20 / p["replies"][-1]
        for m, p in rec["server_peak_mb"].items()
        if p.get("first_round_mb") and p["replies"]
    }
    if nodes:
        lines += [
            "",
            "Round 1 less round 2 at the most replies, per reply (a new node's entry in the fleet's state, and what "
            "else a first round allocates): " + ", ".join(f"{m} {b:+.0f} bytes" for m, b in nodes.items()) + ".",
        ]
    mean = rec.get("mean_peak_mb", {})
    if mean:
        lines += [
            "",
            f"common.robust's mean alone on FedAvg replies ({mean['reply_mb']:.2f} MB each), norm-cap 2: "
            "streaming " + ", ".join(
                f"{n}: {mb:.1f} MB" for n, mb in zip(mean["streaming"]["replies"], mean["streaming"]["mb"], strict=True)
            ) + "; in memory (the replies held plus what the aggregation allocates) " + ", ".join(
                f"{n}: {mb:.1f} MB" for n, mb in zip(mean["in_memory"]["replies"], mean["in_memory"]["mb"], strict=True)
            ) + ".",
        ]  # fmt: skip
    sim = rec.get("simulation")
    lines += ["", "## Simulation through `flwr run`", ""]
    if sim and "wall_seconds" not in sim:
        lines.append(f"{sim['nodes']} nodes: {sim['status']}")
    elif sim:
        lines += [
            f"{sim['method']}, {sim['nodes']} simulated SuperNodes, fraction-train {sim['fraction_train']:.3f} "
            f"({sim['clients_per_round']} replies a round), {sim['rounds']} rounds: {sim['status']} in "
            f"{sim['wall_seconds']:.0f} s in all; seconds per round {[round(x, 1) for x in sim['round_seconds']]}, "
            f"of which the slowest client trained {[None if x is None else round(x, 2) for x in sim['slowest_client_train_seconds']]}; "
            f"peak summed RSS of the run's processes {sim['runner_peak_rss_mb']:.0f} MB.",
        ]  # fmt: skip
    else:
        lines.append("Not run (`--nodes 0`).")
    lines += ["", *[f"![{n}]({n})" for n in names], "", NOTES, ""]
    page = "\n".join(lines)
    with open(out, "w") as f:
        f.write(page)
    return page


NOTES = """## Reading the figures

- The tiny model is 1.0 M numbers, 0.97 M of them the token embeddings that only FedAvg sends; the per-round
  log entries of the log methods are therefore tiny against one FedAvg download here. With all-MiniLM-L6-v2
  a FedKRSO entry is 2.6 MB at the defaults against an 86 MB FedAvg download; a node far behind gets the
  snapshot of the tensors it keeps instead of the log once the log is larger (common/catchup.py,
  docs/checkpoints.md "Catch-up"): 42.5 MB for FedKRSO on MiniLM, however far behind.
- Server memory under the weighted mean: the mean streams (common.robust.WeightedMean: one reply at a time,
  8 bytes per aggregated number), and the strategies read their replies lazily (server_app/round.py
  `Replies`): a first pass checks every reply, then the aggregation decodes each reply's arrays again from its
  Message when it reads them. A round holds one decoded reply at a time, not n: FedAvg's round, whose replies
  are 3.86 MB, is flat. Each reply is checked once (its size, its metrics, its arrays decoded and bounded) and
  the round keeps what the check found (server_app/round.py `Accepted`: position, example count, loss, 20
  bytes a reply in plain arrays; its node is its Message's), then the capped weights and the update norms as
  float64 arrays (8 bytes each, medians by np.partition, whose copy of the norms lives while the median is
  taken); only the arrays are decoded again, once per aggregation pass (counted above for every method and n,
  harness/readcount.py; tests/test_reply_reads.py fails for a strategy that validates a reply twice). These
  few numbers are what a round holds per reply beyond Flower's own list of reply Messages
  (tests/test_lazy_replies.py: under 64 bytes a reply, against KBs to MBs of arrays); the per-reply row of the
  aims above measures them for every method. Until 0c71c35 (2026-12-04) the weights were read again from the
  Messages and the median norm selected in several passes, which kept ~8 bytes a reply (FedSPZO 0.01 -> 0.02
  MB in the records of 2026-12-02); issue 33 asked for the plain record instead.
- The 2x ratio from 10 to 1000 replies reads the size of a strategy's whole round as much as its growth: on the
  tiny model FedSPZO's aggregate_train allocates ~13 KB at 10 replies (its scalars are 0.5 KB a reply), so 990
  more replies at even the 24 bytes of issue 33's per-reply numbers (count, loss, norm) are 23 KB, above that
  base, and no round that keeps them stays within 2x there, while FedAvg's, whose base is its 26 MB running
  sum, is flat. The ratio rows keep the aim as it was set; the per-reply row is the aim on what grows.
- The log methods' map of which round each node holds (LogStrategy.node_round) grows by one entry per node the
  server has seen (35-37 bytes here, with the dict's growth), once, not per round: it is the fleet's state,
  which catch-up needs, and round 1's column shows it.
- Flower holds the list of reply Messages through the round whatever the strategy does (`reply Messages MB`
  above: n x one reply's wire size); that is the runtime's, not the aggregation's.
- The robust rules (trimmed-mean, median) need all n values of each coordinate: n x the update, plus one
  key's n values stacked while it is sorted (FedAvg under trimmed-mean above, which grows by more than one
  decoded reply per reply).
- State writes: the update-log segments are one round's entry each, and since checkpoint version 3 the
  checkpoint keeps each records file's row count and digest instead of its rows, so every method's write per
  round is flat (before, the copy of the records grew ~0.6 KB a round, ~1.1 KB for FedTT+).
- The 200-node simulation's first round includes starting Ray and the first ClientApp processes; the later
  rounds are the round's overhead: ~0.5 s for 10 replies of which the slowest client trained 0.03 s."""
