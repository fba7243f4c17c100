"""How often do the embedded model's tool arguments get accepted, with and without the grammar?

    python -m tests.bench.constrained_tools_eval [--seeds 20] [--out var/bench/constrained_tools.json]

For each inline tool, the transcript prompt of its agent ends in the
``[TOOL:<tool>:`` prefill (tests/support/tool_arguments.py) and Gemma 3 270M
(llama_cpp.Llama in-process, the config's sampling: temperature 0.7, top_k 40,
repeat_penalty 1.3, a newline stops) continues it, once per seed, under three
conditions:

* ``free``: no grammar, ``max_tokens`` 60 (today's transcript turn);
* ``grammar``: the contract-bound grammar from ``heist_common.tools.argument_grammars``,
  ``max_tokens`` = its ``max_bytes`` (so the argument can always be finished);
* ``grammar@60``: the grammar tightened to ``max_bytes=60`` so that a
  60-token turn always fits `` <argument>]``;
* ``verify-first``: the contract-bound grammar applied as llama.cpp's own
  sampler does it (check the sampled token, mask the vocabulary only if the
  grammar forbids it; ``VerifyFirstSampler``), to show what the grammar need
  cost.

Each argument, extracted as the agent extracts it, is judged by the services'
own logic (``Evaluator``, ``DocumentFolder.read``, ``BankDatabase.query``).
Reported: the share accepted, the share cut by ``max_tokens``, completion
tokens and tokens/s (completion tokens / wall time of the completion calls;
the prompt is evaluated once per tool and reused from llama.cpp's cache), and
the cost of the grammar alone (llama.cpp masking the whole 262k-token
vocabulary once, per sampled token). Not a test: numbers on a shared machine
are measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from heist_common.tools.argument_grammars import ToolConstraint, build_constraint
from heist_common.tools.registry import ToolRegistry
from tests.support.llama_grammar import LlamaGrammarChecker, ensure_model
from tests.support.processes import REPO
from tests.support.tool_arguments import TOOLS, Sample, ServiceLogic, generate, transcript_prompt

MAX_TOKENS = 60
"""The config's ``llm.max_tokens``."""
CONDITIONS = ("free", "grammar", "grammar@60", "verify-first")


MASK_EXAMPLES = {
    "calculator": "((120 - 35) * (7 + 2))]",
    "file_reader": "guard_rotation_notes.md]",
    "database_query": "SELECT name, shift_start FROM guards WHERE shift_start = '22:00' LIMIT 5]",
}
"""Arguments along which the grammar's masking cost is measured (at every token of the way)."""


def grammar_mask_ms(checker: LlamaGrammarChecker, gbnf: str, example: str, rounds: int = 3) -> float:
    """Mean milliseconds llama.cpp's grammar sampler takes to mask the full vocabulary, over the example's prefixes.

    This is what the grammar adds to every sampled token in llama-cpp-python,
    whose sampler chain applies the grammar to all candidates (262,144 for Gemma 3).
    """
    n_vocab = llama_cpp.llama_vocab_n_tokens(checker.vocab)
    template = (llama_cpp.llama_token_data * n_vocab)()
    for index in range(n_vocab):
        template[index].id = index
    data = (llama_cpp.llama_token_data * n_vocab)()
    sampler = checker.sampler(gbnf)
    timings: list[float] = []
    try:
        for token in checker.tokenize(example):
            for _ in range(rounds):
                ctypes.memmove(data, template, ctypes.sizeof(template))
                candidates = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
                start = time.perf_counter()
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
                timings.append((time.perf_counter() - start) * 1000.0)
            if math.isinf(data[token].logit):  # a tighter grammar may not reach the end of the example
                break
            llama_cpp.llama_sampler_accept(sampler, token)
        return statistics.mean(timings)
    finally:
        llama_cpp.llama_sampler_free(sampler)


