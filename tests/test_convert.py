"""The converter: byte-exact round trip, metadata carried over, atomic output, every bad input refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from edgemoe.errors import UserError
from edgemoe.format import keys
from edgemoe.format.gguf_io import metadata, open_gguf, tensor_bytes
from edgemoe.format.manifest import expert_file_name, load_manifest, verify_model_dir
from tests.cli import edgemoe
from tests.synthetic import write_moe
from edgemoe.convert import plan_conversion, write_model
from edgemoe.convert import write as write_mod



def assert_roundtrip(src: Path, out: Path) -> None:
    """Trunk holds every other tensor and key unchanged; experts re-stack to the source bytes."""
    source = open_gguf(src)
    trunk = open_gguf(out / "trunk.gguf")
    manifest = load_manifest(out)
    n_exp = manifest.n_experts

    src_meta, trunk_meta = metadata(source), metadata(trunk)
    for k, v in src_meta.items():
        assert trunk_meta[k] == v, k
        assert trunk.fields[k].types == source.fields[k].types, k
    assert trunk_meta[keys.ROLE] == "trunk"
    assert trunk_meta[keys.N_EXPERTS] == n_exp

    trunk_tensors = {t.name: t for t in trunk.tensors}
    stacked = {}
    for t in source.tensors:
        if "_exps." in t.name:
            stacked[t.name] = t
            assert t.name not in trunk_tensors
            continue
        tt = trunk_tensors.pop(t.name)
        assert tt.tensor_type == t.tensor_type and list(tt.shape) == list(t.shape), t.name
        assert np.array_equal(tensor_bytes(trunk, tt), tensor_bytes(source, t)), t.name
    assert not trunk_tensors, f"unexpected trunk tensors {list(trunk_tensors)}"
    assert stacked, "source has no expert tensors"

    pieces: dict[str, list[np.ndarray]] = {name: [] for name in stacked}
    for layer in manifest.moe_layers:
        for e in range(n_exp):
            shard = open_gguf(out / expert_file_name(layer, e))
            meta = metadata(shard)
            assert (meta[keys.EXPERT_LAYER], meta[keys.EXPERT_INDEX], meta[keys.ROLE]) == (layer, e, "expert")
            assert meta[keys.SOURCE_SHA256] == manifest.source_sha256
            for t in shard.tensors:
                src_t = stacked[t.name]
                assert t.tensor_type == src_t.tensor_type
                assert list(t.shape) == list(src_t.shape[:-1])
                assert int(t.data_offset) % 32 == 0
                pieces[t.name].append(np.array(tensor_bytes(shard, t)))
    for name, t in stacked.items():
        assert len(pieces[name]) == n_exp, name
        assert np.array_equal(np.concatenate(pieces[name]), tensor_bytes(source, t)), name
    assert verify_model_dir(out) == []


@pytest.mark.parametrize(
    "qtype,fused",
    [(GGMLQuantizationType.F32, False), (GGMLQuantizationType.Q8_0, False), (GGMLQuantizationType.Q4_0, True)],
)
def test_roundtrip_synthetic(tmp_path: Path, qtype: GGMLQuantizationType, fused: bool) -> None:
    src = write_moe(tmp_path / "m.gguf", qtype=qtype, fused=fused)
    write_model(plan_conversion(src), tmp_path / "out", progress=False)
    assert_roundtrip(src, tmp_path / "out")
    assert load_manifest(tmp_path / "out").expert_tensors == (["gate_up", "down"] if fused else ["gate", "up", "down"])
    assert (tmp_path / "out").stat().st_mode & 0o055 == 0o055, "the model directory must be readable by others"


def test_roundtrip_every_test_model(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    for src in fixture_models:
        assert_roundtrip(src, converted_models[src.stem])


def test_convert_cli_on_a_test_model(fixture_models: list[Path], tmp_path: Path) -> None:
    src = next(p for p in fixture_models if p.stem == "qwen2moe-q4_k_m")
    r = edgemoe("convert", str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "32 expert shards" in r.stdout
    assert edgemoe("convert", "--quiet", "--verify", str(tmp_path / "out")).returncode == 0


def test_manifest_lists_every_file(tmp_path: Path) -> None:
    src = write_moe(tmp_path / "m.gguf", n_layers=3, n_experts=5)
    write_model(plan_conversion(src), tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    on_disk = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.gguf")}
    assert set(m["files"]) == on_disk and len(on_disk) == 1 + 3 * 5
    assert (m["n_layers"], m["n_experts"], m["n_experts_used"], m["architecture"]) == (3, 5, 2, "llama")
    for rel, entry in m["files"].items():
        assert entry["size"] == (tmp_path / "out" / rel).stat().st_size


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = write_moe(tmp_path / "m.gguf")
    r = edgemoe("convert", "--dry-run", str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "trunk.gguf" in r.stdout and "x 8" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_verify_reports_each_mismatch(tmp_path: Path) -> None:
    src = write_moe(tmp_path / "m.gguf")
    out = tmp_path / "out"
    assert edgemoe("convert", "--quiet", str(src), str(out)).returncode == 0
    r = edgemoe("convert", "--verify", str(out))
    assert r.returncode == 0 and "all 9 files match" in r.stdout

    corrupt = out / expert_file_name(1, 2)
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (out / expert_file_name(0, 3)).unlink()
    r = edgemoe("convert", "--verify", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any("blk.001.expert.002.gguf: sha256" in line for line in lines)
    assert any("blk.000.expert.003.gguf: missing" in line for line in lines)
    assert lines[-1].startswith("error:") and "2 of 9 files" in lines[-1]
    assert "Traceback" not in r.stderr


def test_force_replaces_existing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    src = write_moe(tmp_path / "m.gguf")
    r = edgemoe("convert", "--quiet", "--force", str(src), str(out))
    assert r.returncode == 0, r.stderr
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "out"]


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_moe(tmp_path / "m.gguf")
    calls = []
    real = write_mod._write_expert

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(write_mod, "_write_expert", failing)
    with pytest.raises(KeyboardInterrupt):
        write_model(plan_conversion(src), tmp_path / "new" / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source file, a phrase the error line must contain)."""
    good = write_moe(tmp_path / "good.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:100])
    return {
        "missing": (tmp_path / "nope.gguf", "no such file"),
        "not-gguf": (not_gguf, "not a GGUF file"),
        "truncated": (truncated, "truncated"),
        "header-only": (header_only, "GGUF file"),
        "dense": (write_moe(tmp_path / "dense.gguf", with_experts=False), "dense model"),
        "unsupported-arch": (write_moe(tmp_path / "gpt.gguf", arch="gptmoe"), "unsupported architecture 'gptmoe' (supported: "),
        # llama.cpp's granitemoe loader has no fused gate_up experts; an expert weight must be a type
        # ggml multiplies; experts of these architectures have no biases
        "fused-granitemoe": (write_moe(tmp_path / "granite.gguf", arch="granitemoe", fused=True),
                             "layer 0 has expert tensors [ffn_down_exps, ffn_gate_up_exps]; granitemoe needs "
                             "{ffn_down_exps, ffn_gate_exps, ffn_up_exps}"),
        "integer-experts": (write_moe(tmp_path / "int.gguf", arch="ernie4_5-moe", int8_tensor="blk.1.ffn_up_exps.weight"),
                            "tensor blk.1.ffn_up_exps.weight has type I8, which ernie4_5-moe expert weights cannot have"),
        "expert-bias": (write_moe(tmp_path / "bias.gguf", arch="granitemoe", expert_bias="up"),
                        "tensor blk.0.ffn_up_exps.bias: granitemoe has no expert biases"),
        "ernie-layer-rule": (write_moe(tmp_path / "ernie2.gguf", arch="ernie4_5-moe", meta_u32={"interleave_moe_layer_step": 2}),
                             "layers [0, 1] have experts, but ernie4_5-moe's metadata (leading_dense_block_count 0, "
                             "interleave_moe_layer_step 2) makes [1] MoE layers"),
        "ernie-dense-lead": (write_moe(tmp_path / "ernie3.gguf", arch="ernie4_5-moe",
                                       meta_u32={"leading_dense_block_count": 1, "interleave_moe_layer_step": 1}),
                             "layer 0 has expert tensors (blk.0.ffn_gate_exps.weight), but "
                             "ernie4_5-moe.leading_dense_block_count makes layers 0-0 dense"),
        "ernie-missing-experts": (write_moe(tmp_path / "ernie.gguf", arch="ernie4_5-moe", skip_tensor="blk.1.ffn_gate_exps.weight"),
                                  "layer 1 has expert tensors [ffn_down_exps, ffn_up_exps]; ernie4_5-moe needs"),
        "missing-expert": (
            write_moe(tmp_path / "missing.gguf", skip_tensor="blk.1.ffn_up_exps.weight"),
            "layer 1 has expert tensors [ffn_down_exps, ffn_gate_exps]",
        ),
        "misshaped-expert": (
            write_moe(tmp_path / "shape.gguf", bad_shape_tensor="blk.0.ffn_down_exps.weight"),
            "blk.0.ffn_down_exps.weight has shape",
        ),
        "misshaped-gate": (
            write_moe(tmp_path / "shape2.gguf", bad_shape_tensor="blk.1.ffn_gate_exps.weight"),
            "blk.1.ffn_gate_exps.weight has shape",
        ),
    }


def test_bad_inputs_are_refused_cleanly(tmp_path: Path) -> None:
    for name, (src, phrase) in _bad_inputs(tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        r = edgemoe("convert", str(src), str(tmp_path / "out" / name))
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, r.stderr)
        assert phrase in lines[0], (name, lines[0])
        assert sorted(os.listdir(tmp_path)) == before, name


def test_unsupported_architecture_lists_every_supported_one(tmp_path: Path) -> None:
    from edgemoe.format.arch import ARCHITECTURES

    with pytest.raises(UserError) as e:
        plan_conversion(write_moe(tmp_path / "m.gguf", arch="gptmoe"))
    listed = str(e.value).split("(supported: ", 1)[1].rstrip(")").split(", ")
    assert listed == sorted(ARCHITECTURES) and {"granitemoe", "ernie4_5-moe"} <= set(listed)


def test_existing_out_dir_refused_without_force(tmp_path: Path) -> None:
    src = write_moe(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = edgemoe("convert", str(src), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--force" in r.stderr
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_verify_of_non_model_dir(tmp_path: Path) -> None:
    r = edgemoe("convert", "--verify", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "manifest.json" in r.stderr


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["convert"], ["convert", "--verify", str(tmp_path), "x.gguf"], ["frobnicate"]):
        r = edgemoe(*args)
        assert r.returncode == 2, args
        assert r.stderr.strip().splitlines()[-1].startswith("error:"), (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_help_explains_every_option() -> None:
    r = edgemoe("--help")
    assert r.returncode == 0 and "convert" in r.stdout
    r = edgemoe("convert", "--help")
    assert r.returncode == 0
    for opt in ("--force", "--dry-run", "--verify", "--quiet", "SRC.gguf", "OUT_DIR"):
        assert opt in r.stdout, opt


def test_skimming_reader_gives_the_same_metadata_but_the_vocabulary(fixture_models: list[Path]) -> None:
    """The runtime's reader (open_gguf(skim=True)) reads every value as gguf-py does, numeric arrays in
    one view each, and only the length of long string arrays (a tokenizer's vocabulary and merges)."""
    from edgemoe.format.gguf_io import UnreadArray

    one_per_arch = {metadata(open_gguf(p, skim=True))["general.architecture"]: p for p in fixture_models}
    assert len(one_per_arch) >= 6
    for path in one_per_arch.values():
        full, skim = metadata(open_gguf(path)), metadata(open_gguf(path, skim=True))
        assert full.keys() == skim.keys()
        unread = {k for k, v in skim.items() if isinstance(v, UnreadArray)}
        assert "tokenizer.ggml.tokens" in unread, path
        for k, v in full.items():
            if k in unread:
                assert isinstance(v, list) and len(v) == len(skim[k]) >= 256
                with pytest.raises(TypeError):
                    list(skim[k])
            else:
                assert v == skim[k] and type(v) is type(skim[k]), (path, k)
        assert isinstance(skim["tokenizer.ggml.token_type"], list)  # numeric arrays are read, whatever their length
