"""Shadow files, the shadow predictors (SEP, re-anchored), the new baselines and the recall benchmark.

A prediction may only change speed: tokens and logits on a cluster stay identical to the in-process
engine under every predictor and alignment setting. Recall is checked in-process (bench_recall).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from edgemoe.bench.recall import bench_recall
from edgemoe.cli.main import main as cli_main
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.errors import UserError
from edgemoe.format.gguf_io import metadata, open_gguf
from edgemoe.format.manifest import load_manifest, verify_model_dir
from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from edgemoe.predict import PREDICTORS, PredictorOptions, make_predictor
from tests.cli import edgemoe
from tests.synthetic import write_moe
from edgemoe.convert import plan_conversion, write_model

Q = GGMLQuantizationType
PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
N_PREDICT = 10
PROMPTS = ["The history of the Roman Empire began when", "Write a short poem about the sea.", "def fibonacci(n):"]



@pytest.fixture(scope="module")
def models(fixture_models: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """f32 source with q8_0 shadow experts and a q8_0 shadow trunk; q8_0 source with an identical q8_0
    shadow; and the q8_0 source converted without a shadow."""
    src = {p.stem: p for p in fixture_models}
    root = tmp_path_factory.mktemp("shadow")
    out = {"f32": root / "f32", "q8": root / "q8", "plain": root / "plain"}
    write_model(plan_conversion(src["llama-moe-f32"], shadow_type="q8_0", shadow_trunk_type="q8_0"), out["f32"], progress=False)
    write_model(plan_conversion(src["llama-moe-q8_0"], shadow_type="q8_0"), out["q8"], progress=False)
    write_model(plan_conversion(src["llama-moe-q8_0"]), out["plain"], progress=False)
    return out


def greedy(engine: Engine, n_predict: int = N_PREDICT) -> tuple[list[int], np.ndarray]:
    return greedy_tokens(engine, PROMPT, n_predict)


# shadow files ------------------------------------------------------------------------------------
def test_shadow_files_are_listed_and_verified(models: dict[str, Path]) -> None:
    m = load_manifest(models["f32"])
    assert m.shadow == {"type": "q8_0", "file": "shadow-q8_0.gguf", "trunk_type": "q8_0", "trunk_file": "shadow-trunk-q8_0.gguf"}
    for rel in ("shadow-q8_0.gguf", "shadow-trunk-q8_0.gguf"):
        assert m.files[rel].size == (models["f32"] / rel).stat().st_size
    assert verify_model_dir(models["f32"]) == []
    assert "shadow" not in json.loads((models["plain"] / "manifest.json").read_text())
    shadow = open_gguf(models["f32"] / "shadow-q8_0.gguf")
    meta = metadata(shadow)
    assert meta["edgemoe.role"] == "shadow" and meta["edgemoe.shadow.type"] == "q8_0"
    names = [t.name for t in shadow.tensors]
    assert names == [f"blk.{l}.ffn_{p}_exps.weight" for l in range(4) for p in ("gate", "up", "down")]
    assert all(t.tensor_type == Q.Q8_0 for t in shadow.tensors)
    trunk = {t.name: t for t in open_gguf(models["f32"] / "shadow-trunk-q8_0.gguf").tensors}
    assert trunk["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert trunk["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # routers and norms stay as they are
    assert trunk["blk.0.attn_norm.weight"].tensor_type == Q.F32
    # a damaged shadow file is caught like any other
    p = models["f32"] / "shadow-q8_0.gguf"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    damaged = models["f32"].parent / "damaged"
    damaged.mkdir()
    for f in models["f32"].iterdir():
        if f.is_file():
            (damaged / f.name).write_bytes(data if f.name == p.name else f.read_bytes())
    (damaged / "experts").symlink_to(models["f32"] / "experts")
    problems = verify_model_dir(damaged)
    assert len(problems) == 1 and problems[0].startswith("shadow-q8_0.gguf: sha256")


# the largest relative error each type may add to Gaussian weights
_TOLERANCE = {"f16": 1e-3, "q8_0": 0.01, "q6_k": 0.03, "q5_k": 0.05, "q5_0": 0.06, "q4_k": 0.1, "iq4_nl": 0.11,
              "q4_0": 0.12, "q3_k": 0.2, "q2_k": 0.4}


@pytest.mark.parametrize("shadow_type", list(_TOLERANCE))
def test_requantized_experts_dequantize_close_to_the_source(tmp_path: Path, shadow_type: str) -> None:
    src = write_moe(tmp_path / "m.gguf", n_embd=256, n_ff=256, n_layers=2, n_experts=4, qtype=Q.Q8_0)
    out = tmp_path / "out"
    write_model(plan_conversion(src, shadow_type=shadow_type), out, progress=False)
    source = {t.name: t for t in open_gguf(src).tensors}
    shadow = open_gguf(out / f"shadow-{shadow_type}.gguf")
    assert len(shadow.tensors) == 2 * 3
    for t in shadow.tensors:
        s = source[t.name]
        assert list(t.shape) == list(s.shape) and t.tensor_type.name.lower() == shadow_type
        a = dequantize(s.data, s.tensor_type).reshape(-1)
        b = dequantize(t.data, t.tensor_type).reshape(-1)
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert err < _TOLERANCE[shadow_type], (t.name, err)
        assert err > 0 or shadow_type in ("q8_0", "f16")


@pytest.mark.parametrize("weighted", [False, True])
def test_copies_of_an_expert_are_requantized_once(monkeypatch: pytest.MonkeyPatch, weighted: bool) -> None:
    """An upcycled layer's identical experts (same bytes, same importance) are quantized once and the
    copy is byte for byte what quantizing each again gives; a copy with other importance is not reused."""
    from edgemoe.convert import requant

    rng = np.random.default_rng(0)
    n_per_row, rows = 256, 48
    a, b = (requant.requantize_rows(rng.standard_normal((rows, n_per_row)).astype(np.float32), Q.Q8_0) for _ in range(2))
    raw = np.concatenate([a, b, a, a]).reshape(-1)  # experts 0, 2, 3 are copies
    w = [rng.uniform(0.5, 2, n_per_row).astype(np.float32) for _ in range(2)]
    importance = [w[0], w[0], w[0], w[1]] if weighted else None  # weighted: expert 3 differs from 0 by its weighting
    ne = (n_per_row, rows, 4)
    per_expert = [requant.requantize_rows(requant.dequantize_rows(x, Q.Q8_0, n_per_row), Q.Q4_K,
                                          importance[i] if importance else None) for i, x in enumerate([a, b, a, a])]
    calls: list[int] = []
    real = requant.requantize_rows
    monkeypatch.setattr(requant, "requantize_rows", lambda r, t, imp=None: calls.append(len(r)) or real(r, t, imp))
    monkeypatch.setattr(requant, "_CHUNK_FLOATS", 16 * n_per_row)  # 3 chunks per expert
    out = b"".join(np.ascontiguousarray(c).tobytes() for c in requant.requantized_chunks(raw, Q.Q8_0, ne, Q.Q4_K, importance))
    assert out == b"".join(p.tobytes() for p in per_expert)
    assert sum(calls) == rows * (3 if weighted else 2)  # expert 2 (and unweighted 3) copied from expert 0


def test_impossible_shadow_types_are_user_errors(tmp_path: Path) -> None:
    src = write_moe(tmp_path / "m.gguf", n_embd=64, n_ff=96)  # rows of 64 and 96: no K-quant fits
    before = sorted(os.listdir(tmp_path))
    cases = [
        (["--shadow-type", "q4_k"], ["blk.0.ffn_gate_exps.weight", "q4_k", "256", "q8_0"]),
        (["--shadow-type", "q2_k"], ["multiple of 256", "types that work for this model: f16, q8_0, q5_0, iq4_nl, q4_0"]),
        (["--shadow-type", "q5_1"], ["unknown type", "q4_k"]),
        (["--shadow-trunk-type", "q8_0"], ["needs --shadow-type"]),
        (["--shadow-fallback-type", "iq4_nl"], ["needs --shadow-type"]),
        (["--shadow-type", "q4_k", "--shadow-fallback-type", "q2_k"], ["--shadow-fallback-type q2_k", "rows of 64"]),
    ]
    for extra, phrases in cases:
        r = edgemoe("convert", str(src), str(tmp_path / "out"), *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (extra, r.stderr)
        for phrase in phrases:
            assert phrase in lines[0], (extra, phrase, lines[0])
        assert sorted(os.listdir(tmp_path)) == before
    r = edgemoe("convert", str(src), str(tmp_path / "ok"), "--shadow-type", "q8_0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_manifest(tmp_path / "ok").shadow["type"] == "q8_0"


def test_fallback_type_takes_the_rows_a_k_quant_cannot(tmp_path: Path) -> None:
    """As llama.cpp's quantizer falls back, but asked for: gate/up (rows of 64) IQ4_NL, down (rows of 256) Q4_K."""
    src = write_moe(tmp_path / "m.gguf", n_embd=64, n_ff=256)
    r = edgemoe("convert", str(src), str(tmp_path / "no"), "--shadow-type", "q4_k")
    assert r.returncode == 2 and "or keep q4_k where it fits with --shadow-fallback-type iq4_nl" in r.stderr, r.stderr
    r = edgemoe("convert", str(src), str(tmp_path / "out"), "--shadow-type", "q4_k", "--shadow-fallback-type", "iq4_nl",
                "--quiet")
    assert r.returncode == 0, r.stderr
    shadow = load_manifest(tmp_path / "out").shadow
    assert shadow["type"] == "q4_k" and shadow["fallback_type"] == "iq4_nl" and shadow["file"] == "shadow-q4_k.gguf"
    reader = open_gguf(tmp_path / "out" / shadow["file"])
    types = {t.name.split(".")[2]: t.tensor_type.name for t in reader.tensors}
    assert types == {"ffn_gate_exps": "IQ4_NL", "ffn_up_exps": "IQ4_NL", "ffn_down_exps": "Q4_K"}
    assert metadata(reader)["edgemoe.shadow.fallback_type"] == "iq4_nl"
    assert not verify_model_dir(tmp_path / "out")
    # where every row fits, the fallback is not used and not recorded
    r = edgemoe("convert", str(src), str(tmp_path / "fits"), "--shadow-type", "q8_0", "--shadow-fallback-type", "iq4_nl",
                "--quiet")
    assert r.returncode == 0 and "fallback_type" not in load_manifest(tmp_path / "fits").shadow


