"""tools.fullsize: random-weight GGUFs with the exact shapes of OLMoE-1B-7B and Qwen3-30B-A3B.

The tests build scaled-down models (2 layers, 8 experts) with the full per-layer shapes
(hidden 2048, expert FFN 1024 / 768, all heads), ~190 MB each; the full-size models are
never generated here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemoe.errors import UserError
from edgemoe.oracle import LlamaCppReference
from edgemoe.util.extra_bufts import extra_bufts_usable
from tools.fullsize import MODELS, build_model, model_spec, plan
import tools.fullsize.generate as gen_mod
from tools.fullsize.__main__ import main as cli_main
from tools.testmodels.generate import tokenizer_kvs

REPO = Path(__file__).resolve().parent.parent
Q4_0 = gguf.GGMLQuantizationType.Q4_0
F32 = gguf.GGMLQuantizationType.F32
N_VOCAB = 49152  # SmolLM2's tokenizer

# (name, ggml shape) per layer, as the spec demands
OLMOE_LAYER = {
    "attn_norm.weight": (2048,),
    "attn_q.weight": (2048, 2048),
    "attn_k.weight": (2048, 2048),
    "attn_v.weight": (2048, 2048),
    "attn_q_norm.weight": (2048,),
    "attn_k_norm.weight": (2048,),
    "attn_output.weight": (2048, 2048),
    "ffn_norm.weight": (2048,),
    "ffn_gate_inp.weight": (2048, "E"),
    "ffn_gate_exps.weight": (2048, 1024, "E"),
    "ffn_up_exps.weight": (2048, 1024, "E"),
    "ffn_down_exps.weight": (1024, 2048, "E"),
}
QWEN3_LAYER = {
    "attn_norm.weight": (2048,),
    "attn_q.weight": (2048, 4096),
    "attn_k.weight": (2048, 512),
    "attn_v.weight": (2048, 512),
    "attn_q_norm.weight": (128,),
    "attn_k_norm.weight": (128,),
    "attn_output.weight": (4096, 2048),
    "ffn_norm.weight": (2048,),
    "ffn_gate_inp.weight": (2048, "E"),
    "ffn_gate_exps.weight": (2048, 768, "E"),
    "ffn_up_exps.weight": (2048, 768, "E"),
    "ffn_down_exps.weight": (768, 2048, "E"),
}
LAYERS = {"olmoe-1b-7b": OLMOE_LAYER, "qwen3-30b-a3b": QWEN3_LAYER}
# <arch>.* metadata of the full models
ARCH_KEYS = {
    "olmoe-1b-7b": {
        "olmoe.context_length": 4096,
        "olmoe.embedding_length": 2048,
        "olmoe.block_count": 16,
        "olmoe.feed_forward_length": 1024,
        "olmoe.attention.head_count": 16,
        "olmoe.attention.head_count_kv": 16,
        "olmoe.rope.dimension_count": 128,
        "olmoe.expert_count": 64,
        "olmoe.expert_used_count": 8,
    },
    "qwen3-30b-a3b": {
        "qwen3moe.context_length": 40960,
        "qwen3moe.embedding_length": 2048,
        "qwen3moe.block_count": 48,
        "qwen3moe.feed_forward_length": 6144,
        "qwen3moe.expert_feed_forward_length": 768,
        "qwen3moe.attention.head_count": 32,
        "qwen3moe.attention.head_count_kv": 4,
        "qwen3moe.attention.key_length": 128,
        "qwen3moe.attention.value_length": 128,
        "qwen3moe.rope.dimension_count": 128,
        "qwen3moe.expert_count": 128,
        "qwen3moe.expert_used_count": 8,
    },
}
SMALL = {"n_layer": 2, "n_expert": 8}

# run in a child process: generate, then report the child's peak RSS before and after
_CHILD = """
import json, sys
from tools.fullsize import build_model
from tools.testmodels.generate import tokenizer_kvs

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
tokenizer_kvs()
before = hwm()
path = build_model(sys.argv[1], "olmoe-1b-7b", n_layer=2, n_expert=8)
print(json.dumps({"path": str(path), "hwm_before": before, "hwm_after": hwm()}))
"""


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict:
    """Both scaled-down models, and the peak RSS of the OLMoE one's generation: that one is
    generated in a child process (which measures itself), at the same time as the Qwen3 one
    is generated here."""
    out = tmp_path_factory.mktemp("olmoe")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        qwen3 = build_model(tmp_path_factory.mktemp("qwen3"), "qwen3-30b-a3b", **SMALL)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    info = json.loads(stdout.strip().splitlines()[-1])
    return {"olmoe-1b-7b": Path(info["path"]), "qwen3-30b-a3b": qwen3, "rss": info}


@lru_cache(maxsize=None)
def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _expected_tensors(model: str, n_layer: int, n_expert: int) -> dict[str, tuple[tuple[int, ...], object]]:
    """name -> (ggml shape, type) the spec demands."""
    out = {"token_embd.weight": ((2048, N_VOCAB), Q4_0)}
    for i in range(n_layer):
        for suffix, shape in LAYERS[model].items():
            ne = tuple(n_expert if d == "E" else d for d in shape)
            typ = F32 if suffix.endswith("norm.weight") or suffix == "ffn_gate_inp.weight" else Q4_0
            out[f"blk.{i}.{suffix}"] = (ne, typ)
    out["output_norm.weight"] = ((2048,), F32)
    out["output.weight"] = ((2048, N_VOCAB), Q4_0)
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_llama_cpp_loads_and_generates(small_models: dict, model: str) -> None:
    # As a user runs llama.cpp: its default (repacked) weights wherever this machine can run them.
    with LlamaCppReference(small_models[model], n_ctx=64, n_threads=1, extra_bufts=None) as llm:
        assert llm.extra_bufts == extra_bufts_usable()
        toks = llm.tokenize("Hello world, this is")
        trace = llm.greedy(toks, 4)
    logits = trace.logits[0]  # after the prompt
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std() < 20, "activations should stay numerically healthy"
    out = trace.tokens
    assert len(out) == 4 and all(0 <= t < N_VOCAB for t in out)


@pytest.mark.parametrize("model", list(MODELS))
def test_tensors_and_metadata_match_the_spec(small_models: dict, model: str) -> None:
    r = _reader(small_models[model])
    got = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in r.tensors}
    assert got == _expected_tensors(model, **SMALL)
    # Q4_0 bytes: 18 per 32 weights
    for t in r.tensors:
        if t.tensor_type == Q4_0:
            assert t.n_bytes == t.n_elements // 32 * 18
    fields = {k: f.contents() for k, f in r.fields.items()}
    arch = MODELS[model].arch
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    want = dict(ARCH_KEYS[model])
    want[f"{arch}.block_count"] = SMALL["n_layer"]
    want[f"{arch}.expert_count"] = SMALL["n_expert"]
    for k, v in want.items():
        assert fields[k] == v, k
    eps, theta = {"olmoe-1b-7b": (1e-5, 1e4), "qwen3-30b-a3b": (1e-6, 1e6)}[model]
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(eps)
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    # every tokenizer key of SmolLM2, with its value type and value
    tok = {key: (val, vtype, sub) for key, val, vtype, sub in tokenizer_kvs()}
    assert {k for k in r.fields if k.startswith("tokenizer.")} == set(tok)
    for k, (val, vtype, sub) in tok.items():
        assert r.fields[k].types == ([vtype] if sub is None else [vtype, sub]), k
        assert fields[k] == val, k
    assert len(fields["tokenizer.ggml.tokens"]) == N_VOCAB


@pytest.mark.parametrize("model", list(MODELS))
def test_full_size_plan(model: str) -> None:
    """The full-size layout (planned, not written): every tensor's shape and byte size."""
    spec = model_spec(model)
    p = plan(spec, N_VOCAB)
    got = {t.name: (t.ne, F32 if t.f32 else Q4_0) for t in p}
    assert got == _expected_tensors(model, spec.n_layer, spec.n_expert)
    total = sum(t.nbytes for t in p)
    assert {"olmoe-1b-7b": 3.8e9, "qwen3-30b-a3b": 16.8e9}[model] < total < {
        "olmoe-1b-7b": 4.0e9,
        "qwen3-30b-a3b": 17.2e9,
    }[model]


