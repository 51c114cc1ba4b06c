"""Importance matrices: collected from llama.cpp's own expert activations, written in llama.cpp's
imatrix layout, and used to weight the shadow's requantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from edgemoe.format import keys
from edgemoe.format.gguf_io import get_str, metadata, open_gguf, tensor_ne
from edgemoe.format.imatrix import read_imatrix, write_imatrix
from edgemoe.format.manifest import load_manifest, sha256_file
from edgemoe.llama_runner import LlamaCpp, copy_3d
from tests.cli import edgemoe
from edgemoe.convert import plan_conversion, write_model
from edgemoe.convert.imatrix import collect_imatrix

Q = GGMLQuantizationType
MODEL = "llama-moe-f32"
TEXT = ("The history of the Roman Empire began when a small city on the Tiber grew into a power that ruled the "
        "Mediterranean. Its roads, laws and language outlived it by many centuries, and the scholars of later "
        "ages read its poets, studied its engineering and argued about why it fell.")


@pytest.fixture(scope="module")
def imatrix_file(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = tmp_path_factory.mktemp("im") / "calib.txt"
    text.write_text(TEXT * 6, encoding="utf-8")
    out = text.with_name("m.imatrix.gguf")
    r = edgemoe("imatrix", str(fixtures_dir / f"{MODEL}.gguf"), "--text", str(text), "-o", str(out),
                "--chunk-size", "64", "-t", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


class _Capture(LlamaCpp):
    """llama.cpp with every `NAME-<il>` graph tensor of the given names copied out (as [ne2, ne1, ne0])."""

    def __init__(self, path: Path, names: tuple[str, ...]) -> None:
        self.names = tuple(n.encode() for n in names)
        self.captured: dict[tuple[str, int], np.ndarray] = {}
        super().__init__(path, n_ctx=256, n_threads=1, cb_eval=self._cb)

    def _cb(self, t, ask: bool) -> bool:
        name, _, il = t.name.rpartition(b"-")
        if ask:
            return name in self.names and il.isdigit()
        self.captured[(name.decode(), int(il))] = copy_3d(t)
        return True


def test_sums_and_counts_are_llama_cpps_expert_inputs(fixtures_dir: Path) -> None:
    """One chunk: counts are the router's choices, gate/up sums the squared FFN inputs and down sums
    the squared SwiGLU outputs, all read out of llama.cpp's graph independently (ffn_moe_topk-L,
    ffn_norm-L, ffn_moe_swiglu-L)."""
    src = fixtures_dir / f"{MODEL}.gguf"
    im = collect_imatrix(src, TEXT, dataset="t", chunk_size=256, n_threads=1)
    assert im.chunk_count == 1
    with _Capture(src, ("ffn_norm", "ffn_moe_topk", "ffn_moe_swiglu")) as r:
        tokens = r.tokenize(TEXT, add_special=True)
        r.decode(tokens, 0, logits_all=True)
        n_expert, k, T = r.n_expert, r.n_expert_used, len(tokens)
        for il in range(r.n_layer):
            x = r.captured[("ffn_norm", il)].reshape(T, -1).astype(np.float64)  # [T, n_embd]
            top = r.captured[("ffn_moe_topk", il)].reshape(T, k)
            act = r.captured[("ffn_moe_swiglu", il)].astype(np.float64)  # [T, k, n_ff]: slot j went to top[:, j]
            counts = np.bincount(top.reshape(-1), minlength=n_expert)
            gate_up = np.zeros((n_expert, x.shape[1]))
            down = np.zeros((n_expert, act.shape[2]))
            for j in range(k):
                np.add.at(gate_up, top[:, j], x ** 2)
                np.add.at(down, top[:, j], act[:, j] ** 2)
            for part in ("gate", "up", "down"):
                name = f"blk.{il}.ffn_{part}_exps.weight"
                assert np.array_equal(im.counts[name], counts.astype(np.float32)), name
                want = down if part == "down" else gate_up
                np.testing.assert_allclose(im.sums[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_file_has_llama_cpps_layout_and_round_trips(imatrix_file: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    reader = open_gguf(imatrix_file)
    assert get_str(reader, "general.type") == "imatrix"
    meta = metadata(reader)
    assert meta["imatrix.datasets"] == ["calib.txt"] and meta["imatrix.chunk_size"] == 64 and meta["imatrix.chunk_count"] > 1
    src = {t.name: tensor_ne(t) for t in open_gguf(fixtures_dir / f"{MODEL}.gguf").tensors}
    tensors = {t.name: tensor_ne(t) for t in reader.tensors}
    experts = [n for n in src if "_exps.weight" in n]
    assert sorted(tensors) == sorted([n + ".in_sum2" for n in experts] + [n + ".counts" for n in experts])
    for n in experts:
        n_per_row, n_expert = src[n][0], src[n][2]
        assert tensors[n + ".in_sum2"] == (n_per_row, n_expert) and tensors[n + ".counts"] == (1, n_expert)
    im = read_imatrix(imatrix_file)
    write_imatrix(tmp_path / "again.gguf", im, "llama")
    again = read_imatrix(tmp_path / "again.gguf")
    assert again.datasets == im.datasets and (again.chunk_count, again.chunk_size) == (im.chunk_count, im.chunk_size)
    for n in im.sums:
        assert np.array_equal(again.sums[n], im.sums[n]) and np.array_equal(again.counts[n], im.counts[n])


@pytest.mark.parametrize("shadow_type", ["q4_0", "iq4_nl"])
def test_weighted_shadow_keeps_important_columns_closer(imatrix_file: Path, fixtures_dir: Path, tmp_path: Path,
                                                        shadow_type: str) -> None:
    src = fixtures_dir / f"{MODEL}.gguf"
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    write_model(plan_conversion(src, shadow_type=shadow_type), plain, progress=False)
    write_model(plan_conversion(src, shadow_type=shadow_type, shadow_imatrix=imatrix_file), weighted, progress=False)
    im = read_imatrix(imatrix_file)
    source = {t.name: t for t in open_gguf(src).tensors}
    shadows = [{t.name: t for t in open_gguf(d / f"shadow-{shadow_type}.gguf").tensors} for d in (plain, weighted)]
    better = 0
    for name, s in source.items():
        if "_exps.weight" not in name:
            continue
        ne = tensor_ne(s)
        w = dequantize(s.data, s.tensor_type).reshape(ne[2], ne[1], ne[0])
        imp = im.sums[name] / np.maximum(im.counts[name], 1)[:, None]  # [n_expert, n_per_row]
        err = [float((((dequantize(sh[name].data, sh[name].tensor_type).reshape(w.shape) - w) ** 2).sum(axis=1) * imp).sum())
               for sh in shadows]
        better += err[1] < err[0]
    assert better == 3 * 4  # every expert tensor of every layer: gate, up, down x 4 layers
    m = load_manifest(weighted)
    assert m.shadow["imatrix_sha256"] == sha256_file(imatrix_file)
    assert metadata(open_gguf(weighted / m.shadow["file"]))[keys.SHADOW_IMATRIX] == sha256_file(imatrix_file)
    assert "imatrix_sha256" not in json.loads((plain / "manifest.json").read_text())["shadow"]


def test_bad_inputs_are_one_line_errors(imatrix_file: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    src = str(fixtures_dir / f"{MODEL}.gguf")
    other = str(fixtures_dir / "olmoe-f32.gguf")  # experts of another width: the imatrix does not fit
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    cases = [
        (["imatrix", src, "--text", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "a.gguf")], "no such calibration text"),
        (["imatrix", src, "--text", str(empty), "-o", str(tmp_path / "a.gguf")], "calibration text is empty"),
        (["imatrix", src, "--text", str(latin1), "-o", str(tmp_path / "a.gguf")], "not UTF-8"),
        (["imatrix", src, "--text", str(empty), "-o", str(tmp_path)], "is a directory"),
        (["convert", src, str(out), "--shadow-imatrix", str(imatrix_file)], "needs --shadow-type"),
        (["convert", src, str(out), "--shadow-type", "q4_0", "--shadow-imatrix", src], "not an importance matrix"),
        (["convert", other, str(out), "--shadow-type", "q4_0", "--shadow-imatrix", str(imatrix_file)], "matrices of"),
    ]
    for args, phrase in cases:
        r = edgemoe(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "latin1.txt"]  # nothing written
