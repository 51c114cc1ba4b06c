"""The child process of the extra-buffer-type probe (edgemoe.util.extra_bufts runs it).

Writes a tiny one-layer llama GGUF, loads it with llama.cpp's extra buffer types on (its default:
weight repacking, AMX where the CPU claims it), decodes a prompt and a token, and prints `ok`.
A SIGILL, a failure or a hang tells the parent the extra buffer types cannot run here.

Run as `python -m edgemoe.util.extra_bufts_probe --child DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_N_EMBD, _N_FF, _N_HEAD, _N_PROMPT = 256, 512, 4, 32


def _write_probe_gguf(path: Path) -> None:
    """A one-layer llama model whose matrices are Q4_0, Q8_0 and F16 (types every repacking
    buffer type takes, AMX's included) with rows that are multiples of 32."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_context_length(128)
    w.add_embedding_length(_N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(_N_FF)
    w.add_head_count(_N_HEAD)
    w.add_head_count_kv(_N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(_N_EMBD // _N_HEAD)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    q4, q8, f16, f32 = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0,
                        gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    T = gguf.MODEL_TENSOR

    def name(t: gguf.MODEL_TENSOR) -> str:
        # gguf-py's names (edgemoe.format.schema's tensor_name sits above this module's layer)
        return gguf.TENSOR_NAMES[t].format(bid=0) + ".weight"

    add(name(T.TOKEN_EMBD), (n_vocab, _N_EMBD), f32)
    w.add_tensor(name(T.ATTN_NORM), np.ones(_N_EMBD, np.float32))
    for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT):
        add(name(t), (_N_EMBD, _N_EMBD), q4)
    w.add_tensor(name(T.FFN_NORM), np.ones(_N_EMBD, np.float32))
    add(name(T.FFN_GATE), (_N_FF, _N_EMBD), q8)
    add(name(T.FFN_UP), (_N_FF, _N_EMBD), f16)
    add(name(T.FFN_DOWN), (_N_EMBD, _N_FF), q4)
    w.add_tensor(name(T.OUTPUT_NORM), np.ones(_N_EMBD, np.float32))
    add(name(T.OUTPUT), (n_vocab, _N_EMBD), q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _child(tmp: Path) -> int:
    """Load the probe model with the extra buffer types on and decode; prints `ok` on success."""
    import llama_cpp
    import numpy as np

    from edgemoe.util.llamacpp import init_llama

    path = tmp / "probe.gguf"
    _write_probe_gguf(path)
    init_llama()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = True  # the thing under test: llama.cpp's default
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        print("llama.cpp could not load the probe model", file=sys.stderr)
        return 3
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        print("llama.cpp could not create a context for the probe model", file=sys.stderr)
        return 3
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    # A prompt batch (the matrix-matrix kernels) and then one token (the matrix-vector ones).
    for pos0, toks in ((0, list(range(3, 3 + _N_PROMPT))), (_N_PROMPT, [7])):
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(toks) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            print("llama_decode failed on the probe model", file=sys.stderr)
            return 3
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        if not np.isfinite(logits).all():
            print("the probe model's logits are not finite", file=sys.stderr)
            return 3
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    print("ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=Path, required=True, metavar="DIR",
                    help="run the probe's child, writing its model into DIR")
    args = ap.parse_args(argv)
    return _child(args.child)


if __name__ == "__main__":
    sys.exit(main())