# exactness on a cluster ----------------------------------------------------------------------------
def test_tokens_identical_on_a_cluster_under_every_predictor(models: dict[str, Path]) -> None:
    model = models["f32"]
    with Engine(model, n_ctx=256, n_threads=1) as engine:
        want_tokens, want_logits = greedy(engine)
    specs = ["shadow", *(p for p in PREDICTORS if p != "shadow"), "shadow@T0KV0", "shadow@T1KV0", "shadow@T0KV1", "shadow@T2KV3", "reanchor@T0KV0@d2", "reanchor@d3"]
    # residency off: with every expert resident nothing would be predicted (see the next test)
    with open_engine(model, ClusterOptions(workers=2, predictor="shadow", residency="off"), n_ctx=256, n_threads=1) as engine:
        cluster = engine.experts
        for spec in specs:
            if spec != "shadow":  # one cluster, predictors swapped in as open_engine builds them
                cluster.predictor.close()
                cluster.predictor = make_predictor(spec, engine.cfg, engine.weights, engine.moe_layers, depth=1,
                                                   main=engine, options=PredictorOptions(shadow_trunk=spec == "reanchor"))
            before = cluster.recall.correct
            tokens, logits = greedy(engine)
            assert tokens == want_tokens, spec
            assert np.array_equal(logits, want_logits), spec
            if spec.startswith(("shadow", "reanchor")):  # it runs behind the main model: let its last token finish
                assert cluster.predictor.settle()
            stats = cluster.predictor.stats()
            if spec.startswith(("shadow", "reanchor")):
                assert stats["failures"] == 0 and stats["tokens"] + stats["skipped"] == N_PREDICT - 1, (spec, stats)
                assert stats["late_start_ms"]["n"] == stats["tokens"]
                assert cluster.recall.correct > before, spec  # some predictions arrived in time
        assert engine.hooks == [cluster, cluster.predictor]  # swapped-out shadows unhooked themselves


