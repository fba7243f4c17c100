"""Token usage of model requests: read from the reply, estimated where the server gives none, and metered.

Why an estimate: some OpenAI-compatible servers leave ``usage`` out (or out of
some replies), and a budget that silently counts nothing would never stop a
session. The estimate is one token per ``CHARS_PER_TOKEN`` characters of what
was sent and received, rounded up: no tokenizer is cheaply at hand for an
arbitrary remote model (the embedded one reports usage itself). Every count
says whether it is an estimate, and so does every total built from one.

The meters are the process's own objects (the orchestrator has no metrics
endpoint of its own): a Prometheus ``heist_llm_tokens_total{agent,model,kind}``
counter in a registry per LLM client, and, when the OpenTelemetry variables ask
for export, the GenAI semantic conventions' ``gen_ai.client.token.usage``
histogram. ``prometheus_client`` is imported with the first count, so commands
that complete nothing do not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, Meter
    from prometheus_client import CollectorRegistry, Counter

__all__ = [
    "CHARS_PER_TOKEN",
    "INPUT",
    "OUTPUT",
    "TOKEN_BUCKETS",
    "TOKEN_METRIC",
    "TokenMeter",
    "Usage",
    "estimate_tokens",
    "read_usage",
]

CHARS_PER_TOKEN = 4
"""The estimate's ratio: the usual rule of thumb for English text with BPE tokenizers."""
INPUT = "input"
OUTPUT = "output"
"""``kind`` label values (and ``gen_ai.token.type`` attribute values): prompt and completion tokens."""
TOKEN_METRIC = "heist_llm_tokens"
"""The Prometheus counter's name (exposed with the ``_total`` suffix)."""
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""The histogram's bucket boundaries advised by the GenAI semantic conventions for ``gen_ai.client.token.usage``."""
MAX_REPORTED_TOKENS = 1 << 40
"""A server's count above this (or below zero) is not believed: the request is estimated instead."""
UNKNOWN_AGENT = "unknown"
"""``agent`` label of a request made outside any turn."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Prompt and completion tokens of one request; ``estimated`` when the server did not say."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False


def estimate_tokens(characters: int) -> int:
    """Tokens in ``characters`` characters of text, by ``CHARS_PER_TOKEN`` (rounded up)."""
    return -(-max(characters, 0) // CHARS_PER_TOKEN)


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
        return None
    return value


def read_usage(reply: object, prompt_chars: int, completion_chars: int) -> Usage:
    """Return the ``usage`` of an OpenAI-style reply, else an estimate from the text's length (none, or a bad one)."""
    usage = reply.get("usage") if isinstance(reply, Mapping) else None
    if isinstance(usage, Mapping):
        prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            return Usage(prompt, completion)
    return Usage(estimate_tokens(prompt_chars), estimate_tokens(completion_chars), estimated=True)


class TokenMeter:
    """The token meters of one LLM client: the Prometheus counter and, with a ``Meter``, the OTel histogram."""

    def __init__(self, model: str, meter: Meter | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self._meter = meter
        self._attributes = dict(attributes or {})
        self._registry: CollectorRegistry | None = None
        self._counter: Counter | None = None
        self._children: dict[str, tuple[Counter, Counter]] = {}
        """Each agent's input and output series, looked up once (``labels()`` takes a lock and builds a key)."""
        self._histogram: Histogram | None = None
        if meter is not None:
            self._histogram = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=list(map(float, TOKEN_BUCKETS)),
            )

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry holding ``heist_llm_tokens_total`` (one per client: tests run several)."""
        return self._prometheus()[0]

    def _prometheus(self) -> tuple[CollectorRegistry, Counter]:
        if self._registry is None or self._counter is None:
            from prometheus_client import CollectorRegistry, Counter

            self._registry = CollectorRegistry(auto_describe=True)
            self._counter = Counter(
                TOKEN_METRIC,
                "LLM tokens used by the crew's turns (estimates included where a server reports no usage).",
                ("agent", "model", "kind"),
                registry=self._registry,
            )
        return self._registry, self._counter

    def record(self, agent: str | None, operation: str, usage: Usage) -> None:
        """Count one request's tokens for ``agent`` (None: outside any turn)."""
        label = agent or UNKNOWN_AGENT
        children = self._children.get(label)
        if children is None:
            counter = self._prometheus()[1]
            children = counter.labels(label, self.model, INPUT), counter.labels(label, self.model, OUTPUT)
            self._children[label] = children
        children[0].inc(usage.prompt_tokens)
        children[1].inc(usage.completion_tokens)
        if self._histogram is not None:
            attributes = {**self._attributes, "gen_ai.operation.name": operation}
            if usage.estimated:
                attributes["heist.tokens_estimated"] = True
            self._histogram.record(usage.prompt_tokens, {**attributes, "gen_ai.token.type": INPUT})
            self._histogram.record(usage.completion_tokens, {**attributes, "gen_ai.token.type": OUTPUT})