def test_generation_is_deterministic(tmp_path: Path, small_models: dict) -> None:
    again = build_model(tmp_path, "qwen3-30b-a3b", **SMALL)
    assert again.name == small_models["qwen3-30b-a3b"].name
    assert again.read_bytes() == small_models["qwen3-30b-a3b"].read_bytes()


def _tensor_bytes(path: Path, model: str, n_layer: int, n_expert: int) -> dict[str, bytes]:
    """Each tensor's data, located from the plan: the data section ends the file."""
    p = plan(model_spec(model, n_layer, n_expert), N_VOCAB)
    data = path.read_bytes()
    pos = len(data) - sum(-(-t.nbytes // 32) * 32 for t in p)
    out = {}
    for t in p:
        out[t.name] = data[pos : pos + t.nbytes]
        pos += -(-t.nbytes // 32) * 32
    return out


def test_scaled_down_models_share_their_bytes(small_models: dict, tmp_path: Path) -> None:
    """Chunks are seeded by (model, tensor, expert, chunk): a model with fewer layers or more
    experts has the same bytes in every layer and expert both have."""
    one = build_model(tmp_path, "olmoe-1b-7b", n_layer=1, n_expert=9)
    a = _tensor_bytes(small_models["olmoe-1b-7b"], "olmoe-1b-7b", **SMALL)
    b = _tensor_bytes(one, "olmoe-1b-7b", 1, 9)
    assert set(b) < set(a)
    for name, tb in b.items():
        ta = a[name]
        if "exps" in name or "gate_inp" in name:
            assert len(tb) == len(ta) * 9 // 8, name  # one more expert
        else:
            assert len(tb) == len(ta), name
        n = min(len(ta), len(tb))
        assert ta[:n] == tb[:n], name


def test_peak_memory_is_bounded(small_models: dict) -> None:
    rss = small_models["rss"]
    size = small_models["olmoe-1b-7b"].stat().st_size
    grew = rss["hwm_after"] - rss["hwm_before"]
    # streaming: the generator adds a few chunks (~1.2 MB each), not the file (~190 MB)
    assert grew < 32 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB while writing {size / 2**20:.0f} MiB"
    assert rss["hwm_after"] < 512 * 2**20


def _fake_disk(free: int):
    def disk_usage(path):
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    return disk_usage


def test_too_small_disk_is_a_user_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk(10**6))
    out = tmp_path / "out"
    with pytest.raises(UserError) as ei:
        build_model(out, "olmoe-1b-7b", n_layer=1, n_expert=8)
    msg = str(ei.value)
    size = sum(t.nbytes for t in plan(model_spec("olmoe-1b-7b", 1, 8), N_VOCAB))
    needed = int(msg.split(" needs ")[1].split(" bytes")[0])
    assert size < needed < size + 8 * 2**20, msg  # data + metadata (tokenizer ~2 MB)
    assert "free" in msg
    assert list(out.iterdir()) == []


def test_cli_reports_user_errors_with_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk(10**6))
    assert cli_main([str(tmp_path), "--layers", "1", "--experts", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not enough disk space") and "bytes" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert cli_main([str(tmp_path), "--experts", "4"]) == 2  # fewer than top-8
    assert "at least the 8 experts" in capsys.readouterr().err


def test_interrupt_removes_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    real = gen_mod.tensor_chunks
    calls = {"n": 0}

    def interrupted(spec, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(spec, t)

    monkeypatch.setattr(gen_mod, "tensor_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_model(tmp_path, "qwen3-30b-a3b", n_layer=1, n_expert=8)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_path_and_size(tmp_path: Path, capsys) -> None:
    assert cli_main([str(tmp_path), "--model", "qwen3-30b-a3b", "--layers", "1", "--experts", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out.split()
    p = Path(out[0])
    assert p == tmp_path / "qwen3-30b-a3b-l1-e8.gguf"
    assert int(out[1]) == p.stat().st_size
