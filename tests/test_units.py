"""The systemd units in devices/systemd start edgemoe with flags it accepts (no systemd needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgemoe.cli.main import build_parser

UNITS = sorted((Path(__file__).resolve().parent.parent / "devices" / "systemd").glob("*.service"))
SAMPLE = {"EDGEMOE_CONNECT": "tcp://10.0.0.1:5555", "EDGEMOE_MODEL": "/srv/edgemoe/models/m",
          "EDGEMOE_PROFILE": "/opt/edgemoe/profiles/raspberry-pi-4-1gb.toml", "EDGEMOE_ARGS": "--log-level WARNING"}


def exec_start(unit: Path) -> list[str]:
    """ExecStart's argv after systemd's substitutions: ${VAR} one word, $VAR split on spaces, %i/%H names."""
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    words = []
    for w in shlex.split(line.removeprefix("ExecStart=")):
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            words += SAMPLE[m[1]].split()
            continue
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: SAMPLE[m[1]], w).replace("%i", "pi-01").replace("%H", "host"))
    return words


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} >= {"edgemoe-worker@.service", "edgemoe-shadow.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_runs_edgemoe_with_accepted_flags(unit: Path) -> None:
    argv = exec_start(unit)
    assert argv[0] == "/opt/edgemoe/.venv/bin/edgemoe"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on any flag edgemoe does not know
    assert args.connect == SAMPLE["EDGEMOE_CONNECT"] and args.model == SAMPLE["EDGEMOE_MODEL"]
    assert args.log_level == "WARNING" and args.name in ("pi-01", "host-shadow")
    text = unit.read_text()
    assert "RestartPreventExitStatus=2" in text and "DynamicUser=yes" in text
