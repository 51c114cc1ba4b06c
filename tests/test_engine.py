"""The engine against llama.cpp itself: same tokens, same router choices, same logits.

edgemoe builds llama.cpp's graph op for op and runs it with the same ggml kernels on the same
bytes, so with the reference configured like the engine (F32 KV cache, flash attention, no weight
repacking, same thread count) logits are expected to be bitwise identical, not just close.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from edgemoe.oracle import LlamaCppReference
from tests.cli import edgemoe

N_PREDICT = 64
THREADS = 1  # one thread: a 2-thread ggml pool stalls at every barrier when another process holds a core
PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


def compare_with_llama_cpp(source: Path, model: Path, n_predict: int = N_PREDICT, resident: bool = True) -> None:
    with LlamaCppReference(source, n_ctx=512, n_threads=THREADS, capture_routing=True) as ref:
        prompt = ref.tokenize(PROMPT)
        trace = ref.greedy(prompt, n_predict)
    with Engine(model, n_ctx=512, n_threads=THREADS, resident_experts=resident) as engine:
        engine.reset()
        routing = []
        logits = engine.eval(prompt)[0]
        rows, tokens = [logits], [int(np.argmax(logits))]
        routing.append(list(engine.routing))
        for _ in range(n_predict - 1):
            logits = engine.eval([tokens[-1]])[0]
            rows.append(logits)
            tokens.append(int(np.argmax(logits)))
            routing.append(list(engine.routing))

    # router choices first: a top-k flip explains most divergences
    for step, (ours, theirs) in enumerate(zip(routing, trace.routing)):
        for layer, sel in enumerate(ours):
            if sel is None:
                continue
            ref_sel = theirs[layer][-sel.shape[0]:]  # llama.cpp routes only output rows in the last layer
            assert np.array_equal(sel, ref_sel), f"router differs at step {step}, layer {layer}: {sel} vs {ref_sel}"
    assert tokens == trace.tokens
    assert np.array_equal(np.array(rows), trace.logits), f"max |diff| {np.abs(np.array(rows) - trace.logits).max()}"


def test_every_test_model_matches_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    for src in fixture_models:
        compare_with_llama_cpp(src, converted_models[src.stem])


def test_just_in_time_experts_match_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    """Experts mapped per use and unmapped after (a worker's way) give the same bits."""
    for src in fixture_models:
        if src.stem.endswith("q4_k_m"):
            compare_with_llama_cpp(src, converted_models[src.stem], n_predict=16, resident=False)


def test_dense_smollm2_matches_llama_cpp(smollm2: Path) -> None:
    """Trained weights through the trunk code paths (dense FFN, tied output, Q4_1)."""
    compare_with_llama_cpp(smollm2, smollm2, n_predict=24)


def test_greedy_helper_and_reset(converted_models: dict[str, Path]) -> None:
    with Engine(converted_models["qwen3moe-q8_0"], n_ctx=256, n_threads=THREADS) as engine:
        a, la = greedy_tokens(engine, [1, 2, 3, 4], 8)
        b, lb = greedy_tokens(engine, [1, 2, 3, 4], 8)
    assert a == b and np.array_equal(la, lb) and len(set(a)) > 1


def test_run_cli_greedy_equals_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    src = next(p for p in fixture_models if p.stem == "llama-moe-q4_k_m")
    r = edgemoe("run", str(converted_models[src.stem]), "-p", PROMPT, "-n", "16", "--temp", "0", "--ignore-eos", "--json", "-t", str(THREADS))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    with LlamaCppReference(src, n_ctx=512, n_threads=THREADS) as ref:
        prompt = ref.tokenize(PROMPT)
        trace = ref.greedy(prompt, 16)
    assert out["prompt_tokens"] == prompt
    assert out["tokens"] == trace.tokens
    assert out["text"] and r.stdout.startswith(out["text"])
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert out["stats"][key] > 0
    assert "tok/s" in r.stderr


def test_run_cli_seeded_sampling_is_reproducible(converted_models: dict[str, Path]) -> None:
    model = str(converted_models["olmoe-q8_0"])
    runs = [edgemoe("run", model, "-p", "Hello", "-n", "12", "--temp", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                    "--seed", str(seed), "--ignore-eos", "--json") for seed in (7, 7, 8)]
    toks = [json.loads(r.stdout.strip().splitlines()[-1])["tokens"] for r in runs]
    assert toks[0] == toks[1] and toks[0] != toks[2]


def _broken_copy(model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(model, dest)
    return dest


@pytest.mark.parametrize("damage", ["missing-shard", "corrupt-shard", "corrupt-trunk", "bad-manifest", "not-a-model"])
def test_run_refuses_damaged_models(converted_models: dict[str, Path], tmp_path: Path, damage: str) -> None:
    model = _broken_copy(converted_models["llama-moe-q8_0"], tmp_path)
    shard = model / "experts" / "blk.000.expert.003.gguf"
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "corrupt-shard":  # same size, different bytes: found when the shard is first used
        for i in range(8):
            data = bytearray((model / "experts" / f"blk.000.expert.00{i}.gguf").read_bytes())
            data[-1] ^= 0x55
            (model / "experts" / f"blk.000.expert.00{i}.gguf").write_bytes(bytes(data))
    elif damage == "corrupt-trunk":
        data = bytearray((model / "trunk.gguf").read_bytes())
        data[-1] ^= 0x55
        (model / "trunk.gguf").write_bytes(bytes(data))
    elif damage == "bad-manifest":
        (model / "manifest.json").write_text("{not json")
    else:
        (model / "manifest.json").unlink()
    r = edgemoe("run", str(model), "-p", "Hello", "-n", "4", "--temp", "0")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_run_refuses_bad_input(converted_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.synthetic import write_moe

    model = str(converted_models["qwen2moe-q8_0"])
    unknown = write_moe(tmp_path / "gptx.gguf", arch="gptx", with_experts=False)
    cases = [
        (["run", model, "-p", "word " * 40, "-c", "16"], "longer than the context"),
        (["run", str(unknown), "-p", "hi"], "architecture 'gptx'"),
        (["run", str(tmp_path / "nope"), "-p", "hi"], "no such model"),
        (["run", model, "-p", "hi", "-n", "0"], "--n-predict"),
        (["run", model, "-p", "hi", "--workers", "-1"], "--workers"),
    ]
    for args, phrase in cases:
        r = edgemoe(*args)
        assert r.returncode == 2, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and phrase in last and "Traceback" not in r.stderr, (args, r.stderr)
