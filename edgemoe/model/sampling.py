"""Token sampling with llama.cpp's own sampler chain, applied to numpy logits.

The math (top-k, top-p, min-p, temperature, the seeded categorical draw) is llama.cpp's, so
edgemoe samples exactly as llama.cpp would from the same logits and seed.

Greedy (temp <= 0) is llama_sampler_init_greedy, which scans the candidates in token order and
keeps the first strictly larger logit: on ties it picks the lowest token id, like np.argmax.
(Unlike np.argmax it never picks a NaN: comparisons with NaN are false.)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

from edgemoe.util.llamacpp import init_llama
from edgemoe.util.resource import Owned

# Same layout as `llama_token_data` {int32 id; float logit; float p;}: filled without a Python loop.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@dataclass
class SamplingParams:
    """Sampler settings; temp <= 0 means greedy, seed None means a random seed."""

    temp: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    seed: int | None = None


class Sampler(Owned):
    """A llama.cpp sampler chain: top_k -> top_p -> min_p -> temp -> dist (or greedy)."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        init_llama()
        self.params = params if params is not None else SamplingParams()
        p = self.params
        self._chain: int | None = None
        cp = llama_cpp.llama_sampler_chain_default_params()
        cp.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(cp)
        if not chain:
            raise RuntimeError("llama_sampler_chain_init failed")
        self._chain = chain
        # The chain owns every sampler added to it and frees them with itself.
        if p.temp <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(p.temp))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            # LLAMA_DEFAULT_SEED (0xFFFFFFFF) makes llama.cpp draw a seed from std::random_device.
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        self._buf = np.empty(0, dtype=_TOKEN_DATA)

    @property
    def seed(self) -> int | None:
        """The seed actually in use (the drawn one when params.seed is None); None if greedy."""
        if self.params.temp <= 0 or not self._chain:
            return None
        return int(llama_cpp.llama_sampler_get_seed(self._chain))

    def sample(self, logits: np.ndarray) -> int:
        """Token id sampled from float32 logits [n_vocab] (does not call accept)."""
        if not self._chain:
            raise RuntimeError("sampler is closed")
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        n = x.shape[0]
        if n == 0:
            raise ValueError("empty logits")
        if self._buf.shape[0] != n:
            self._buf = np.empty(n, dtype=_TOKEN_DATA)
        buf = self._buf
        buf["id"] = np.arange(n, dtype=np.int32)
        buf["logit"] = x
        buf["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=buf.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n,
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError(f"llama.cpp sampler selected no token (selected={arr.selected})")
        # Samplers may point `data` at their own (sorted) storage: read through the struct.
        return int(arr.data[arr.selected].id)

    def accept(self, token: int) -> None:
        """Tell the chain which token was emitted (llama_sampler_accept)."""
        if not self._chain:
            raise RuntimeError("sampler is closed")
        llama_cpp.llama_sampler_accept(self._chain, token)

    def reset(self) -> None:
        """Reset the chain (llama_sampler_reset): a fixed seed restarts its RNG sequence, a random
        seed (params.seed None) is drawn afresh."""
        if self._chain:
            llama_cpp.llama_sampler_reset(self._chain)

    def close(self) -> None:
        """Free the chain and its samplers (idempotent)."""
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None



__all__ = ["Sampler", "SamplingParams"]
