"""A local HTTP server speaking the OpenAI wire format, for testing the API backends without
the internet. It records every request (path, JSON body or multipart form) so tests can assert
the request shape, and answers with canned responses that carry ``usage``.

    async with FakeOpenAI() as api:
        settings = Settings(openai_api_key="test", openai_base_url=api.base_url)
        ...
        assert api.requests[0].path == "/v1/chat/completions"
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web


@dataclass
class Recorded:
    path: str
    json: dict[str, Any] | None = None
    form: dict[str, Any] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def fake_vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 128 for b in digest[:dims]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        #: Set to make the next N requests fail with this HTTP status (e.g. 429, 500).
        self.fail_next: list[int] = []
        self.transcript_text = "hello from the fake whisper"
        self.chat_reply = "A short summary."
        self.embedding_dims = 8
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _maybe_fail(self) -> web.Response | None:
        if self.fail_next:
            status = self.fail_next.pop(0)
            return web.json_response({"error": {"message": f"injected {status}",
                                                "type": "test"}}, status=status)
        return None

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Recorded(request.path, json=body, headers=dict(request.headers)))
        if (fail := self._maybe_fail()) is not None:
            return fail
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_tokens = len(self.chat_reply.split())
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.chat_reply}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Recorded(request.path, json=body, headers=dict(request.headers)))
        if (fail := self._maybe_fail()) is not None:
            return fail
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(len(str(t).split()) for t in inputs)
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i,
                      "embedding": fake_vector(str(t), self.embedding_dims)}
                     for i, t in enumerate(inputs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def _transcriptions(self, request: web.Request) -> web.Response:
        rec = Recorded(request.path, headers=dict(request.headers))
        reader = await request.multipart()
        async for part in reader:  # type: ignore[union-attr]
            if part.filename:
                rec.files[part.name or "file"] = (part.filename, await part.read())
            else:
                rec.form[part.name or ""] = await part.text()
        self.requests.append(rec)
        if (fail := self._maybe_fail()) is not None:
            return fail
        if rec.form.get("response_format") == "verbose_json":
            return web.json_response({
                "task": "transcribe", "language": "english", "duration": 2.0,
                "text": self.transcript_text,
                "segments": [{"id": 0, "start": 0.0, "end": 2.0, "text": self.transcript_text}],
            })
        return web.json_response({"text": self.transcript_text})
