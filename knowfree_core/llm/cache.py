"""A persistent answer cache: the same prompt to the same model is paid for once.

Answers live in one SQLite file keyed by a sha256 of everything that decides the answer
(engine kind, model, prompt version, the rendered messages, the generation parameters and,
with structured outputs, the answer's schema).
Only successful completions are stored, so failed prompts are asked again on the next run.

Several processes (Ray actors on one node) may read and write the file at once: the file is
in WAL mode (readers never block the writer), each call opens its own short-lived
connection with a busy timeout, and writes go in short transactions. WAL needs a local file
system; do not put the cache on NFS. The object holds only its path, so it pickles to actors.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from knowfree_core.llm.engine import ChatPrompt, Completion, GenerationParams, LLMEngine, ResponseSchema

#: Rows per statement / transaction: keeps each write lock short and stays under SQLite's
#: bound-variable limit.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    finish_reason TEXT,
    created REAL NOT NULL
)
"""


class AnswerCache:
    """``key -> Completion`` in a SQLite file; the parent folder is created when missing."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection:
            # journal_mode is a property of the file: set once, every later connection uses WAL.
            connection.execute("PRAGMA journal_mode=WAL")
            with connection:
                connection.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"AnswerCache({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: sqlite3 connections must not cross threads, and a fresh one
        # per call makes the cache safe for the engine's thread pools and picklable.
        connection = sqlite3.connect(self.path, timeout=self.timeout_s)
        connection.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        connection.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints
        return connection

    @staticmethod
    def key(engine_kind: str, model: str, prompt_version: str, messages: ChatPrompt,
            params: GenerationParams, schema: ResponseSchema | None = None) -> str:
        parts: list = [engine_kind, model, prompt_version, messages, params.cache_key()]
        if schema is not None:
            # Appended only when set: the keys of unconstrained answers stay what they were.
            parts.append(f"schema={schema.name}:{schema.as_json()}")
        payload = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, Completion]:
        """The cached completions (``cached=True``) of those ``keys`` that are present."""
        found: dict[str, Completion] = {}
        unique = list(dict.fromkeys(keys))
        with closing(self._connect()) as connection:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, text, finish_reason FROM answers WHERE key IN ({marks})", chunk
                )
                for key, text, finish_reason in rows:
                    found[key] = Completion(text=text, finish_reason=finish_reason, cached=True)
        return found

    def put_many(self, items: Iterable[tuple[str, Completion]]) -> int:
        """Store the successful completions among ``items``; returns how many were stored."""
        rows = [(key, c.text, c.finish_reason, time.time()) for key, c in items if c.ok]
        with closing(self._connect()) as connection:
            for start in range(0, len(rows), _CHUNK):
                with connection:  # one short transaction per chunk
                    connection.executemany(
                        "INSERT OR REPLACE INTO answers (key, text, finish_reason, created) VALUES (?, ?, ?, ?)",
                        rows[start:start + _CHUNK],
                    )
        return len(rows)

    def __len__(self) -> int:
        with closing(self._connect()) as connection:
            return connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def ask(engine: LLMEngine, prompts: list[ChatPrompt], params: GenerationParams,
        schema: ResponseSchema | None = None) -> list[Completion]:
    """``engine.generate``, with ``schema`` passed only when there is one: an engine written
    before structured outputs (``generate(prompts, params)``) still answers the rest."""
    if schema is None:
        return engine.generate(prompts, params)
    return engine.generate(prompts, params, schema=schema)


def generate_cached(engine: LLMEngine, cache: AnswerCache | None, prompts: list[ChatPrompt],
                    params: GenerationParams, prompt_version: str,
                    schema: ResponseSchema | None = None) -> list[Completion]:
    """Answers for ``prompts`` in order: cache hits (``cached=True``) plus the engine's answers
    to the misses, which are asked once per distinct prompt and stored when successful.

    Token counts are those of the engine's answers; a hit, and every repeat of a prompt asked
    once for the batch, has 0 and ``cached=True``, so summing a batch's tokens counts each
    request once."""
    if cache is None:
        return ask(engine, prompts, params, schema)
    keys = [AnswerCache.key(engine.kind, engine.model_name, prompt_version, p, params, schema) for p in prompts]
    answers: dict[str, Completion] = cache.get_many(keys)
    misses: dict[str, ChatPrompt] = {}
    for key, prompt in zip(keys, prompts):
        if key not in answers and key not in misses:
            misses[key] = prompt
    if misses:
        fresh = ask(engine, list(misses.values()), params, schema)
        if len(fresh) != len(misses):
            raise RuntimeError(f"{engine.kind} engine returned {len(fresh)} answers for {len(misses)} prompts")
        cache.put_many(zip(misses, fresh))
        answers.update(zip(misses, fresh))
    # Copies: a prompt repeated in the batch must not share one mutable Completion.
    out: list[Completion] = []
    seen: set[str] = set()
    for key in keys:
        answer = answers[key]
        if key in seen and answer.ok:
            out.append(Completion(answer.text, answer.error, answer.finish_reason, cached=True))
        else:
            out.append(replace(answer))
        seen.add(key)
    return out


class CachedEngine(LLMEngine):
    """An engine answering from ``cache`` first; otherwise it is ``engine``."""

    def __init__(self, engine: LLMEngine, cache: AnswerCache | None, prompt_version: str):
        super().__init__(engine.config)
        self.engine = engine
        self.cache = cache
        self.prompt_version = prompt_version
        self.kind = engine.kind

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def __repr__(self) -> str:
        return f"CachedEngine({self.engine!r}, {self.cache!r}, prompt_version={self.prompt_version!r})"

    @property
    def supports_structured_outputs(self) -> bool:  # type: ignore[override]
        return self.engine.supports_structured_outputs

    def generate(self, prompts: list[ChatPrompt], params: GenerationParams,
                 schema: ResponseSchema | None = None) -> list[Completion]:
        return generate_cached(self.engine, self.cache, prompts, params, self.prompt_version, schema)

    def close(self) -> None:
        self.engine.close()
