"""Recall of expert predictors (OD-MoE eq. 2-3), measured offline against the main model's own routing.

For each prompt the main model runs in-process (greedy, EOS ignored) and its decode is recorded:
the tokens, every MoE layer's FFN input (residual stream) and router choice, and its K/V rows.
Each predictor is then replayed against that record through exactly the calls the coordinator
makes online, in the same order, with the same inputs:

    on_step (tokens, n_past)  ->  begin_token(step)  ->  after_router(layer, residual, selected)
                                                                 for each MoE layer, in order

and a replayed main model whose K/V cache holds only the rows the real one had finished when the
eval started (a shadow's KV alignment reads them). Predictions are merged as the coordinator merges
them (a layer's newest prediction replaces the older one; only layers after the current one count).

recall (eq. 3) counts, for every decode token and MoE layer, the predicted experts that the router
then chose, over k per layer: the prediction in effect when the layer runs. recall at lead d counts
what was predicted for a layer before the main model had finished the router d MoE layers earlier
(lead = target index - call index; begin_token is index -1), i.e. with d layers of time to load.
by_token is eq. (2): recall per decode step over all prompts. The shadow predictors run in sync
mode: they are waited for, so recall measures what they predict, not whether they are on time
(late_start_ms says how long they take to start a token).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.errors import UserError
from edgemoe.util.files import read_user_text
from edgemoe.model.engine import Engine
from edgemoe.model.experts import ExpertBackend, LocalExperts
from edgemoe.model.hooks import StepHooks
from edgemoe.model.kvcache import KVCache
from edgemoe.predict import Predictor, PredictorOptions, make_predictor, parse_predictor

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "prompts.txt"
SHADOW_PREDICTORS = ("shadow", "reanchor")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path)
    text = read_user_text(p, "prompts file")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{p}: no prompts in the file (one per line; blank lines and # comments are skipped)")
    return prompts


@dataclass
class Trace:
    """One prompt's greedy decode by the main model."""

    prompt: list[int]
    tokens: list[int]  # decode step s feeds tokens[s] (tokens[0] comes from the prefill)
    residual: np.ndarray  # [steps, n_moe, n_embd] float32: each MoE layer's FFN input
    selected: np.ndarray  # [steps, n_moe, k] int32: the router's choices
    kv_k: list[np.ndarray]  # per layer, rows [0, n_prompt + steps)
    kv_v: list[np.ndarray]


class _Recorder(ExpertBackend, StepHooks):
    """Local experts (never in the trunk's graph, so each router is heard) that remember each decode
    step's FFN input and routing (its engine's on_router hook)."""

    def __init__(self, inner: LocalExperts) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        return self.inner.compute(layer, expert, hidden)

    def on_router(self, layer: int, residual: np.ndarray, selected: np.ndarray,
                  groups: list[tuple[int, int]] | None = None) -> None:
        if selected.shape[0] == 1:
            self.calls.append((layer, np.array(residual[0], dtype=np.float32), np.array(selected[0], dtype=np.int32)))

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        return self.inner.compute_layer(layer, hidden, selected, groups)

    def close(self) -> None:
        self.inner.close()


def record(engine: Engine, prompt: list[int], steps: int) -> Trace:
    rec: _Recorder = engine.experts  # type: ignore[assignment]
    engine.reset()
    tok = int(np.argmax(engine.eval(prompt)[0]))
    tokens = []
    rec.calls.clear()
    for _ in range(steps):
        tokens.append(tok)
        tok = int(np.argmax(engine.eval([tok])[0]))
    L = len(engine.moe_layers)
    if len(rec.calls) != steps * L:
        raise AssertionError(f"recorded {len(rec.calls)} MoE calls, expected {steps * L}")
    residual = np.stack([c[1] for c in rec.calls]).reshape(steps, L, -1)
    selected = np.stack([c[2] for c in rec.calls]).reshape(steps, L, -1)
    n = engine.n_past
    rows = [engine.kv.read_rows(il, 0, n) for il in range(engine.cfg.n_layer)]
    return Trace(list(prompt), tokens, residual, selected, [k for k, _ in rows], [v for _, v in rows])


