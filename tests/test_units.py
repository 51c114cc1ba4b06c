"""The systemd units in devices/systemd start edgemoe with flags it accepts (no systemd needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgemoe.cli.main import build_parser

UNITS = sorted((Path(__file__).resolve().parent.parent / "devices" / "systemd").glob("*.service"))
SAMPLE = {"EDGEMOE_CONNECT": "tcp://10.0.0.1:5555", "EDGEMOE_MODEL": "/srv/edgemoe/models/m",
          "EDGEMOE_PROFILE": "/opt/edgemoe/profiles/raspberry-pi-4-1gb.toml", "EDGEMOE_ARGS": "--log-level WARNING",
          "EDGEMOE_COORDINATOR_KEY": "/etc/edgemoe/coordinator.key",
          "EDGEMOE_BIND": "tcp://0.0.0.0:5555", "EDGEMOE_WORKERS": "8", "EDGEMOE_HOST": "0.0.0.0", "EDGEMOE_PORT": "8080"}
CREDENTIALS = "/run/credentials/unit"  # what systemd's %d becomes



def exec_start(unit: Path) -> list[str]:
    """ExecStart's argv after systemd's substitutions: ${VAR} one word, $VAR split on spaces, %i/%H names."""
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    words = []
    for w in shlex.split(line.removeprefix("ExecStart=")):
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            words += SAMPLE[m[1]].split()
            continue
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: SAMPLE[m[1]], w).replace("%i", "pi-01").replace("%H", "host")
                     .replace("%d", CREDENTIALS))
    return words


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} >= {"edgemoe-worker@.service", "edgemoe-shadow.service", "edgemoe-serve.service"}


DAEMONS = [u for u in UNITS if u.name != "edgemoe-serve.service"]


@pytest.mark.parametrize("unit", DAEMONS, ids=lambda u: u.name)
def test_unit_runs_edgemoe_with_accepted_flags(unit: Path) -> None:
    argv = exec_start(unit)
    assert argv[0] == "/opt/edgemoe/.venv/bin/edgemoe"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on any flag edgemoe does not know
    assert args.connect == SAMPLE["EDGEMOE_CONNECT"] and args.model == SAMPLE["EDGEMOE_MODEL"]
    assert args.log_level == "WARNING" and args.name in ("pi-01", "host-shadow")
    text = unit.read_text()
    assert "RestartPreventExitStatus=2" in text and "DynamicUser=yes" in text
    # authenticated links: the secret key comes through systemd's credentials, the coordinator's public key from /etc
    assert args.key == "/run/credentials/unit/edgemoe.key_secret" and args.coordinator_key == "/etc/edgemoe/coordinator.key"
    assert "LoadCredential=edgemoe.key_secret:/etc/edgemoe/keys/" in text


def test_install_worker_sets_keys_up(tmp_path: Path) -> None:
    """Staged (EDGEMOE_INSTALL_ROOT, no systemctl, no pip: this checkout's venv stands in for the board's)."""
    import os
    import stat
    import subprocess
    import sys

    from edgemoe.cluster.keys import KeyPair, load_allow_list, load_public, load_secret, write_keypair

    repo = Path(__file__).resolve().parent.parent
    root = tmp_path / "root"
    (root / "opt" / "edgemoe").mkdir(parents=True)
    (root / "opt" / "edgemoe" / ".venv").symlink_to(Path(sys.executable).parent.parent)
    coordinator = KeyPair.generate()
    public, _ = write_keypair(tmp_path, "coordinator", coordinator)
    env = {**os.environ, "EDGEMOE_INSTALL_ROOT": str(root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", str(repo / "devices" / "install-worker.sh"), "--no-pip", "--name", "pi-01", "--connect",
           "tcp://10.0.0.1:5555", "--model", "/srv/edgemoe/models/m", "--profile", "raspberry-pi-4-1gb",
           "--coordinator-key", str(public)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = root / "etc" / "edgemoe" / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    pair = load_secret(keys / "worker-pi-01.key_secret")
    assert load_public(str(root / "etc" / "edgemoe" / "coordinator.key")) == coordinator.public
    line = next(l for l in r.stdout.splitlines() if "--allow file:" in l).split("--allow file: ", 1)[1]
    (tmp_path / "allow").write_text(line + "\n")
    assert set(load_allow_list(tmp_path / "allow")) == {pair.public}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)  # idempotent: the key stays
    assert again.returncode == 0 and load_secret(keys / "worker-pi-01.key_secret") == pair


def test_serve_unit_runs_edgemoe_serve_with_accepted_flags() -> None:
    unit = next(u for u in UNITS if u.name == "edgemoe-serve.service")
    argv = exec_start(unit)
    assert argv[0] == "/opt/edgemoe/.venv/bin/edgemoe" and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on any flag edgemoe does not know
    assert args.model == SAMPLE["EDGEMOE_MODEL"] and args.bind == SAMPLE["EDGEMOE_BIND"] and args.wait_workers == 8
    assert (args.host, args.port) == ("0.0.0.0", 8080) and args.log_level == "WARNING"
    # the keys reach the throw-away user as a systemd credential, never as a world-readable file
    assert args.api_key_file == [CREDENTIALS + "/api-keys"]
    assert args.key == CREDENTIALS + "/coordinator.key_secret" and args.allow == "/etc/edgemoe/allowed-keys/"
    text = unit.read_text()
    assert "LoadCredential=api-keys:/etc/edgemoe/serve.keys" in text
    assert "LoadCredential=coordinator.key_secret:/etc/edgemoe/keys/coordinator.key_secret" in text
    assert "RestartPreventExitStatus=2" in text and "DynamicUser=yes" in text
