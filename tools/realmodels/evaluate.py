"""Quality numbers of the real models, as printed into docs/MODELS.md.

    python -m tools.realmodels.evaluate OUT_DIR [--json FILE] [--n-predict 80]

builds OUT_DIR first if it is stale (tools.realmodels.ensure_built), then measures with llama.cpp
(F32 KV cache, flash attention, 2 threads, like edgemoe.oracle):

- perplexity over the held-out chunks (corpus.eval_chunks: the first 512 tokens of each of the
  8 EVAL_MODULES' docstrings; every position predicted: 8 x 511 = 4,088 tokens) of the dense
  model, the dense model with its FFN requantized to Q8_0 (demo-moe's expert weights), demo-moe
  and sparse-moe;
- logit differences over the same positions: requantization noise (dense-q8ffn vs dense), demo-moe
  vs dense, and demo-moe vs dense-q8ffn (what the MoE machinery itself adds);
- routing statistics of both MoEs on the same text, from llama.cpp's own router tensors
  (``ffn_moe_logits-<il>``, ``ffn_moe_topk-<il>``);
- greedy chat answers through the model's chat template (llama.cpp's built-in template code).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import UserError

from . import corpus
from .build import ensure_built, smollm2_path
from .llama import LlamaRunner, chunk_nll
from .source import DenseModel
from .upcycle import write_dense_requantized

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one sentence what a computer program is.",
)
PCTS = (10, 25, 50, 75, 90)
TIE = 0.05  # a decision is a near tie when its margin is below this many logit standard deviations


# ---------------------------------------------------------------------------------------------
# routing statistics


def routing_stats(logits: list[np.ndarray], topk: list[np.ndarray], chunk_len: int) -> dict[str, Any]:
    """Statistics of one MoE over the evaluation text.

    logits[il]: [T, E] router logits; topk[il]: [T, k] chosen experts (llama.cpp's order); tokens
    of consecutive chunks of chunk_len are concatenated (the next-token statistic stays within a
    chunk).
    """
    n_layer = len(logits)
    T, E = logits[0].shape
    k = topk[0].shape[1]
    loads, margins, kept, weight_dev, distinct, top_share, lift_max = [], [], [], [], [], [], []
    for il in range(n_layer):
        lg = logits[il].astype(np.float64)
        sel = topk[il]
        counts = np.bincount(sel.ravel(), minlength=E)
        loads.append(counts / (T * k / E))
        srt = np.sort(lg, axis=1)[:, ::-1]
        sd = lg.std(axis=1)
        m = (srt[:, k - 1] - srt[:, k]) / np.maximum(sd, 1e-30) if k < E else np.full(T, np.inf)
        margins.append(m)
        mask = np.zeros((T, E), dtype=bool)
        np.put_along_axis(mask, sel, True, axis=1)
        same_chunk = (np.arange(T - 1) % chunk_len) != chunk_len - 1
        kept.append(((mask[:-1] & mask[1:]).sum(1) / k)[same_chunk].mean())
        chosen = np.take_along_axis(lg, sel, axis=1)
        w = np.exp(chosen - chosen.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        weight_dev.append(np.abs(w * k - 1).ravel())
        sets, cnt = np.unique(np.sort(sel, axis=1), axis=0, return_counts=True)
        distinct.append(len(sets))
        top_share.append(cnt.max() / T)
        p = mask.mean(0)
        pair = (mask.T.astype(np.float64) @ mask) / T
        lift = pair / np.maximum(np.outer(p, p), 1e-12)
        np.fill_diagonal(lift, np.nan)
        ok = np.outer(p, p) > 0
        lift_max.append(float(np.nanmax(np.where(ok, lift, np.nan))) if ok.any() else float("nan"))
    L = np.array(loads)  # [n_layer, E]
    allm = np.concatenate(margins)
    return {
        "n_expert": E,
        "n_expert_used": k,
        "tokens": T,
        "load_ceiling": E / k,
        "load_per_layer": np.round(L, 3).tolist(),
        "max_load_mean": float(L.max(1).mean()),
        "min_load_mean": float(L.min(1).mean()),
        "min_load_worst": float(L.min()),
        "dead_experts": int((L == 0).sum()),
        "load_cv_mean": float((L.std(1) / L.mean(1)).mean()),
        "margin_pcts": {str(q): float(np.percentile(allm, q)) for q in PCTS},
        "near_tie_fraction": float((allm < TIE).mean()),
        "kept_by_next_token": float(np.mean(kept)),
        "distinct_sets_mean": float(np.mean(distinct)),
        "possible_sets": int(_comb(E, k)),
        "top_set_share_mean": float(np.mean(top_share)),
        "pair_lift_max_mean": float(np.nanmean(lift_max)),
        "weight_dev_mean": float(np.concatenate(weight_dev).mean()),
        "weight_dev_max": float(np.concatenate(weight_dev).max()),
    }


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


# ---------------------------------------------------------------------------------------------
# measurements


def measure_text(models: dict[str, Path], chunks: list[list[int]], moe: tuple[str, ...]) -> dict[str, Any]:
    """Perplexities, logit differences against 'dense' (and demo vs dense-q8ffn), routing stats."""
    runners = {}
    try:
        for name, path in models.items():
            cap = ("ffn_moe_logits", "ffn_moe_topk") if name in moe else ()
            runners[name] = LlamaRunner(path, capture=cap)
        nll: dict[str, list[np.ndarray]] = {n: [] for n in models}
        pairs = [("dense-q8ffn", "dense"), ("demo-moe", "dense"), ("demo-moe", "dense-q8ffn"), ("sparse-moe", "dense")]
        pairs = [p for p in pairs if p[0] in models and p[1] in models]
        diff = {f"{a} vs {b}": {"max": 0.0, "sum": 0.0, "n": 0, "top1": 0} for a, b in pairs}
        routes: dict[str, dict[str, list[list[np.ndarray]]]] = {n: {"logits": [], "topk": []} for n in moe}
        n_layer = {}
        std = []
        for chunk in chunks:
            out = {}
            for name, r in runners.items():
                out[name] = r.run(chunk)
                nll[name].append(chunk_nll(out[name], chunk))
                if name == "dense":
                    std.append(float(out[name].std(axis=1).mean()))
                if name in moe:
                    n_layer[name] = r.n_layer
                    routes[name]["logits"].append([r.captured[("ffn_moe_logits", il)] for il in range(r.n_layer)])
                    routes[name]["topk"].append([r.captured[("ffn_moe_topk", il)] for il in range(r.n_layer)])
            for a, b in pairs:
                d = np.abs(out[a] - out[b])
                s = diff[f"{a} vs {b}"]
                s["max"] = max(s["max"], float(d.max()))
                s["sum"] += float(d.sum(dtype=np.float64))
                s["n"] += d.size
                s["top1"] += int((out[a].argmax(1) == out[b].argmax(1)).sum())
    finally:
        for r in runners.values():
            r.close()
    n_pos = len(chunks) * len(chunks[0])
    res: dict[str, Any] = {
        "chunks": len(chunks),
        "predicted_tokens": int(sum(len(c) - 1 for c in chunks)),
        "perplexity": {n: float(np.exp(np.concatenate(v).mean())) for n, v in nll.items()},
        "logit_std_dense": float(np.mean(std)) if std else None,
        "logit_diff": {k: {"max_abs": v["max"], "mean_abs": v["sum"] / v["n"], "top1_agree": v["top1"] / n_pos}
                       for k, v in diff.items()},
        "routing": {},
    }
    for name in moe:
        L = n_layer[name]
        lg = [np.concatenate([c[il] for c in routes[name]["logits"]]) for il in range(L)]
        tk = [np.concatenate([c[il] for c in routes[name]["topk"]]) for il in range(L)]
        res["routing"][name] = routing_stats(lg, tk, len(chunks[0]))
    return res


def chat(models: dict[str, Path], prompts: tuple[str, ...] = PROMPTS, n_predict: int = 80) -> dict[str, list[dict[str, Any]]]:
    """Greedy answers (stop at end of generation or n_predict tokens) through the chat template."""
    from edgemoe.model.tokenizer import Tokenizer
    from edgemoe.oracle import LlamaCppReference

    out: dict[str, list[dict[str, Any]]] = {}
    for name, path in models.items():
        out[name] = []
        with Tokenizer(path) as tok, LlamaCppReference(path, n_ctx=512) as ref:
            for p in prompts:
                text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                prompt = tok.tokenize(text, add_special=False, parse_special=True)
                tr = ref.greedy(prompt, n_predict, stop_at_eos=True)
                toks = [t for t in tr.tokens if not tok.is_eog(t)]
                out[name].append({"prompt": p, "tokens": tr.tokens, "answer": tok.detokenize(toks),
                                  "stopped": tok.is_eog(tr.tokens[-1])})
    return out


def evaluate(out_dir: Path, n_predict: int = 80, log=None) -> dict[str, Any]:
    say = log or (lambda m: None)
    out_dir = Path(out_dir)
    ensure_built(out_dir, log=say)
    t0 = time.perf_counter()
    dense = smollm2_path()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".eval-") as tmp:
        q8 = write_dense_requantized(DenseModel(dense), Path(tmp) / "dense-q8ffn.gguf")
        models = {"dense": dense, "dense-q8ffn": q8, "demo-moe": out_dir / "demo-moe.gguf",
                  "sparse-moe": out_dir / "sparse-moe.gguf"}
        from edgemoe.model.tokenizer import Tokenizer

        with Tokenizer(dense) as tok:
            chunks = corpus.eval_chunks(lambda s: tok.tokenize(s, add_special=False))
        say(f"perplexity, logits and routing over {len(chunks)} held-out chunks ...")
        res = measure_text(models, chunks, moe=("demo-moe", "sparse-moe"))
        say(f"chat transcripts ({time.perf_counter() - t0:.0f} s so far) ...")
        res["chat"] = chat({k: models[k] for k in ("dense", "demo-moe", "sparse-moe")}, n_predict=n_predict)
    res["eval_modules"] = list(corpus.EVAL_MODULES)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------
# report


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def report(res: dict[str, Any]) -> str:
    """The Markdown tables of docs/MODELS.md."""
    lines = []
    ppl = res["perplexity"]
    d0 = ppl["dense"]
    lines += ["### Perplexity", "",
              f"{res['chunks']} held-out chunks of 512 tokens ({res['predicted_tokens']} predicted tokens), llama.cpp.", "",
              "| model | perplexity | ratio to dense |", "|---|---|---|"]
    for n, v in ppl.items():
        lines.append(f"| {n} | {v:.2f} | {v / d0:.3f} |")
    lines += ["", "### Logit differences", "",
              f"Over every position of the same chunks; the dense model's logits have a standard deviation of "
              f"{res['logit_std_dense']:.2f} per position.", "", "| pair | max abs | mean abs | top-1 agreement |", "|---|---|---|---|"]
    for n, v in res["logit_diff"].items():
        lines.append(f"| {n} | {v['max_abs']:.4g} | {v['mean_abs']:.4g} | {100 * v['top1_agree']:.1f}% |")
    lines += ["", "### Routing", "",
              "| model | E | k | max load, mean over layers (ceiling) | min load, mean / worst | load CV | "
              "margin p10 / p25 / p50 / p75 / p90 | margin < 0.05 | kept by next token | distinct expert sets per layer (possible) | most frequent set's share | max pair lift | weight deviation from 1/k, mean / max |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in res["routing"].items():
        m = " / ".join(_f(s["margin_pcts"][str(q)]) for q in PCTS)
        lines.append(
            f"| {n} | {s['n_expert']} | {s['n_expert_used']} | {_f(s['max_load_mean'], 2)} ({_f(s['load_ceiling'], 2)}) | "
            f"{_f(s['min_load_mean'], 2)} / {_f(s['min_load_worst'], 3)} | {_f(s['load_cv_mean'], 2)} | {m} | "
            f"{100 * s['near_tie_fraction']:.0f}% | {100 * s['kept_by_next_token']:.0f}% | "
            f"{s['distinct_sets_mean']:.1f} ({s['possible_sets']}) | {100 * s['top_set_share_mean']:.0f}% | "
            f"{_f(s['pair_lift_max_mean'], 2)} | {s['weight_dev_mean']:.2g} / {s['weight_dev_max']:.2g} |")
    for n, s in res["routing"].items():
        E = s["n_expert"]
        lines += ["", f"Load per expert, {n} (1.00 = uniform share k/E; ceiling {_f(s['load_ceiling'], 2)}):", "",
                  "| layer | " + " | ".join(str(e) for e in range(E)) + " |", "|---" * (E + 1) + "|"]
        for il, row in enumerate(s["load_per_layer"]):
            lines.append(f"| {il} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    lines += ["", "### Chat (greedy)", ""]
    names = list(res["chat"])
    for i, p in enumerate(res["chat"][names[0]]):
        lines += [f"**User:** {p['prompt']}", ""]
        for n in names:
            a = res["chat"][n][i]
            tail = "" if a["stopped"] else " […]"
            ans = a["answer"].strip().replace("\n", "\n> ")
            lines += [f"**{n}:**", "", f"> {ans}{tail}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.realmodels.evaluate",
                                 description="Measure the real models (perplexity, logits, routing, chat); print Markdown.")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    ap.add_argument("--n-predict", type=int, default=80)
    args = ap.parse_args(argv)
    try:
        res = evaluate(Path(args.out_dir), n_predict=args.n_predict, log=lambda m: print(m, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    sys.stdout.write(report(res))
    print(f"(measured in {res['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
