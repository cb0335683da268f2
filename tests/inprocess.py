"""The real server app in this process, driven through httpx's ASGI transport (no sockets).

Used by the fuzz tests and bench/fuzz.py: each request runs to completion on a fresh event loop
with a deadline, so a hang shows up as a timeout rather than a stuck test.
"""

from __future__ import annotations

import asyncio

import httpx


class InProcessServer:
    """`dialogen serve`'s app on a model directory, with a session store at `db`."""

    def __init__(self, model_dir, db, max_tokens: int = 4, keys=(), cors_origins=(), allowed_hosts=(), **service):
        from dialogen.chat.session import load_engine
        from dialogen.decoding.settings import Sampling
        from dialogen.serve.app import create_app
        from dialogen.serve.service import Keys, Limits, Service
        from dialogen.serve.store import Store

        engine = load_engine(str(model_dir), "chatml")
        limits = Limits(max_body_bytes=200_000, max_tokens=max_tokens, kv_budget_bytes=64 << 20)
        self.svc = Service(engine, Store(db), Keys(list(keys)), limits, Sampling(max_new_tokens=max_tokens),
                           "tiny-chat", max_active=4, max_queue=16, **service)
        self.app = create_app(self.svc, "127.0.0.1", allowed_hosts, cors_origins)

    def request(self, method: str, path: str, timeout: float = 30.0, **kw) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
                return await asyncio.wait_for(client.request(method, path, **kw), timeout)

        return asyncio.run(go())

    def close(self):
        self.svc.close()
