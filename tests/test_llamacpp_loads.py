"""Every llama.cpp model load goes through edgemoe.util.llamacpp, which decides the extra buffer
types (repacking, AMX) from a probe run in a child process; the probe never crashes its caller."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgemoe.util import extra_bufts
from edgemoe.util.extra_bufts import ENV_VAR, probe

REPO = Path(__file__).resolve().parent.parent
# The one place that may build model parameters or load a llama.cpp model, and its probe.
ALLOWED = {REPO / "edgemoe" / "util" / "llamacpp.py", REPO / "edgemoe" / "util" / "extra_bufts_probe.py"}
# Names through which llama-cpp-python loads weights or sets their buffer types.
LOADERS = {"Llama", "llama_model_default_params", "llama_model_params", "llama_model_load_from_file",
           "llama_load_model_from_file"}
SETTINGS = {"use_extra_bufts"}  # reading what a load was given is fine; setting it is not


def loads_outside(source: str) -> list[str]:
    """The loader names a Python source refers to (attributes, names, imports), as `line: name`."""
    found = []
    for node in sorted(ast.walk(ast.parse(source)), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr in SETTINGS:
            found.append(f"{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr in LOADERS:
            found.append(f"{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Name) and node.id in LOADERS:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{node.lineno}: {a.name}" for a in node.names if a.name in LOADERS]
    return found


def test_the_checker_finds_each_way_of_loading() -> None:
    assert loads_outside("import llama_cpp\nm = llama_cpp.Llama(model_path='x')") == ["2: Llama"]
    assert loads_outside("from llama_cpp import Llama\n") == ["1: Llama"]
    assert loads_outside("p = llama_cpp.llama_model_default_params()\np.use_extra_bufts = True") == [
        "1: llama_model_default_params", "2: use_extra_bufts"]
    assert loads_outside("m = llama_cpp.llama_model_load_from_file(b'x', p)") == ["1: llama_model_load_from_file"]
    assert loads_outside("# Llama( in a comment\ns = 'llama_model_default_params'") == []
    assert loads_outside("used = bool(mp.use_extra_bufts)") == []


def test_no_llama_cpp_load_outside_the_one_place() -> None:
    offenders = []
    for top in ("edgemoe", "tools", "tests", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path in ALLOWED or path == Path(__file__).resolve():
                continue
            offenders += [f"{path.relative_to(REPO)}:{hit}" for hit in loads_outside(path.read_text())]
    assert not offenders, "load llama.cpp models through edgemoe.util.llamacpp.model_params/load_model:\n" + \
        "\n".join(offenders)


def test_a_child_killed_by_sigill_means_unusable_not_a_crash() -> None:
    r = probe([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert not r.usable
    assert "SIGILL" in r.reason


def test_a_child_that_fails_or_hangs_means_unusable() -> None:
    r = probe([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert not r.usable and "status 3" in r.reason and "boom" in r.reason
    r = probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=1.0)
    assert not r.usable and "did not finish" in r.reason


def test_the_real_probe_on_this_machine() -> None:
    r = probe()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "amx_tile" not in flags:
        # Without AMX, llama.cpp's repacking runs on any CPU it was built for.
        assert r.usable, r.reason
    else:
        assert r.usable or r.reason, "an unusable verdict names its cause"


def _params_in_child(env_value: str | None, call: str) -> str:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if env_value is not None:
        env[ENV_VAR] = env_value
    code = f"from edgemoe.util.llamacpp import model_params; print(model_params({call}).use_extra_bufts)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_model_params_follow_the_verdict() -> None:
    assert _params_in_child("0", "") == "False"
    assert _params_in_child("0", "extra_bufts=True") == "False"  # asked for, not granted
    assert _params_in_child("1", "") == "True"
    assert _params_in_child("1", "extra_bufts=False") == "False"
    assert _params_in_child("1", "vocab_only=True") == "False"
    # unset: probed in that process, with the same verdict as here
    assert _params_in_child(None, "") == str(probe().usable)


def test_the_verdict_is_probed_once_and_exported(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(extra_bufts, "_result", None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(extra_bufts, "probe", lambda: calls.append(1) or extra_bufts.ProbeResult(False, "killed by SIGILL"))
    assert extra_bufts.extra_bufts_usable() is False
    assert extra_bufts.extra_bufts_usable() is False
    assert calls == [1]
    assert os.environ[ENV_VAR] == "0"  # child processes inherit the verdict


def _bench_engine(model: Path, reference: Path, verdict: str, repack: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{ENV_VAR: verdict})
    args = ["bench", "engine", str(model), "--reference", str(reference), "--repack", repack, "-t", "1",
            "--prompt-tokens", "8", "--n-predict", "4", "--repeat", "1", "--json"]
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_bench_engine_says_when_repacking_is_unavailable(converted_models: dict, fixtures_dir: Path) -> None:
    import json

    name = "llama-moe-q4_k_m"
    model, ref = converted_models[name], fixtures_dir / f"{name}.gguf"
    off = _bench_engine(model, ref, "0", "auto")
    assert off.returncode == 0, off.stderr
    assert "note: llama.cpp's weight repacking is unavailable on this machine" in off.stderr
    assert ENV_VAR in off.stderr  # the reason
    r = json.loads(off.stdout.strip().splitlines()[-1])
    assert r["reference_repack"] is False and r["repack"] is False
    assert r["tokens_match"] is True  # without repacking both sides run the same kernels

    on = _bench_engine(model, ref, "0", "on")  # asked for where it cannot run: an error, not a crash
    assert on.returncode == 2
    assert on.stderr.strip().startswith("error: --repack on") and ENV_VAR in on.stderr
    assert "Traceback" not in on.stderr

    if not extra_bufts.extra_bufts_usable():
        return  # forcing repacking on where it cannot run would be the crash this module prevents
    auto = _bench_engine(model, ref, "1", "auto")
    assert auto.returncode == 0, auto.stderr
    r = json.loads(auto.stdout.strip().splitlines()[-1])
    assert r["reference_repack"] is True and r["repack"] is True and r["reference_repack_note"] == ""
    assert "unavailable" not in auto.stderr
