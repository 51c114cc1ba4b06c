"""Shared fixtures: the generated test models (built once by `make fixtures`, or here if missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GGML_NO_BACKTRACE", "1")

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