_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class VerifyFirstSampler:
    """The grammar applied the way llama.cpp's own ``common_sampler`` (llama-server) applies it.

    Sample from the ordinary chain first and check only the chosen token
    against the grammar; only when the grammar forbids it, mask the whole
    vocabulary and sample again. Without truncation this is exactly sampling
    from the masked distribution (rejection sampling), at the cost of one
    token check per step instead of 262,144. llama-cpp-python (and so the
    embedded ``llama_cpp.server``) always masks the whole vocabulary instead.
    Plugged into ``Llama.generate`` in place of its sampler chain.
    """

    def __init__(self, llm: llama_cpp.Llama, chain: Any, gbnf: str) -> None:
        self.chain = chain
        self.n_vocab = llm.n_vocab()
        self.grammar = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
        if not self.grammar:
            raise ValueError("llama.cpp refused the grammar")
        self.ids = np.arange(self.n_vocab, dtype=np.intc)
        self.buffer = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self.steps = 0
        self.rejected = 0

    def _candidates(self, ctx: Any, idx: int) -> Any:
        logits = np.ctypeslib.as_array(ctx.get_logits_ith(idx), shape=(self.n_vocab,))
        self.buffer["id"] = self.ids
        self.buffer["logit"] = logits
        self.buffer["p"] = 0.0
        data = self.buffer.ctypes.data_as(llama_cpp.llama_token_data_p)
        return llama_cpp.llama_token_data_array(data, self.n_vocab, -1, False)

    def _allowed(self, token: int) -> bool:
        single = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        llama_cpp.llama_sampler_apply(
            self.grammar, ctypes.byref(llama_cpp.llama_token_data_array(single, 1, -1, False))
        )
        return not math.isinf(single[0].logit)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """Pick the next token (``Llama.sample`` calls this)."""
        self.steps += 1
        candidates = self._candidates(ctx, idx)
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
        token = int(candidates.data[candidates.selected].id)
        if not self._allowed(token):
            self.rejected += 1
            candidates = self._candidates(ctx, idx)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
            llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
            token = int(candidates.data[candidates.selected].id)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain.sampler, token)
        return token

    def close(self) -> None:
        """Free the grammar sampler (the chain frees itself)."""
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


@contextlib.contextmanager
def verify_first(llm: llama_cpp.Llama, gbnf: str) -> Iterator[list[VerifyFirstSampler]]:
    """Make ``llm``'s completions use VerifyFirstSampler with ``gbnf`` (call them with ``grammar=None``)."""
    made: list[VerifyFirstSampler] = []
    original = llm._init_sampler

    def init_sampler(**kwargs: Any) -> VerifyFirstSampler:
        kwargs["grammar"] = None
        made.append(VerifyFirstSampler(llm, original(**kwargs), gbnf))
        return made[-1]

    llm._init_sampler = init_sampler  # type: ignore[method-assign]
    try:
        yield made
    finally:
        llm._init_sampler = original  # type: ignore[method-assign]
        for sampler in made:
            sampler.close()


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Acceptance, truncation, tokens and speed of one tool under one condition."""
    tokens = sum(s.tokens for s in samples)
    seconds = sum(s.seconds for s in samples)
    return {
        "n": len(samples),
        "accepted": sum(s.refusal is None for s in samples),
        "accepted_share": round(sum(s.refusal is None for s in samples) / len(samples), 3),
        "truncated": sum(s.truncated for s in samples),
        "mean_completion_tokens": round(tokens / len(samples), 1),
        "max_completion_tokens": max(s.tokens for s in samples),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "refusals": Counter(_reason(s.refusal) for s in samples if s.refusal).most_common(5),
        "examples": [s.argument for s in samples[:5]],
    }


def _reason(refusal: str) -> str:
    """Group refusals: the service's message up to the first detail (names and columns vary)."""
    for marker in ("no document", "no such column", "no such table", "syntax error", "near "):
        if refusal.startswith(marker) or f" {marker}" in refusal:
            return marker
    return refusal[:60]