def test_shadow_rests_while_every_expert_is_resident(models: dict[str, Path]) -> None:
    """No prediction can change a load when the placement holds every expert: the shadow skips its
    decode work (and the answer is the same); it resumes once a worker is lost."""
    model = models["f32"]
    with Engine(model, n_ctx=256, n_threads=1) as engine:
        want_tokens, want_logits = greedy(engine)
    with open_engine(model, ClusterOptions(workers=2, predictor="shadow"), n_ctx=256, n_threads=1) as engine:
        cluster = engine.experts
        assert len(cluster.placement) == len(cluster._sizes) and cluster.predictor.idle
        tokens, logits = greedy(engine)
        stats = cluster.predictor.stats()
        assert stats["tokens"] == 0 and stats["skipped"] == N_PREDICT - 1, stats
        assert tokens == want_tokens and np.array_equal(logits, want_logits)
        survivor = cluster.live_workers()[1]
        cluster._lost(cluster.live_workers()[0], "left (test)")  # re-planned: the survivor's budget holds them all
        assert all(w is survivor for w in cluster.placement.values()) and len(cluster.placement) == len(cluster._sizes)
        assert cluster.predictor.idle


def test_shadow_trunk_on_a_cluster_and_missing_shadow_files(models: dict[str, Path]) -> None:
    with Engine(models["f32"], n_ctx=256, n_threads=1) as engine:
        want = greedy(engine)[0]
    opts = ClusterOptions(workers=1, predictor="reanchor@T2KV2", shadow_trunk=True)
    with open_engine(models["f32"], opts, n_ctx=256, n_threads=1) as engine:
        assert greedy(engine)[0] == want
        assert engine.experts.predictor.stats()["shadow_trunk"] == "q8_0"
    with pytest.raises(UserError, match="--shadow-type"):
        with open_engine(models["plain"], ClusterOptions(workers=1, predictor="shadow"), n_ctx=256, n_threads=1):
            pass
    with pytest.raises(UserError, match="--shadow-trunk-type"):
        with open_engine(models["q8"], ClusterOptions(workers=1, predictor="shadow", shadow_trunk=True), n_ctx=256, n_threads=1):
            pass
    with pytest.raises(UserError, match="not an option of shadow"):
        make_predictor("shadow@T1", None, None, [0], 1)