class ReplayMain:
    """What a predictor may read of the main model, replayed from a Trace: its Model, config, trunk,
    model directory, step hooks, position, and the K/V rows finished so far."""

    def __init__(self, engine: Engine) -> None:
        self.model = engine.model
        self.cfg = engine.cfg
        self.weights = engine.weights
        self.model_dir = engine.model_dir
        self.manifest = engine.manifest
        self.n_ctx = engine.n_ctx
        self.moe_layers = engine.moe_layers
        self.kv = KVCache(engine.cfg, engine.n_ctx, engine.kv.attn)
        self.n_past = 0
        self.hooks: list[StepHooks] = []
        self._filled = 0

    def start(self) -> None:
        self.kv.clear()
        self.n_past = self._filled = 0

    def fill(self, trace: Trace, upto: int) -> None:
        """Rows [0, upto) exist in the main model's cache (those of finished evals)."""
        lo = self._filled
        for il in range(self.cfg.n_layer):
            self.kv.write_rows(il, lo, trace.kv_k[il][lo:upto], trace.kv_v[il][lo:upto])
        self.kv.mark_used(upto)
        self._filled = upto

    def eval_started(self, tokens: list[int]) -> None:
        arr = np.array(tokens, dtype=np.int32)
        for hook in list(self.hooks):
            hook.on_step(self, arr)


@dataclass
class Tally:
    """Hits per (lead, MoE layer index) and per decode step (lead 1), with their denominators."""

    n_moe: int
    k: int
    hits: np.ndarray = field(init=False)  # [lead 1..n_moe+1, layer index]
    total: np.ndarray = field(init=False)
    step_hits: list[int] = field(default_factory=list)
    step_total: list[int] = field(default_factory=list)
    call_s: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.hits = np.zeros((self.n_moe + 2, self.n_moe), dtype=np.int64)
        self.total = np.zeros_like(self.hits)

    def add_step(self, step: int, hits: int, total: int) -> None:
        while len(self.step_hits) <= step:
            self.step_hits.append(0)
            self.step_total.append(0)
        self.step_hits[step] += hits
        self.step_total[step] += total

    def result(self) -> dict:
        lead1 = self.hits[1].sum() / max(1, self.total[1].sum())
        by_lead = {int(d): float(self.hits[d].sum() / self.total[d].sum()) for d in range(1, self.n_moe + 1) if self.total[d].sum()}
        by_layer = [float(h / t) if t else 0.0 for h, t in zip(self.hits[1], self.total[1])]
        by_token = [h / t if t else 0.0 for h, t in zip(self.step_hits, self.step_total)]
        return {"recall": float(lead1), "by_lead": by_lead, "by_layer": by_layer, "by_token": by_token,
                "call_ms_per_token": 1e3 * self.call_s / max(1, self.tokens)}


def replay(pred: Predictor, main: ReplayMain, trace: Trace, tally: Tally, step0: int) -> None:
    """Feed pred the calls the coordinator would make while the main model decodes trace."""
    layers = main.moe_layers
    L = len(layers)
    k = tally.k
    pred.reset()
    main.start()
    t0 = time.perf_counter()
    main.eval_started(trace.prompt)  # the prefill: listeners only (the coordinator predicts nothing)
    tally.call_s += time.perf_counter() - t0
    main.n_past = len(trace.prompt)
    for s, tok in enumerate(trace.tokens):
        main.fill(trace, main.n_past)
        actual = [set(int(e) for e in trace.selected[s, j]) for j in range(L)]
        current: dict[int, set[int]] = {}
        step_hits = 0

        def merge(preds: dict[int, list[int]], c: int) -> None:
            after = layers[c] if c >= 0 else -1
            for layer, experts in preds.items():
                if layer > after and layer in layers:
                    current[layer] = {int(e) for e in experts}
            for j in range(c + 1, L):  # what each later layer has been promised at lead j - c
                p = current.get(layers[j])
                h = len(p & actual[j]) if p else 0
                tally.hits[j - c, j] += h
                tally.total[j - c, j] += k

        t0 = time.perf_counter()
        main.eval_started([tok])
        preds = pred.begin_token(step0 + s)
        tally.call_s += time.perf_counter() - t0
        merge(preds, -1)
        for j in range(L):
            p = current.get(layers[j])
            step_hits += len(p & actual[j]) if p else 0
            t0 = time.perf_counter()
            preds = pred.after_router(layers[j], trace.residual[s, j], trace.selected[s, j])
            tally.call_s += time.perf_counter() - t0
            merge(preds, j)
        tally.add_step(s, step_hits, k * L)
        tally.tokens += 1
        main.n_past += 1


