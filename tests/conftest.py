"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_stub_server import StubLLMServer


@pytest.fixture
def llm_stub() -> Iterator[StubLLMServer]:
    """A loopback OpenAI-compatible server; set ``llm_stub.answer`` to script its replies,
    read ``llm_stub.requests`` to see what it was sent."""
    server = StubLLMServer()
    try:
        yield server
    finally:
        server.close()
