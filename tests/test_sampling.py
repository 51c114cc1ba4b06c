"""edgemoe.model.sampling: llama.cpp's sampler chain over numpy logits."""

from __future__ import annotations

import numpy as np

from edgemoe.model.sampling import Sampler, SamplingParams

PLAIN = dict(top_k=0, top_p=1.0, min_p=0.0)  # temperature only


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    with Sampler(SamplingParams(temp=0.0)) as s:
        assert s.seed is None
        for _ in range(20):
            x = rng.standard_normal(1000).astype(np.float32)
            assert s.sample(x) == int(np.argmax(x))
        # Ties: llama.cpp's greedy keeps the first maximum, as np.argmax does.
        tie = np.zeros(10, np.float32)
        tie[[3, 7]] = 1.0
        assert s.sample(tie) == 3 == int(np.argmax(tie))
        s.accept(3)


def test_seeded_sampling_is_reproducible() -> None:
    x = np.zeros(1000, np.float32)

    def draw(seed: int | None) -> list[int]:
        with Sampler(SamplingParams(temp=1.0, seed=seed, **PLAIN)) as s:
            return [s.sample(x) for _ in range(50)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)
    a, b = Sampler(SamplingParams(seed=None)), Sampler(SamplingParams(seed=None))
    assert a.seed != b.seed  # random seeds (equal with probability 2**-32)
    assert Sampler(SamplingParams(seed=7)).seed == 7


def test_reset_restarts_the_rng() -> None:
    x = np.zeros(100, np.float32)
    with Sampler(SamplingParams(temp=1.0, seed=3, **PLAIN)) as s:
        first = [s.sample(x) for _ in range(10)]
        s.reset()
        assert [s.sample(x) for _ in range(10)] == first


def test_top_k_1_is_argmax() -> None:
    rng = np.random.default_rng(1)
    with Sampler(SamplingParams(temp=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=1)) as s:
        for _ in range(20):
            x = rng.standard_normal(500).astype(np.float32)
            assert s.sample(x) == int(np.argmax(x))


def test_temperature_sharp_and_flat() -> None:
    sharp = np.zeros(100, np.float32)
    sharp[17] = 10.0  # p(17) = e^10 / (e^10 + 99) ~ 0.9955 at temp 1
    with Sampler(SamplingParams(temp=1.0, seed=5, **PLAIN)) as s:
        draws = [s.sample(sharp) for _ in range(200)]
    assert draws.count(17) >= 180

    flat = np.zeros(100, np.float32)
    with Sampler(SamplingParams(temp=1.0, seed=5, **PLAIN)) as s:
        draws = [s.sample(flat) for _ in range(200)]
    assert len(set(draws)) > 20


def test_default_chain_stays_in_top_k() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(2000).astype(np.float32)
    top40 = set(np.argsort(-x)[:40].tolist())
    with Sampler(SamplingParams(seed=9)) as s:  # top_k=40, top_p=0.95, min_p=0.05, temp 0.8
        assert all(s.sample(x) in top40 for _ in range(100))
    s.close()  # idempotent
