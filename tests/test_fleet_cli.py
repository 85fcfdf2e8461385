"""The flwr CLI answers both fleets read (scripts/fleet.py helpers, shared with scripts/compose_fleet.py)."""

from __future__ import annotations

import subprocess

import pytest

from scripts.fleet import FleetError, registered_ids, superlink_answers, supernode_statuses, write_cli_config

pytestmark = pytest.mark.unit


def answer(stdout: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["flwr"], 0, stdout, "")


def test_superlink_answers_only_on_a_json_object_without_failure():
    assert superlink_answers(answer('{"success": true, "runs": []}'))
    assert superlink_answers(answer('{"runs": []}'))
    # `flwr ls` exits 0 when the SuperLink cannot be reached: the JSON says so, or there is no JSON at all
    assert not superlink_answers(answer('{"success": false, "error-message": "unreachable"}'))
    assert not superlink_answers(answer("Connection refused"))
    assert not superlink_answers(answer("[]"))


def test_registered_ids_in_key_order_and_all_of_them():
    out = "SuperNode 41 registered\nnoise\nSuperNode 7 registered\n"
    assert registered_ids(out, 2) == [41, 7]
    with pytest.raises(FleetError, match="expected 3 registrations"):
        registered_ids(out, 3)


def test_supernode_statuses_parse_and_refuse_garbage():
    res = answer('{"nodes": [{"node-id": 3, "status": "online"}, {"node-id": "9", "status": "offline"}]}')
    assert supernode_statuses(res) == {3: "online", 9: "offline"}
    for bad in ("", "{}", '{"nodes": [{"status": "online"}]}', '{"nodes": 5}'):
        with pytest.raises(FleetError, match="flwr supernode list"):
            supernode_statuses(answer(bad))


def test_cli_config_names_the_superlink_and_its_trust(tmp_path):
    write_cli_config(str(tmp_path / "a"), "10.0.0.1:9093", "/certs/ca.crt")
    text = (tmp_path / "a" / "config.toml").read_text()
    assert 'address = "10.0.0.1:9093"' in text and 'root-certificates = "/certs/ca.crt"' in text
    assert "insecure" not in text
    write_cli_config(str(tmp_path / "b"), "127.0.0.1:9093", None)
    text = (tmp_path / "b" / "config.toml").read_text()
    assert "insecure = true" in text and "root-certificates" not in text
    import tomllib

    assert tomllib.loads(text)["superlink"]["default"] == "fleet"
