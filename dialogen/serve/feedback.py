"""Feedback on a session's replies: ratings, regenerated replies and picks, kept with the
session's turns (feedback_store.py) and exported as DPO records (feedback_export.py).

  POST /v1/sessions/{id}/messages/{n}/feedback    {"rating": "up"|"down", "comment", "variant"}
  POST /v1/sessions/{id}/messages/{n}/regenerate  {"stream", decoding overrides} -> another reply
  POST /v1/sessions/{id}/messages/{n}/preference  {"chosen", "rejected"} -> the message as shown

`n` is the message's index in the session's `messages` (GET /v1/sessions/{id}) and must be an
assistant reply. Any reply can be rated. Regenerating and picking apply to the session's last
reply, under the session's claim (409 while a turn is generating): a regenerated reply is stored
as a variant of the message and leaves the history as it was; a pick makes the chosen variant the
message's content, so the conversation goes on from it.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request

from ..chat.messages import Message
from . import protocol as P
from .channel import read_json
from .feedback_store import Stale
from .protocol import ApiError
from .schema import Pick, Rating, Regenerate
from .service import Service
from .sessions import (_check_fits, _live_session, _not_found, _owned, answer, claim_session, off_loop, run_reply,
                       turn_model, turn_settings)


def add_routes(app: FastAPI, svc: Service):
    @app.post("/v1/sessions/{sid}/messages/{n}/feedback")
    async def rate(sid: str, n: str, request: Request):
        row, seq, msg, req = await _addressed(svc, sid, n, request, Rating)
        variant = msg.get("variant", 0) if req.variant is None else req.variant
        known = [v["variant"] for v in msg.get("variants", [])] or [0]
        if variant not in known:
            raise ApiError(404, f"message {seq} has no variant {variant}; its variants are "
                                f"{', '.join(map(str, known))}", "variant", "variant_not_found")
        if not await off_loop(svc.store.rate, sid, seq, variant, req.rating, req.comment):
            raise _not_found(sid)
        return {"object": "session.feedback", "session_id": sid, "message_index": seq, "variant": variant,
                "rating": req.rating, "comment": req.comment or None}

    @app.post("/v1/sessions/{sid}/messages/{n}/regenerate")
    async def regenerate(sid: str, n: str, request: Request):
        row, seq, _, req = await _addressed(svc, sid, n, request, Regenerate)
        _check_last(row, seq, "regenerated")
        # a seed stored with the session would draw the same reply again; a seed in the request is used
        sampling, decoding = turn_settings(svc, row["settings"], req, seeded=False)
        model = turn_model(svc, row["settings"], req)  # the session's LoRA adapter, or the request's
        engine = svc.engine_for(model)
        _check_fits(svc, row["persona"], row["messages"][seq - 1]["content"], sampling.max_new_tokens, engine)
        claim, release = await claim_session(svc, sid)
        run = _regenerate_job(svc, row, request.state.owner, seq, (sampling, decoding), claim, release, engine)
        return await answer(svc, sid, run, claim, release, bool(req.stream), request, model)

    @app.post("/v1/sessions/{sid}/messages/{n}/preference")
    async def prefer(sid: str, n: str, request: Request):
        row, seq, msg, req = await _addressed(svc, sid, n, request, Pick)
        _check_pick(seq, msg, req)
        _check_last(row, seq, "picked")
        claim, release = await claim_session(svc, sid)
        try:
            shown = await off_loop(svc.store.pick, sid, seq, req.chosen, req.rejected)
            if shown is None:
                raise _not_found(sid)
            live = svc.sessions.get(sid)  # idle: the claim is held
            if live is not None and len(live.messages) == seq + 1:
                live.messages[-1] = Message("assistant", shown["content"])
        except Stale as e:
            raise ApiError(409, f"{e}; only the last reply can be picked", "message_index", "session_conflict") from None
        finally:
            await off_loop(release)
        return {"object": "session.preference", "session_id": sid, "message_index": seq, "chosen": req.chosen,
                "rejected": req.rejected, "message": shown}


INDEX = re.compile(r"[0-9]{1,9}")


async def _addressed(svc: Service, sid: str, n: str, request: Request, schema):
    """(session row, index, message, request body as `schema`) of a request about the assistant message `n`
    of a session the caller owns."""
    body = await read_json(request, svc.limits.max_body_bytes)
    row = await _owned(svc, sid, request)
    seq, msg = _reply(row, n)
    return row, seq, msg, P.validate(schema, body)


def _reply(row: dict, n: str) -> tuple[int, dict]:
    """(index, message) of the assistant message `n` of a session."""
    if not INDEX.fullmatch(n):
        raise ApiError(400, f"'message_index' must be a message's index in the session (0, 1, ...), got {n!r}",
                       "message_index")
    seq, msgs = int(n), row["messages"]
    if seq >= len(msgs):
        raise ApiError(404, f"session '{row['id']}' has no message {seq}; it has {len(msgs)}", "message_index",
                       "message_not_found")
    if msgs[seq]["role"] != "assistant":
        raise ApiError(400, f"message {seq} is a {msgs[seq]['role']} message; feedback is on assistant replies",
                       "message_index")
    return seq, msgs[seq]


def _check_last(row: dict, seq: int, what: str):
    last = len(row["messages"]) - 1
    if seq != last:
        raise ApiError(409, f"message {seq} is not the session's last reply (message {last}); only the last reply "
                            f"can be {what}", "message_index", "not_last_reply")


def _check_pick(seq: int, msg: dict, req: Pick):
    variants = {v["variant"]: v["content"] for v in msg.get("variants", [])}
    if not variants:
        raise ApiError(400, f"message {seq} has one reply; regenerate it, then pick between the two", "message_index",
                       "no_variants")
    for field in ("chosen", "rejected"):
        if getattr(req, field) not in variants:
            raise ApiError(404, f"message {seq} has no variant {getattr(req, field)}; its variants are "
                                f"{', '.join(map(str, variants))}", field, "variant_not_found")
    if req.chosen == req.rejected:
        raise ApiError(400, "'rejected' is the same variant as 'chosen'", "rejected")
    if variants[req.chosen] == variants[req.rejected]:
        raise ApiError(400, f"variants {req.chosen} and {req.rejected} are the same text: nothing to prefer",
                       "rejected")


def _regenerate_job(svc: Service, row: dict, owner: str, seq: int, decode: tuple, claim, release, engine):
    sid = row["id"]

    def run(job):
        try:
            session = _live_session(svc, sid, owner, row["persona"], decode[0], engine)
            session.max_context_tokens = svc.context_length - decode[0].max_new_tokens
            done = _generate_variant(svc, job, session, sid, seq, decode, claim.holder)
        finally:
            release()
        job.emit(("done", done))

    return run


def _generate_variant(svc: Service, job, session, sid: str, seq: int, decode: tuple, holder: str) -> dict:
    """Reply again to the user turn before message `seq` and store the reply as a variant; the
    session's history is left as stored (its KV cache keeps the prefix they share)."""
    history = list(session.messages)
    if len(history) != seq + 1:  # a turn was added between the request's check and the claim
        raise ApiError(409, f"message {seq} is not the session's last reply: a turn was added", "message_index", "not_last_reply")
    session.reset(history[:seq - 1])
    try:
        gen, prompt, cached, meta = run_reply(svc, job, session, sid, history[seq - 1].content, decode, holder)
    finally:
        session.reset(history)
    try:
        variant = svc.store.add_variant(sid, seq, gen.text, meta)
    except Stale as e:
        svc.sessions.drop(sid)
        raise ApiError(409, f"{e}; regenerate the last reply", "message_index", "session_conflict") from None
    if variant is None:
        svc.sessions.drop(sid)
        raise ApiError(404, f"session '{sid}' was deleted during the reply", "session_id", "session_not_found")
    return {"finish_reason": gen.finish_reason, "tokens": len(gen.tokens), "text": gen.text, "prompt_tokens": prompt,
            "cached_tokens": cached, "candidates": meta.get("candidates"), "message_index": seq, "variant": variant}