@dataclass
class RecallResult:
    model: str
    prompts: int
    n_predict: int
    n_expert: int
    k: int
    moe_layers: list[int]
    options: dict
    predictors: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    main_ms_per_token: float = 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "prompts": self.prompts, "n_predict": self.n_predict, "n_expert": self.n_expert,
                "k": self.k, "moe_layers": self.moe_layers, "options": self.options,
                "main_ms_per_token": self.main_ms_per_token, "predictors": self.predictors, "skipped": self.skipped}


def bench_recall(model: str | Path, prompts: list[str], *, n_predict: int, predictors: list[str],
                 options: PredictorOptions, threads: int = 1, seed: int = 0, explicit: bool = True,
                 progress: bool = False) -> RecallResult:
    """Recall of each predictor (names or specs) on model over prompts, n_predict decode steps each."""
    from edgemoe.model.tokenizer import Tokenizer

    model = Path(model)
    if not model.is_dir():
        raise UserError(f"{model}: the recall benchmark needs a converted MoE model directory (edgemoe convert)")
    for spec in predictors:
        parse_predictor(spec)
    options = PredictorOptions(**{**options.__dict__, "sync": True})
    probe = Engine(model, n_ctx=8, n_threads=1, experts=lambda e: _Recorder(LocalExperts(e.model_dir, e.compute, e.manifest)))
    try:
        if not probe.moe_layers:
            raise UserError(f"{model}: not a MoE model")
        with Tokenizer(probe.weights.path) as tok:
            token_lists = [tok.tokenize(p, add_special=True, parse_special=False) for p in prompts]
        n_ctx_train = probe.cfg.n_ctx_train
    finally:
        probe.close()
    longest = max(len(t) for t in token_lists)
    n_ctx = longest + n_predict + 1
    if n_ctx > n_ctx_train:
        raise UserError(f"the longest prompt ({longest} tokens) plus --n-predict {n_predict} exceeds the model's "
                        f"context of {n_ctx_train} tokens")
    engine = Engine(model, n_ctx=n_ctx, n_threads=threads,
                    experts=lambda e: _Recorder(LocalExperts(e.model_dir, e.compute, e.manifest)))
    mains: dict[str, ReplayMain] = {}  # one per predictor: a predictor hears only its own replays
    cfg = engine.cfg
    L = len(engine.moe_layers)
    result = RecallResult(str(model), len(prompts), n_predict, cfg.n_expert, cfg.n_expert_used, list(engine.moe_layers),
                          {k: v for k, v in options.__dict__.items() if k != "sync"} | {"threads": threads, "seed": seed})
    preds: dict[str, Predictor] = {}
    try:
        for spec in predictors:
            try:  # every distance is measured: the predictors look as far ahead as there are layers
                mains[spec] = ReplayMain(engine)
                preds[spec] = make_predictor(spec, cfg, engine.weights, engine.moe_layers, depth=L, seed=seed,
                                             main=mains[spec], options=options)
            except UserError as e:
                if explicit or parse_predictor(spec)[0] not in SHADOW_PREDICTORS:
                    raise
                result.skipped[spec] = str(e)
        tallies = {spec: Tally(L, cfg.n_expert_used) for spec in preds}
        main_s = 0.0
        for q, toks in enumerate(token_lists):
            t0 = time.perf_counter()
            trace = record(engine, toks, n_predict)
            main_s += time.perf_counter() - t0
            for spec, pred in preds.items():
                replay(pred, mains[spec], trace, tallies[spec], q * n_predict)
            if progress:
                print(f"\rprompt {q + 1}/{len(token_lists)}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        result.main_ms_per_token = 1e3 * main_s / (len(token_lists) * (n_predict + 1))
        for spec, pred in preds.items():
            result.predictors[spec] = {**tallies[spec].result(), "stats": pred.stats()}
    finally:
        for pred in preds.values():
            pred.close()
        engine.close()
    return result


def format_table(r: RecallResult) -> str:
    L = len(r.moe_layers)
    leads = list(range(2, L + 1))
    lines = [f"recall on {r.model}: top-{r.k} of {r.n_expert} experts, {L} MoE layers; {r.prompts} prompts x "
             f"{r.n_predict} decode steps, greedy; chance = {r.k / r.n_expert:.3f}",
             f"{'predictor':<20} {'recall':>7} " + " ".join(f"{'lead' + str(d):>6}" for d in leads)
             + f" {'ms/token':>9}  notes"]
    for name, p in r.predictors.items():
        cells = " ".join(f"{p['by_lead'].get(d, float('nan')):6.3f}" for d in leads)
        notes = []
        st = p["stats"]
        if "late_start_ms" in st and st["late_start_ms"].get("n"):
            notes.append(f"late start {st['late_start_ms']['median']:.2f} ms, forward {st['forward_ms']['median']:.2f} ms")
        if "reanchor_ms_per_token" in st and st["reanchor_ms_per_token"].get("n"):
            notes.append(f"re-anchor {st['reanchor_ms_per_token']['median']:.2f} ms/token (d={st['reanchor_depth']})")
        lines.append(f"{name:<20} {p['recall']:7.3f} {cells} {p['call_ms_per_token']:9.2f}  {'; '.join(notes)}")
    for name, why in r.skipped.items():
        lines.append(f"{name:<20} skipped: {why}")
    lines.append(f"main model: {r.main_ms_per_token:.2f} ms/token in-process. recall = eq. (3), the prediction in "
                 "effect when the layer runs; leadD = predicted D MoE layers ahead; ms/token = time in predictor calls "
                 "(a synced shadow's forward included)")
    return "\n".join(lines)


def plot(r: RecallResult, path: str | Path) -> None:
    """recall(n) (eq. 2) against the decode token index, and recall against lead, one line per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.get_cmap("tab20").colors
    for i, (name, p) in enumerate(r.predictors.items()):
        style = {"color": colors[(2 * i) % 20 + (i >= 10)], "linestyle": "-" if i < 10 else "--"}
        ax.plot(range(len(p["by_token"])), p["by_token"], label=f"{name} ({p['recall']:.3f})", linewidth=1.3, **style)
        leads = sorted(p["by_lead"])
        ax2.plot(leads, [p["by_lead"][d] for d in leads], marker="o", markersize=4, **style)
    ax.axhline(r.k / r.n_expert, color="grey", linestyle=":", linewidth=1, label=f"chance k/E = {r.k / r.n_expert:.2f}")
    ax.set_xlabel("decode token index n")
    ax.set_ylabel("recall(n), eq. (2)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{Path(r.model).name}: {r.prompts} prompts x {r.n_predict} steps")
    ax.grid(alpha=0.3)
    ax2.set_xlabel("lead (MoE layers ahead)")
    ax2.set_ylabel("recall")
    ax2.set_ylim(-0.02, 1.02)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(r.predictors) + 1) // 4), 1, 1))
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as e:
        raise UserError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