def run(seeds: int, out: Path | None) -> dict[str, Any]:
    """Sample every tool under every condition; print a table; return (and write) the results."""
    registry = ToolRegistry.for_services(TOOLS)
    model = ensure_model()
    logic = ServiceLogic(Path(tempfile.mkdtemp(prefix="constrained-eval-")))
    checker = LlamaGrammarChecker(model)
    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=2, n_batch=256, verbose=False, seed=0)
    results: dict[str, Any] = {"machine": {"cpu_count": _cpus(), "python": platform.python_version()}, "tools": {}}
    try:
        for tool in TOOLS:
            method = registry.service(tool).inline_method
            assert method is not None
            listing = logic.listing(tool)
            constraints: dict[str, ToolConstraint] = {
                "grammar": build_constraint(tool, method.method, listing),
                "grammar@60": build_constraint(tool, method.method, listing, max_bytes=MAX_TOKENS),
            }
            grammars = {
                name: llama_cpp.LlamaGrammar.from_string(c.gbnf, verbose=False) for name, c in constraints.items()
            }
            prompt, prefill = transcript_prompt(tool, registry)
            generate(llm, tool, prompt, prefill, 0, logic, max_tokens=1)  # evaluate the prompt once (cached after)
            samples: dict[str, list[Sample]] = {name: [] for name in CONDITIONS}
            full = constraints["grammar"]
            checks = {"steps": 0, "rejected": 0}
            for seed in range(1, seeds + 1):
                samples["free"].append(generate(llm, tool, prompt, prefill, seed, logic, max_tokens=MAX_TOKENS))
                for name, constraint in constraints.items():
                    budget = MAX_TOKENS if name == "grammar@60" else constraint.max_bytes or MAX_TOKENS
                    samples[name].append(
                        generate(llm, tool, prompt, prefill, seed, logic, grammar=grammars[name], max_tokens=budget)
                    )
                with verify_first(llm, full.gbnf) as made:
                    budget = full.max_bytes or MAX_TOKENS
                    samples["verify-first"].append(generate(llm, tool, prompt, prefill, seed, logic, max_tokens=budget))
                checks["steps"] += sum(m.steps for m in made)
                checks["rejected"] += sum(m.rejected for m in made)
                print(f"{tool} seed {seed}: " + " | ".join(f"{k}: {v[-1].argument!r}" for k, v in samples.items()))
            results["tools"][tool] = {
                "max_bytes": {name: c.max_bytes for name, c in constraints.items()},
                "grammar_mask_ms": {
                    name: round(grammar_mask_ms(checker, c.gbnf, MASK_EXAMPLES[tool]), 1)
                    for name, c in constraints.items()
                },
                "verify_first_checks": checks,
                **{name: summarize(found) for name, found in samples.items()},
            }
    finally:
        llm.close()
        checker.close()
    print_table(results, seeds)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"results: {out}")
    return results


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def print_table(results: dict[str, Any], seeds: int) -> None:
    """Print one row per tool and condition."""
    print(f"\nConstrained tool arguments, Gemma 3 270M, {seeds} seeds per tool")
    print(
        f"{'tool':15} {'condition':12} {'accepted':>9} {'cut':>4} {'tokens':>7} {'tok/s':>6} {'mask ms':>8}  refusals"
    )
    for tool, found in results["tools"].items():
        for condition in CONDITIONS:
            row = found[condition]
            mask = found["grammar_mask_ms"].get(condition)
            refusals = ", ".join(f"{reason} x{count}" for reason, count in row["refusals"])
            print(
                f"{tool:15} {condition:12} {row['accepted']:>4}/{row['n']:<4} {row['truncated']:>4} "
                f"{row['mean_completion_tokens']:>7} {row['tokens_per_s'] or 0:>6} "
                f"{'' if mask is None else mask:>8}  {refusals}"
            )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the evaluation."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.constrained_tools_eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "bench" / "constrained_tools.json")
    args = parser.parse_args(argv)
    run(args.seeds, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