def test_shadow_follows_a_rewinding_main_model(models: dict[str, Path]) -> None:
    """An identical shadow (q8_0 of a q8_0 model) predicts the main routing exactly, also after the main
    model truncates its cache (chat reuses a prefix) and starts over."""
    with Engine(models["q8"], n_ctx=256, n_threads=1) as main:
        pred = make_predictor("shadow@T1KV3", main.cfg, main.weights, main.moe_layers, depth=4, main=main,
                              options=PredictorOptions(sync=True))
        try:
            def decode(tokens: list[int]) -> None:
                for t in tokens:
                    main.eval([t])
                    got = pred.begin_token(0)
                    assert got == {l: [int(e) for e in main.routing[l][0]] for l in main.moe_layers}

            main.eval(PROMPT)
            decode([5, 17, 300, 42])
            main.truncate(len(PROMPT) + 1)
            decode([99, 100])
            main.eval([7, 8, 9])  # a new turn: a prefill after decode
            decode([11, 12])
            main.reset()
            main.eval(PROMPT[:4])
            decode([1, 2, 3])
            st = pred.stats()
            assert st["failures"] == 0 and st["prefills"] == 3 and st["tokens"] == 11
        finally:
            pred.close()
        assert main.hooks == []


# recall -------------------------------------------------------------------------------------------
def test_recall_shadow_beats_random_and_alignment_matters(models: dict[str, Path]) -> None:
    specs = ["random", "previous", "frequency", "lookahead", "shadow", "shadow@T0KV0", "reanchor"]
    r = bench_recall(models["f32"], PROMPTS, n_predict=8, predictors=specs, options=PredictorOptions())
    rec = {s: r.predictors[s]["recall"] for s in specs}
    assert 0.1 < rec["random"] < 0.4, rec
    assert rec["shadow"] > 0.85 and rec["shadow"] > rec["random"] + 0.4, rec
    assert rec["shadow"] > rec["shadow@T0KV0"], rec
    assert rec["reanchor"] >= rec["shadow"] - 0.02, rec
    for s in specs:
        p = r.predictors[s]
        assert len(p["by_token"]) == 8 and len(p["by_layer"]) == 4 and set(p["by_lead"]) <= {1, 2, 3, 4}
        assert p["by_lead"][1] == pytest.approx(p["recall"])
        assert np.mean(p["by_token"]) == pytest.approx(p["recall"])  # every prompt has every step
    st = r.predictors["shadow"]["stats"]
    assert st["late_start_ms"]["n"] == 3 * 8 and st["late_start_ms"]["median"] > 0
    assert r.predictors["reanchor"]["stats"]["reanchor_ms_per_token"]["n"] == 3 * 8
    # an identical shadow is exact, aligned or not
    r = bench_recall(models["q8"], PROMPTS[:2], n_predict=6, predictors=["shadow", "shadow@T0KV0", "reanchor@d2"],
                     options=PredictorOptions())
    assert all(p["recall"] == 1.0 for p in r.predictors.values()), {s: p["recall"] for s, p in r.predictors.items()}


