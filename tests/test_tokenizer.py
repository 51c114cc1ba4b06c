"""edgemoe.model.tokenizer: llama.cpp's tokenizer through a vocab-only load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemoe.errors import UserError
from edgemoe.model.tokenizer import Tokenizer
from edgemoe.oracle import LlamaCppReference

TEXTS = [
    "Hello, world!",
    "héllo wörld 🙂",
    "🦜 漢字 𝔘𝔫𝔦 日本語のテキスト",
    "  leading spaces and\ttabs\nnew lines  ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> in the middle",
    "",
]


@pytest.fixture(scope="module")
def tok(smollm2: Path) -> Iterator[Tokenizer]:
    t = Tokenizer(smollm2)
    yield t
    t.close()


@pytest.fixture(scope="module")
def partial_gguf(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's metadata (minus its chat template) with only one of its tensors, like a trunk
    that lacks most weights."""
    reader = gguf.GGUFReader(smollm2)
    out = tmp_path_factory.mktemp("partial") / "partial.gguf"
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(out, arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.chat_template"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    w.add_tensor("output_norm.weight", np.ones(576, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_tokenize_matches_llama_cpp(smollm2: Path, tok: Tokenizer) -> None:
    with LlamaCppReference(smollm2, n_ctx=32, n_threads=1) as ref:
        for text in TEXTS:
            for add_special in (True, False):
                for parse_special in (True, False):
                    want = ref.tokenize(text, add_special=add_special, parse_special=parse_special)
                    assert tok.tokenize(text, add_special, parse_special) == want, text
        assert tok.n_vocab == ref.n_vocab


def test_special_tokens(tok: Tokenizer) -> None:
    assert tok.n_vocab == 49152
    assert tok.bos is not None and tok.eos is not None
    assert tok.is_eog(tok.eos)
    im_end = tok.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert len(im_end) == 1 and tok.is_eog(im_end[0])
    assert not tok.is_eog(tok.tokenize("hello", add_special=False)[0])
    # Without parse_special the marker is plain text: several ordinary tokens.
    assert len(tok.tokenize("<|im_end|>", add_special=False)) > 1
    # Control tokens render only with special=True.
    assert tok.token_to_piece(im_end[0]) == b""
    assert tok.token_to_piece(im_end[0], special=True) == b"<|im_end|>"
    with pytest.raises(ValueError):
        tok.token_to_piece(tok.n_vocab)


@pytest.mark.parametrize("text", ["héllo wörld 🙂", "🦜 漢字 𝔘𝔫𝔦 日本語のテキスト"])
def test_detokenizer_streams_whole_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.tokenize(text, add_special=False)
    d = tok.detokenizer()
    pieces = [d.push(t) for t in ids]
    assert d.flush() == ""
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)  # no character was ever cut in half
    assert "".join(tok.detokenizer().stream(ids)) == text
    assert tok.detokenize(ids) == text


def test_detokenizer_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.tokenize("🦜", add_special=False)
    assert len(ids) > 1  # the parrot is split over byte tokens
    d = tok.detokenizer()
    assert [d.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.flush() == "\ufffd"


def test_chat_template(tok: Tokenizer) -> None:
    assert tok.chat_template is not None and "im_start" in tok.chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    s = tok.apply_chat_template(msgs)
    assert "<|im_start|>user\nHi 🙂<|im_end|>" in s
    assert s.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert s.endswith("<|im_start|>assistant\n")
    s2 = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert s2.endswith("<|im_end|>\n") and not s2.endswith("assistant\n")
    long = [{"role": "user", "content": "x" * 5000}]  # output longer than the first buffer guess
    assert tok.apply_chat_template(long).count("x") == 5000


def test_unknown_chat_template(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tokenizer, "chat_template", property(lambda self: "{{ no known format }}"))
    with pytest.raises(UserError, match="does not recognise"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_partial_gguf(partial_gguf: Path, tok: Tokenizer) -> None:
    with Tokenizer(partial_gguf) as t:
        for text in TEXTS:
            assert t.tokenize(text, parse_special=True) == tok.tokenize(text, parse_special=True)
        assert (t.bos, t.eos, t.n_vocab) == (tok.bos, tok.eos, tok.n_vocab)
        assert t.chat_template is None
        with pytest.raises(UserError, match="no chat template"):
            t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        Tokenizer(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError):
        Tokenizer(bad)
