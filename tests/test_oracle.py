"""edgemoe.oracle: llama.cpp as the numeric reference (greedy traces, determinism, routing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.oracle import LlamaCppReference, Trace
from edgemoe.util.proc import peak_rss_bytes, rss_bytes

# One thread: the test machine has 2 cores shared with other jobs, and ggml's spinning thread
# pool slows down by orders of magnitude when it is oversubscribed.
N_THREADS = 1
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def moe_model(request: pytest.FixtureRequest) -> Path:
    """One small generated MoE fixture, or a skip saying why there is none."""
    try:
        models = request.getfixturevalue("fixture_models")
    except Exception as e:  # generator missing or failing: not this module's concern
        pytest.skip(f"no MoE fixture models (tools.testmodels unavailable: {e})")
    present = [p for p in models if p.is_file()]
    if not present:
        pytest.skip("no MoE fixture models in build/fixtures (run `make fixtures`)")
    q8 = [p for p in present if p.name.endswith("-q8_0.gguf")]
    return (q8 or present)[0]


def test_greedy_smollm2(smollm2: Path) -> None:
    with LlamaCppReference(smollm2, n_ctx=128, n_threads=N_THREADS) as ref:
        prompt = ref.tokenize(PROMPT)
        tr = ref.greedy(prompt, 8)
        assert isinstance(tr, Trace)
        assert tr.prompt_tokens == prompt
        assert len(tr.tokens) == 8
        assert tr.logits.shape == (8, ref.n_vocab) and tr.logits.dtype == np.float32
        assert [int(np.argmax(row)) for row in tr.logits] == tr.tokens
        assert np.isfinite(tr.logits).all()
        assert tr.routing == []  # not captured
        assert tr.prefill_s > 0 and tr.decode_s > 0
        assert tr.n_decode_steps == 7 and tr.decode_tok_s > 0 and tr.prefill_tok_s > 0
        assert ref.n_layer == 30 and ref.n_vocab == 49152

        # Determinism: greedy resets the KV cache, so a second run repeats the first bit for bit.
        tr2 = ref.greedy(prompt, 8)
        assert tr2.tokens == tr.tokens
        assert np.array_equal(tr2.logits, tr.logits)

        # eval() continues at the next positions: prompt then the first token give rows 0 and 1.
        ref.reset()
        assert np.array_equal(ref.eval(prompt), tr.logits[0])
        assert np.array_equal(ref.eval([tr.tokens[0]]), tr.logits[1])
        assert ref.n_past == len(prompt) + 1


def test_greedy_stop_at_eos_and_errors(smollm2: Path) -> None:
    with LlamaCppReference(smollm2, n_ctx=64, n_threads=N_THREADS) as ref:
        with pytest.raises(ValueError):
            ref.eval([])
        with pytest.raises(ValueError):
            ref.eval([ref.n_vocab])
        with pytest.raises(ValueError):
            ref.eval([1] * 65)
        # The instruct model answers this one briefly and ends with <|im_end|> (end of generation).
        chat = "<|im_start|>user\nWhat is 2+2? Reply with just the number.<|im_end|>\n<|im_start|>assistant\n"
        tr = ref.greedy(ref.tokenize(chat, parse_special=True), 40, stop_at_eos=True)
        assert len(tr.tokens) < 40 and ref.is_eog(tr.tokens[-1])
        assert not any(ref.is_eog(t) for t in tr.tokens[:-1])
        assert tr.logits.shape == (len(tr.tokens), ref.n_vocab)
    ref.close()  # idempotent


def test_rss_helpers() -> None:
    assert 0 < rss_bytes() <= peak_rss_bytes()
    assert LlamaCppReference.rss_bytes() > 0


def test_routing_capture_moe(moe_model: Path) -> None:
    with LlamaCppReference(moe_model, n_ctx=64, n_threads=N_THREADS, capture_routing=True) as ref:
        assert ref.n_expert > 1 and 1 <= ref.n_expert_used <= ref.n_expert
        prompt = ref.tokenize("Hello world, this is a test")
        n_pred = 3
        tr = ref.greedy(prompt, n_pred)
        assert len(tr.routing) == n_pred  # the prompt batch + n_pred - 1 decode steps
        k, n_layer = ref.n_expert_used, ref.n_layer
        for i, r in enumerate(tr.routing):
            n_tok = len(prompt) if i == 0 else 1
            assert r.shape == (n_layer, n_tok, k) and r.dtype == np.int32
            # llama.cpp routes only the output (last) token in the last layer; every other row
            # of every layer must be a full set of k distinct experts.
            valid = np.ones((n_layer, n_tok), dtype=bool)
            valid[n_layer - 1, : n_tok - 1] = False
            assert (r[~valid] == -1).all()
            rows = r[valid]
            assert ((rows >= 0) & (rows < ref.n_expert)).all()
            assert all(len(set(row.tolist())) == k for row in rows)
        # Routing is as deterministic as the logits.
        tr2 = ref.greedy(prompt, n_pred)
        assert tr2.tokens == tr.tokens
        assert all(np.array_equal(a, b) for a, b in zip(tr.routing, tr2.routing))
