"""Tokenizer over a GGUF file: llama.cpp's own vocabulary code through a vocab-only load.

A vocab-only load reads the metadata and never looks at tensors, so it works on a trunk GGUF
(which lacks the routed experts) exactly as on the source model.
"""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Iterable, Iterator

import llama_cpp

from edgemoe.errors import UserError
from edgemoe.util.llamacpp import load_model, model_params, token_to_piece, tokenize
from edgemoe.util.resource import Owned

LLAMA_TOKEN_NULL = -1


class Tokenizer(Owned):
    """Text <-> token ids, EOG tests and chat templates of one GGUF model."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self._model: int | None = None
        self._model = load_model(model_path, model_params(vocab_only=True))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.path = os.fspath(model_path)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the (vocab-only) model (idempotent)."""
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


    # -- tokens ----------------------------------------------------------------------------------

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence token id, or None if the vocabulary has none."""
        t = llama_cpp.llama_vocab_bos(self._vocab)
        return None if t == LLAMA_TOKEN_NULL else int(t)

    @property
    def eos(self) -> int | None:
        """End-of-sequence token id, or None if the vocabulary has none."""
        t = llama_cpp.llama_vocab_eos(self._vocab)
        return None if t == LLAMA_TOKEN_NULL else int(t)

    def is_eog(self, tok: int) -> bool:
        """Whether tok ends generation (EOS, EOT, <|im_end|>, ... as llama.cpp decides)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, tok))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Exactly llama_tokenize: add_special adds BOS/EOS as the model asks, parse_special
        turns special-token text such as "<|im_start|>" into its id."""
        return tokenize(self._vocab, text, add_special, parse_special)

    def token_to_piece(self, tok: int, special: bool = False) -> bytes:
        """Raw bytes of one token; may be part of a multi-byte UTF-8 character. special=True
        renders control tokens (e.g. b"<|im_end|>") instead of dropping them."""
        if not 0 <= tok < self.n_vocab:
            # llama.cpp indexes its token table unchecked (std::vector::at throws across C).
            raise ValueError(f"token id {tok} out of range [0, {self.n_vocab})")
        return token_to_piece(self._vocab, tok, special)

    def detokenize(self, tokens: Iterable[int], special: bool = False) -> str:
        """Concatenated pieces of tokens decoded as UTF-8 (invalid bytes become U+FFFD)."""
        return b"".join(self.token_to_piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def detokenizer(self, special: bool = False) -> Detokenizer:
        """A fresh streaming detokenizer over this vocabulary."""
        return Detokenizer(self, special=special)

    # -- chat templates --------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template (GGUF `tokenizer.chat_template`), or None."""
        t = llama_cpp.llama_model_chat_template(self._model, None)
        return t.decode("utf-8") if t else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Format a chat with the model's template through llama_chat_apply_template.

        llama.cpp does not run Jinja: it recognises the template among its built-in formats
        (chatml, llama3, ...) and formats messages itself.
        """
        tmpl = self.chat_template
        if tmpl is None:
            raise UserError(f"{self.path} has no chat template (tokenizer.chat_template); use a raw prompt")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"chat message needs string 'role' and 'content': {m!r}")
        # The byte strings must outlive the call: the structs only hold pointers into them.
        keep = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
        chat = (llama_cpp.llama_chat_message * max(len(keep), 1))()
        for i, (role, content) in enumerate(keep):
            chat[i].role = role
            chat[i].content = content
        tmpl_b = tmpl.encode("utf-8")
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl_b, chat, len(keep), add_generation_prompt, buf, size)
            if n < 0:
                raise UserError(
                    f"llama.cpp does not recognise the chat template of {self.path} (it only knows "
                    "its built-in formats, not arbitrary Jinja); use a raw prompt"
                )
            if n <= size:  # strncpy: no NUL terminator when the text fills the buffer exactly
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1


class Detokenizer:
    """Streams token ids into text pieces; a multi-byte UTF-8 character split over several
    tokens is held back until it is complete."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tok: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._dec.decode(self._tok.token_to_piece(tok, self._special))

    def flush(self) -> str:
        """End of stream: whatever is left (an incomplete character becomes U+FFFD)."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def stream(self, tokens: Iterable[int]) -> Iterator[str]:
        """Non-empty text pieces of tokens, then the flushed remainder."""
        for t in tokens:
            s = self.push(t)
            if s:
                yield s
        s = self.flush()
        if s:
            yield s


__all__ = ["Detokenizer", "Tokenizer"]
