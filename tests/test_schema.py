"""edgemoe.format.schema: gguf-py's names give llama.cpp's tensor names, architectures and types; and no
file outside it spells a tensor-name template (an AST scan of edgemoe/ and tools/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from edgemoe.format.gguf_io import open_gguf
from edgemoe.format.schema import (MODEL_ARCH, GGMLQuantizationType, T, arch_name, block_size, expert_tensor_name,
                                   is_shared_expert_tensor, layer_of, parse_expert_tensor, row_nbytes, tensor_name)
from edgemoe.ggml import GGMLType

REPO = Path(__file__).resolve().parent.parent


def test_names_are_llama_cpps() -> None:
    assert tensor_name(T.FFN_NORM, 3) == "blk.3.ffn_norm.weight"
    assert tensor_name(T.FFN_EXP_PROBS_B, 12, "bias") == "blk.12.exp_probs_b.bias"
    assert tensor_name(T.OUTPUT) == "output.weight" and tensor_name(T.TOKEN_EMBD, suffix="") == "token_embd"
    assert expert_tensor_name(0, "gate_up") == "blk.0.ffn_gate_up_exps.weight"
    assert expert_tensor_name(7, "down", "bias") == "blk.7.ffn_down_exps.bias"
    with pytest.raises(ValueError):
        tensor_name(T.FFN_NORM)  # per-layer: needs its layer
    with pytest.raises(ValueError):
        tensor_name(T.OUTPUT, 0)
    assert [arch_name(a) for a in (MODEL_ARCH.LLAMA, MODEL_ARCH.QWEN2MOE, MODEL_ARCH.GRANITE_MOE, MODEL_ARCH.ERNIE4_5_MOE)] == [
        "llama", "qwen2moe", "granitemoe", "ernie4_5-moe"]


def test_parsing_names() -> None:
    assert parse_expert_tensor("blk.3.ffn_up_exps.weight") == (3, "up", "weight")
    assert parse_expert_tensor("blk.10.ffn_gate_up_exps.bias") == (10, "gate_up", "bias")
    for trunk in ("blk.3.ffn_up.weight", "blk.3.ffn_up_shexp.weight", "blk.3.ffn_gate_inp.weight", "output.weight",
                  "blk.3.ffn_up_exps.scale", "xblk.3.ffn_up_exps.weight"):
        assert parse_expert_tensor(trunk) is None, trunk
    assert is_shared_expert_tensor("blk.1.ffn_down_shexp.weight") and not is_shared_expert_tensor("blk.1.ffn_gate_inp_shexp.weight")
    assert layer_of("blk.7.attn_q.weight") == 7 and layer_of("output_norm.weight") is None and layer_of("blkx.7.a") is None


def test_types_are_ggmls() -> None:
    assert GGMLType is GGMLQuantizationType  # one enum: gguf-py's
    assert (int(GGMLType.Q8_0), int(GGMLType.I32), int(GGMLType.BF16)) == (8, 26, 30)
    assert block_size(GGMLType.Q4_K) == 256 and row_nbytes(GGMLType.Q8_0, 64) == 68 and row_nbytes(GGMLType.F32, 3) == 12


def test_every_fixture_tensor_parses(fixture_models: list[Path]) -> None:
    """Every tensor llama.cpp's layout gives the test models: its layer, and its routed experts found in each MoE layer."""
    for path in fixture_models:
        names = [t.name for t in open_gguf(path).tensors]
        for n in names:
            m = re.match(r"^blk\.(\d+)\.", n)
            assert layer_of(n) == (int(m.group(1)) if m else None), n
            e = parse_expert_tensor(n)
            assert (e is not None) == bool(re.match(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$", n)), n
        assert {e[0] for n in names if (e := parse_expert_tensor(n))}, path


# Files that still spell tensor names of their own, and why (each is a debt, not a licence):
PENDING = {
    # shard *file* names (experts/blk.LLL.expert.EEE.gguf: edgemoe's own layout, not a tensor name): their
    # home is ExpertId.file_name in format/shard.py; experts.py globs them and the convert CLI prints the pattern
    "edgemoe/format/shard.py", "edgemoe/model/experts.py", "edgemoe/cli/convert.py",
}
_TEMPLATE = re.compile(r"(^|[^a-z])blk\.(\{|\d|\\|[A-Z]+\.|<)")


def spelled_templates(source: str) -> list[int]:
    """Lines of string constants and f-strings (not docstrings or comments) that spell a `blk.` tensor name."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and id(node) not in docs:
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
        else:
            continue
        if _TEMPLATE.search(text.replace("\\.", ".")) or _TEMPLATE.search(text):
            lines.add(node.lineno)
    return sorted(lines)


def test_the_scan_finds_templates() -> None:
    src = '"""blk.N.ffn_up_exps.weight in a docstring"""\nimport re\nA = f"blk.{il}.ffn_norm.weight"\nB = "blk.0.attn_q.weight"\n' \
          'C = re.compile(rb"^blk\\.\\d+\\.ffn")\nD = "experts/blk.LLL.expert.EEE.gguf"\nE = "blkx"  # blk.3 in a comment\n'
    assert spelled_templates(src) == [3, 4, 5, 6]


def test_no_file_outside_the_schema_spells_a_tensor_name() -> None:
    found = {}
    for top in ("edgemoe", "tools"):
        for p in sorted((REPO / top).rglob("*.py")):
            rel = str(p.relative_to(REPO))
            if rel != "edgemoe/format/schema.py" and rel not in PENDING and (lines := spelled_templates(p.read_text())):
                found[rel] = lines
    assert found == {}


def test_gguf_types_are_the_librarys() -> None:
    """gguf-py's enum and block sizes are those of the ggml edgemoe loads, for every type both know."""
    from gguf import GGML_QUANT_SIZES

    from edgemoe.ggml import lib

    differ = {t.name for t, (bs, ts) in GGML_QUANT_SIZES.items()
              if (lib.ggml_blck_size(int(t)), lib.ggml_type_size(int(t))) != (bs, ts)}
    # gguf-py 0.19 sizes Q8_1 with float scales (40 bytes), ggml's block_q8_1 has half ones (36): a type
    # ggml uses only for dot-product operands, never a tensor's in a file, so nothing edgemoe sizes
    assert differ == {"Q8_1"}
    assert len(GGML_QUANT_SIZES) >= 20
