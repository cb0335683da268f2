"""/v1/sessions: conversations kept by the server, stored in SQLite, with a live KV cache.

  POST   /v1/sessions                 {"model", "persona", "settings", "title"} -> the session
  GET    /v1/sessions                 this key's sessions, newest first
  GET    /v1/sessions/{id}            the session with its history
  POST   /v1/sessions/{id}/messages   {"content", "stream", "model", decoding overrides} -> the reply
  DELETE /v1/sessions/{id}
  (ratings, regenerated replies and picks of a session's replies: feedback.py)

A turn is committed to the store when its reply is complete; a reply cut off (client gone,
server killed) leaves the stored history as it was. One turn at a time per session (409), across
server processes sharing the database too: see store.py.

A session's `model` (kept in its settings) names the LoRA adapter its replies take; a turn may
name another. The live KV cache belongs to one adapter: a turn with another is served from the
history re-encoded, never from that cache.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat.messages import Message
from ..chat.personas import resolve_persona
from . import protocol as P
from .channel import Channel, ClientGone, job_error, read_json, submit_all
from .completions import SSE_HEADERS, candidates
from .protocol import ApiError
from .schema import SessionCreate, SessionTurn, Settings
from .service import Service
from .store import Conflict



def add_routes(app: FastAPI, svc: Service):
    @app.post("/v1/sessions")
    async def create(request: Request):
        body = await read_json(request, svc.limits.max_body_bytes)
        req = P.validate(SessionCreate, body)
        check_settings(svc, req.settings)
        settings = {k: v for k, v in (body.get("settings") or {}).items() if v is not None}  # stored as given
        if req.model is not None:
            settings["model"] = req.model
        turn_model(svc, settings, None)  # a name not served: 404
        persona = resolve_persona(req.persona) or svc.default_persona  # a preset name becomes its text
        row = await off_loop(svc.store.create, request.state.owner, persona, settings, (req.title or "")[:200])
        return _session_obj(row, [])

    @app.get("/v1/sessions")
    async def listing(request: Request):
        rows = await off_loop(svc.store.list, request.state.owner)
        return {"object": "list", "data": [_session_obj(r, None) for r in rows]}

    @app.get("/v1/sessions/{sid}")
    async def read(sid: str, request: Request):
        row = await _owned(svc, sid, request)
        return _session_obj(row, row["messages"])

    @app.delete("/v1/sessions/{sid}")
    async def delete(sid: str, request: Request):
        if not await off_loop(svc.store.delete, sid, request.state.owner):
            raise _not_found(sid)
        job = svc.sessions.job(sid)
        if job is not None:
            job.cancel()
        svc.sessions.drop(sid)
        return {"id": sid, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{sid}/messages")
    async def turn(sid: str, request: Request):
        return await start_turn(svc, sid, request)


async def start_turn(svc: Service, sid: str, request: Request):
    """Check a user turn, claim the session, queue the reply; stream it or wait for it."""
    body = await read_json(request, svc.limits.max_body_bytes)
    row = await _owned(svc, sid, request)
    req = P.validate(SessionTurn, body)
    sampling, decoding = turn_settings(svc, row["settings"], req)
    text, model = req.content, turn_model(svc, row["settings"], req)
    _check_fits(svc, row["persona"], text, sampling.max_new_tokens, svc.engine_for(model))
    claim, release = await claim_session(svc, sid)
    run = _turn_job(svc, row, request.state.owner, text, (sampling, decoding), claim, release, model)
    return await answer(svc, sid, run, claim, release, bool(req.stream), request, model)


def turn_model(svc: Service, settings: dict, req) -> str | None:
    """The model name (a LoRA adapter's, or the base's) a reply is served by: the request's `model`,
    else the session's; a name this server does not serve gets 404 (with --strict-model-names)."""
    model = getattr(req, "model", None)
    model = settings.get("model") if model is None else model
    if not svc.accepts_model(model):
        raise P.model_not_found(svc.model_names(), model)
    return model


def turn_settings(svc: Service, settings: dict, req, seeded: bool = True):
    """(Sampling, Decoding) of a reply: the server's defaults, the session's stored settings (their
    seed left out unless `seeded`), then the request's fields."""
    stored = P.validate(Settings, settings, "settings")
    if not seeded:
        stored = stored.model_copy(update={"seed": None})
    limit, vocab = svc.limits.max_tokens, svc.vocab_size
    changes = {**P.sampling_changes(stored, limit, vocab), **P.sampling_changes(req, limit, vocab)}
    search = {**P.decoding_changes(stored, svc.limits.max_candidates),
              **P.decoding_changes(req, svc.limits.max_candidates)}
    return P.make_sampling(svc.sampling, changes), P.make_decoding(svc.decoding, search)