def test_recall_cli_table_json_and_plot(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nHello there, how are\n\nThe capital of France is\n")
    png = tmp_path / "recall.png"
    args = ["bench", "recall", str(models["f32"]), "--prompts", str(prompts), "-n", "4"]
    assert cli_main([*args, "--predictors", "random,shadow,reanchor@d2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for word in ("random", "shadow", "reanchor@d2", "recall", "lead2", "late start", f"plot: {png}"):
        assert word in out, word
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli_main([*args, "--predictors", "previous,frequency", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["prompts"] == 2 and d["n_predict"] == 4 and d["k"] == 2 and d["moe_layers"] == [0, 1, 2, 3]
    assert set(d["predictors"]) == {"previous", "frequency"}
    assert set(d["predictors"]["previous"]) >= {"recall", "by_lead", "by_layer", "by_token", "call_ms_per_token", "stats"}
    # default "all" on a model without shadow files: the shadows are skipped with a reason
    assert cli_main(["bench", "recall", str(models["plain"]), "--prompts", str(prompts), "-n", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(d["skipped"]) == {"shadow", "reanchor"} and "reactive" in d["predictors"]


def test_recall_cli_bad_inputs(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    model = str(models["f32"])
    cases = [
        ([model, "--prompts", str(empty)], "no prompts"),
        ([model, "--prompts", str(tmp_path / "missing.txt")], "no such prompts file"),
        ([model, "--prompts", str(tmp_path)], "cannot read"),
        ([model, "--prompts", str(binary)], "not UTF-8"),
        ([model, "--predictors", "shadow,oracle"], "unknown predictor 'oracle'"),
        ([model, "--predictors", "random@T1KV1"], "not an option of random"),
        ([model, "-n", "0"], "--n-predict"),
        ([model, "--plot", str(tmp_path / "x.jpg")], "PNG"),
        ([str(models["plain"]), "--predictors", "shadow"], "--shadow-type"),
        ([str(tmp_path)], "manifest"),
    ]
    for args, phrase in cases:
        assert cli_main(["bench", "recall", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and phrase in err[0], (args, err)
