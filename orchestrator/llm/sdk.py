"""The ``openai.AsyncOpenAI`` client the LLM client posts through, with request building done once per client.

Why a subclass: for every request, ``client.post`` rebuilds the same headers
(auth, user agent, the ``x-stainless-*`` platform headers), re-parses the URL
and merges it all again with the ``httpx2`` client's defaults
(``_build_request``, ~0.19 ms of CPU per request on a 2-core VM, a tenth of a
zero-latency turn's own work). Our requests are always the same shape: a
``POST`` of already serialized JSON bytes to an absolute URL, with at most a
``traceparent`` of our own. So the SDK's own ``_build_request`` builds the first
request of each shape, and the later ones copy its headers and extensions into
a new ``httpx2.Request`` with the new body. Everything else (retries and their
back-off, ``x-stainless-retry-count``, errors, auth hooks, the connection
pool) is the SDK's and ``httpx2``'s unchanged. A request of any other shape
goes through the SDK's own path; ``tests/orchestrator/test_llm_sdk.py`` checks
that both paths give the same request.

This module imports ``openai``, so it is imported only when the first
completion is sent (see ``orchestrator.llm.client``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from openai._models import FinalRequestOptions

__all__ = ["PreparedRequestOpenAI"]

_PER_REQUEST = frozenset({b"content-length", b"host"})
"""Headers ``httpx2.Request`` derives from the body and URL itself."""


@dataclass(frozen=True, slots=True)
class _Template:
    """What the SDK built for one request shape: its headers, their lower-case names, its extensions (timeouts)."""

    headers: list[tuple[bytes, bytes]]
    names: frozenset[str]
    extensions: dict[str, Any]


class PreparedRequestOpenAI(openai.AsyncOpenAI):
    """``AsyncOpenAI`` whose ``POST``s of prepared bytes reuse the headers the SDK built for the first one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._request_templates: dict[tuple[object, ...], _Template] = {}

    @property
    def user_agent(self) -> str:
        """The SDK's own ``AsyncOpenAI/Python x.y.z`` (it names the class, and servers may log or match on it)."""
        return f"{openai.AsyncOpenAI.__name__}/Python {self._version}"

    def _build_request(self, options: FinalRequestOptions, *, retries_taken: int = 0) -> httpx2.Request:
        custom = options.headers if isinstance(options.headers, dict) else {}
        body = options.content
        if not isinstance(body, bytes) or not _prepared_post(options, custom):
            return super()._build_request(options, retries_taken=retries_taken)
        key = (options.url, retries_taken, *sorted(options.security.items()))
        template = self._request_templates.get(key)
        if template is None:
            template = self._template(options, retries_taken)
            self._request_templates[key] = template
        headers = template.headers
        if custom:
            if any(name.lower() in template.names for name in custom):  # a caller's header replaces one of ours
                return super()._build_request(options, retries_taken=retries_taken)
            headers = headers + [(name.encode(), value.encode()) for name, value in custom.items()]
        if self._idempotency_header and options.idempotency_key:
            headers = [*headers, (self._idempotency_header.encode(), options.idempotency_key.encode())]
        return httpx2.Request("POST", options.url, headers=headers, content=body, extensions=dict(template.extensions))

    def _template(self, options: FinalRequestOptions, retries_taken: int) -> _Template:
        """Build a request like ``options`` the SDK's way; keep its headers (minus per-request ones) and extensions."""
        bare = options.model_copy(update={"headers": {}, "idempotency_key": None, "content": b""})
        request = super()._build_request(bare, retries_taken=retries_taken)
        headers = [(name, value) for name, value in request.headers.raw if name.lower() not in _PER_REQUEST]
        names = frozenset(name.decode("latin-1").lower() for name, _ in headers)
        return _Template(headers, names, dict(request.extensions))


def _prepared_post(options: FinalRequestOptions, custom_headers: dict[str, object]) -> bool:
    """Whether ``options`` is a plain ``POST`` to an absolute URL with string headers (what ``LLMClient`` sends)."""
    return (
        options.method == "post"
        and all(isinstance(value, str) for value in custom_headers.values())
        and options.json_data is None
        and options.extra_json is None
        and not options.params
        and options.files is None
        and isinstance(options.timeout, openai.NotGiven)
        and options.url.startswith(("http://", "https://"))
    )