async def claim_session(svc: Service, sid: str):
    """(claim, release) of the session for one write, in this process and in the store; 409 while
    a turn holds it (here or in another server)."""
    claim = svc.sessions.claim(sid)
    try:  # no other process writes it either
        holder = await off_loop(svc.store.claim, sid) if claim is not None else None
    except BaseException:
        svc.sessions.release(sid, claim)
        raise
    if holder is None:
        if claim is not None:
            svc.sessions.release(sid, claim)
        raise ApiError(409, f"session '{sid}' is already generating a reply; wait for it to finish",
                       code="session_busy")
    claim.holder = holder

    def release():
        try:
            svc.store.release(sid, holder)
        finally:  # with the database down, the stored claim ends with its lease (or connection)
            svc.sessions.release(sid, claim)

    return claim, release


async def answer(svc: Service, sid: str, run, claim, release, stream: bool, request: Request,
                 model: str | None = None):
    """Queue the job `run` (which releases the claim when done) and stream its reply or wait for it;
    `model`: the name the reply is served by (`turn_model`)."""
    channel = Channel()
    try:
        jobs = submit_all(svc, [run], channel)
    except ApiError:
        release()
        raise
    claim.job = jobs[0]
    turn_id = P.new_id("turn")
    if stream:
        return StreamingResponse(_stream(svc, sid, turn_id, channel, jobs[0], svc.served_name(model)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await _collect(svc, sid, turn_id, channel, jobs[0], request)


def check_settings(svc: Service, settings: Settings | None):
    """Parsed settings within the server's limits (max_tokens, num_candidates) and combinable."""
    if settings is None:
        return
    try:
        P.make_sampling(svc.sampling, P.sampling_changes(settings, svc.limits.max_tokens, svc.vocab_size))
        P.make_decoding(svc.decoding, P.decoding_changes(settings, svc.limits.max_candidates))
    except ApiError as e:
        raise ApiError(400, f"settings: {e.message}", f"settings.{e.param}" if e.param else "settings") from None


def _check_fits(svc: Service, persona: str | None, text: str, max_tokens: int, engine=None):
    """The newest user turn alone (with the persona) must fit; older turns are dropped as needed."""
    convo = ([Message("system", persona)] if persona else []) + [Message("user", text)]
    need = svc.prompt_len(convo, engine=engine)
    if need + max_tokens > svc.context_length:
        raise P.context_error(need, max_tokens, svc.context_length, "content")


async def off_loop(fn, *args):
    """A store operation, off the event loop: a database that is slow or down holds this request
    only (StoreUnavailable becomes 503)."""
    return await run_in_threadpool(fn, *args)


async def _owned(svc: Service, sid: str, request: Request) -> dict:
    row = await off_loop(svc.store.get, sid, request.state.owner)
    if row is None:
        raise _not_found(sid)
    return row


def _not_found(sid: str) -> ApiError:
    return ApiError(404, f"no session '{sid}'", "session_id", "session_not_found")


def _session_obj(row: dict, messages: list | None) -> dict:
    out = {"id": row["id"], "object": "session", "created": row["created"], "updated": row["updated"],
           "title": row["title"], "persona": row["persona"], "settings": row["settings"]}
    if messages is not None:
        out["messages"] = messages
    else:
        out["message_count"] = row.get("message_count", 0)
    return out


def _turn_job(svc: Service, row: dict, owner: str, text: str, decode: tuple, claim, release, model: str | None):
    sid = row["id"]
    sampling, decoding = decode

    def run(job):
        try:
            session = _live_session(svc, sid, owner, row["persona"], sampling, svc.engine_for(model))
            session.max_context_tokens = svc.context_length - sampling.max_new_tokens
            done = _generate(svc, job, session, sid, text, (sampling, decoding), claim.holder)
        finally:
            release()  # before the client hears "done", so its next turn finds the session free
        job.emit(("done", done))

    return run


def _live_session(svc: Service, sid: str, owner: str, persona: str | None, sampling, engine):
    """The session of `engine` (a LoRA adapter's, `Service.engine_for`) with its KV cache, holding the
    whole stored history: the kept one, unless the store's differs (another server wrote turns, or a
    pick changed the last reply), it was evicted or its cache is another adapter's; then rebuilt."""
    session = svc.sessions.get(sid)
    tail = svc.store.tail(sid)
    if tail is None:
        raise _not_found(sid)
    if session is not None and session.engine is engine and len(session.messages) == tail[0] and (
            not session.messages or session.messages[-1].content == tail[1]):
        return session
    row_now = svc.store.get(sid, owner)  # read under the claim: no turn is added meanwhile
    if row_now is None:
        raise _not_found(sid)
    history = [Message(m["role"], m["content"]) for m in row_now["messages"]]
    session = svc.new_session(persona, sampling, history, engine=engine)
    svc.sessions.put(sid, session)
    return session


LEASE_RENEW = 10.0  # seconds between renewals of a generating turn's claim


def _generate(svc: Service, job, session, sid: str, text: str, decode: tuple, holder: str) -> dict:
    """Generate and commit the turn; returns the "done" event's payload."""
    before = len(session.messages)
    try:
        gen, prompt, cached, meta = run_reply(svc, job, session, sid, text, decode, holder)
    except BaseException:
        del session.messages[before:]  # the turn never happened: memory matches the store
        raise
    cands = meta.get("candidates")
    try:
        added = svc.store.add_turn(sid, text, gen.text, meta, expected=before)
    except Conflict as e:  # another writer got in (a claim whose lease ran out): this reply is void
        svc.sessions.drop(sid)
        raise ApiError(409, f"{e}; send the turn again", "session_id", "session_conflict") from None
    if not added:
        svc.sessions.drop(sid)
        raise ApiError(404, f"session '{sid}' was deleted during the reply", "session_id", "session_not_found")
    return {"finish_reason": gen.finish_reason, "tokens": len(gen.tokens), "text": gen.text,
            "prompt_tokens": prompt, "cached_tokens": cached, "candidates": cands}


def run_reply(svc: Service, job, session, sid: str, text: str, decode: tuple, holder: str):
    """Generate the session's reply to `text`, its deltas sent to the job's client, the claim
    renewed meanwhile: (Generation, prompt tokens, cached tokens, the reply's stored meta)."""
    sampling, decoding = decode
    gen, prompt, cached = svc.reply(session, text, sampling, decoding)
    svc.worker.stream(gen, lambda delta: job.emit(("delta", delta)), tick=lambda: svc.store.renew(sid, holder),
                      every=LEASE_RENEW)
    svc.worker.leave_model()
    cands = candidates(gen)
    meta = {"finish_reason": gen.finish_reason, "completion_tokens": len(gen.tokens)}
    if cands is not None:
        meta["candidates"] = cands
    return gen, prompt, cached, meta


EXTRA = ("message_index", "variant")  # a regenerated reply's fields, in its turn object and last chunk


def _turn_obj(sid: str, turn_id: str, done: dict) -> dict:
    out = {"id": turn_id, "object": "session.turn", "session_id": sid, "created": int(time.time()),
           "message": {"role": "assistant", "content": done["text"]}, "finish_reason": done["finish_reason"],
           "usage": P.usage(done["prompt_tokens"], done["tokens"], done["cached_tokens"])}
    if done["candidates"] is not None:
        out["candidates"] = done["candidates"]
    out.update({k: done[k] for k in EXTRA if k in done})
    return out


async def _collect(svc: Service, sid: str, turn_id: str, channel: Channel, job, request: Request):
    try:
        while True:
            _, kind, payload = await channel.get(request)
            if kind == "done":
                return _turn_obj(sid, turn_id, payload)
            if kind == "error":
                raise job_error(payload)
            if kind == "cancelled":
                raise ApiError(409, f"the reply was cancelled (session '{sid}' deleted?)", code="cancelled")
    except ClientGone:
        job.cancel()
        raise ApiError(499, "client closed the request") from None


async def _stream(svc: Service, sid: str, turn_id: str, channel: Channel, job, model: str):
    """The same chunk format as chat completions; the last data chunk carries the whole turn."""
    created = int(time.time())
    try:
        yield P.sse(P.chunk(turn_id, model, created, [P.delta_choice(0, {"role": "assistant", "content": ""})]))
        while True:
            _, kind, payload = await channel.get()
            if kind == "delta":
                yield P.sse(P.chunk(turn_id, model, created, [P.delta_choice(0, {"content": payload})]))
            elif kind == "done":
                final = P.chunk(turn_id, model, created, [P.delta_choice(0, {}, payload["finish_reason"])],
                                _turn_obj(sid, turn_id, payload)["usage"])
                final["session_id"] = sid
                final.update({k: payload[k] for k in EXTRA if k in payload})
                if payload["candidates"] is not None:
                    final["candidates"] = payload["candidates"]
                yield P.sse(final)
                yield P.sse("[DONE]")
                return
            elif kind == "error":
                yield P.sse(job_error(payload).body())
                return
            else:
                return
    finally:
        job.cancel()
