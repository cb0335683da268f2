"""POST /v1/chat/completions (and /chat/completions): OpenAI's chat-completions protocol, plain or
streamed (SSE).

Stateless: each request carries the whole conversation. Each of the `n` choices is one job on
the worker (choice i samples with seed + i when a seed is given, so choices differ but repeat).
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat.messages import Message
from ..decoding.settings import SEED_MIN
from . import protocol as P
from .channel import Channel, ClientGone, job_error, read_json, submit_all
from .protocol import ApiError
from .schema import ChatRequest
from .service import Service
from .tools import Holder, calls_of, read_tools, stream_pieces

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def add_routes(app: FastAPI, svc: Service):
    async def chat_completions(request: Request):
        body = await read_json(request, svc.limits.max_body_bytes)
        req = parse_request(svc, body)
        req["owner"] = request.state.owner
        channel = Channel()
        jobs = submit_all(svc, [_choice_job(svc, req, i) for i in range(req["n"])], channel)
        headers = P.ignored_header(req["ignored"])
        if req["stream"]:
            return StreamingResponse(_stream(svc, req, channel, jobs), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        out = await _collect(svc, req, channel, jobs, request)
        return out if isinstance(out, JSONResponse) else JSONResponse(out, headers=headers)

    for path in ("/v1/chat/completions", "/chat/completions"):
        app.add_api_route(path, chat_completions, methods=["POST"])


def parse_request(svc: Service, body: dict) -> dict:
    """Check a request body; returns the plain values the jobs need."""
    req, ignored = P.read_request(svc, ChatRequest, body)
    messages = P.chat_messages(req)
    n = req.n or 1
    if n > svc.limits.max_n:
        raise ApiError(400, f"'n' must be at most {svc.limits.max_n} on this server, got {n}", "n")
    stream = bool(req.stream)
    changes = P.sampling_changes(req, svc.limits.max_tokens, svc.vocab_size)
    has_system = messages[0].role == "system"
    system = messages[0].content if has_system else svc.default_persona
    prefill = messages[-1].role == "assistant"  # the reply continues it
    whole = messages[-1].role != "user"  # no new user turn: a prefill, or tools' results to answer
    history = messages[1 if has_system else 0:None if whole else -1]
    decoding = P.make_decoding(svc.decoding, P.decoding_changes(req, svc.limits.max_candidates))
    eng = svc.engine_for(req.model)  # a LoRA adapter's, or the base's
    tools = read_tools(req, eng.template, eng.tokenizer.control_ids, decoding.searches)
    prompt = svc.prompt_len(([Message("system", system)] if system else []) + messages[1 if has_system else 0:],
                            continue_final=prefill, tools=tools and tools["tools"], engine=eng)
    fit_reply(svc, changes, prompt)
    if tools is not None and tools["grammar"] is not None:
        changes["constraint"] = tools["grammar"]
    changes["logprobs"] = P.logprobs_setting(req, decoding.searches)
    sampling = P.make_sampling(svc.sampling, changes)
    return {"system": system, "history": history, "user": None if whole else messages[-1].content, "n": n,
            "stream": stream, "tools": tools,
            "ignored": ignored,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage), "sampling": sampling,
            "decoding": decoding, "prompt_tokens": prompt, "id": P.new_id(), "created": int(time.time()),
            "model": svc.served_name(req.model), "engine": eng}


def fit_reply(svc: Service, changes: dict, prompt: int, param: str = "messages"):
    """Check that the prompt and max_tokens fit the context; without max_tokens, set it to the
    server's default within what the context leaves."""
    ctx = svc.context_length
    if "max_new_tokens" in changes:
        if prompt + changes["max_new_tokens"] > ctx:
            raise P.context_error(prompt, changes["max_new_tokens"], ctx, param)
    else:
        changes["max_new_tokens"] = min(svc.sampling.max_new_tokens, ctx - prompt)
        if changes["max_new_tokens"] < 1:
            raise P.context_error(prompt, 1, ctx, param)


def choice_sampling(sampling, index: int):
    """Choice `index` samples with seed + index (wrapped within the 64-bit range): choices differ but repeat."""
    if sampling.seed is None or not index:
        return sampling
    return sampling.replace(seed=(sampling.seed + index - SEED_MIN) % 2**64 + SEED_MIN)


def _choice_job(svc: Service, req: dict, index: int):
    sampling = choice_sampling(req["sampling"], index)

    def run(job):
        budget = svc.context_length - sampling.max_new_tokens
        searches = req["decoding"].searches  # a search runs on caches of its own: nothing to lend or keep
        tools = req["tools"]
        session = svc.stateless_session(req["owner"], req["system"], sampling, req["history"], req["user"], budget,
                                        pooled=not searches, tools=tools and tools["tools"], engine=req["engine"])
        gen, prompt, cached = svc.reply(session, req["user"], sampling, req["decoding"])
        logprobs = Logprobs(req["engine"].tokenizer, gen, sampling.logprobs is not None)
        held = Holder(tools, lambda delta, lp: job.emit(("delta", (delta, lp))))
        svc.worker.stream(gen, lambda delta: held.delta(delta, logprobs.new()))
        if not searches:  # its KV cache holds this prompt: keep it for the next turn
            svc.prefixes.give(req["owner"], session, prompt)
        calls = calls_of(gen.text, tools)
        finish = "tool_calls" if calls and gen.finish_reason == "stop" else gen.finish_reason
        if held.held and not calls:  # text that looked like the start of a call to the end
            for piece, lp in held.held:
                job.emit(("delta", (piece, lp)))
        job.emit(("done", {"finish_reason": finish, "tokens": len(gen.tokens), "text": gen.text, "tool_calls": calls,
                           "cached_tokens": cached, "candidates": candidates(gen), "logprobs_tail": logprobs.new(),
                           "logprobs": logprobs.all()}))

    return run


class Logprobs:
    """A reply's token logprobs in OpenAI's shape, handed out as the stream goes (None when not asked)."""

    def __init__(self, tokenizer, gen, wanted: bool):
        self.tokenizer, self.gen, self.wanted, self.sent = tokenizer, gen, wanted, 0

    def new(self) -> list | None:
        """The items of the tokens sampled since the last call: a chunk's share."""
        if not self.wanted:
            return None
        end = len(self.gen.logprobs)
        out = P.token_logprobs(self.tokenizer, self.gen.tokens[self.sent:end], self.gen.logprobs[self.sent:end])
        self.sent = end
        return out

    def all(self) -> list | None:
        return P.token_logprobs(self.tokenizer, self.gen.tokens, self.gen.logprobs) if self.wanted else None


def candidates(gen) -> list[dict] | None:
    """Every candidate of a searched reply with its scores (None for a plain reply)."""
    if not getattr(gen, "candidates", None):
        return None
    return [{**c, "score": c["scores"]["score"]} for c in gen.candidates_dicts()]


async def _collect(svc: Service, req: dict, channel: Channel, jobs: list, request: Request):
    results = await collect_all(channel, jobs, request)
    if isinstance(results, JSONResponse):
        return results
    choices = [P.choice(i, results[i]["text"], results[i]["finish_reason"], results[i]["candidates"],
                        results[i]["logprobs"], results[i]["tool_calls"]) for i in range(req["n"])]
    tokens = sum(r["tokens"] for r in results.values())
    cached = min(r["cached_tokens"] for r in results.values())
    return P.completion(req["id"], req["model"], choices, P.usage(req["prompt_tokens"], tokens, cached),
                        req["created"])


async def collect_all(channel: Channel, jobs: list, request: Request) -> dict | JSONResponse:
    """Every job's "done" payload by index (or the 499 answer when the client left)."""
    results: dict[int, dict] = {}
    try:
        while len(results) < len(jobs):
            index, kind, payload = await channel.get(request)
            if kind == "done":
                results[index] = payload
            elif kind == "error":
                raise job_error(payload)
            elif kind == "cancelled":
                raise ApiError(499, "the request was cancelled", code="cancelled")
    except ClientGone:
        return JSONResponse(P.error_body("client closed the request", "invalid_request_error"), status_code=499)
    finally:
        for j in jobs:
            j.cancel()
    return results


async def _stream(svc: Service, req: dict, channel: Channel, jobs: list):
    """SSE chunks: a role chunk per choice, content deltas, a finish chunk per choice, [DONE]."""
    cid, model, created = req["id"], req["model"], req["created"]
    for i in range(req["n"]):
        yield P.sse(P.chunk(cid, model, created, [P.delta_choice(i, {"role": "assistant", "content": ""})]))

    def delta(index, payload):
        text, logprobs = payload
        return P.chunk(cid, model, created, [P.delta_choice(index, {"content": text}, None, logprobs)])

    def done(index, payload):
        final = P.delta_choice(index, {}, payload["finish_reason"], payload["logprobs_tail"])
        if payload["candidates"] is not None:
            final["candidates"] = payload["candidates"]
        pieces = [P.chunk(cid, model, created, [P.delta_choice(index, d)]) for d in stream_pieces(
            payload["tool_calls"] or [])]
        return [*pieces, P.chunk(cid, model, created, [final])]

    def usage(finished):
        if not req["include_usage"]:
            return None
        used = P.usage(req["prompt_tokens"], sum(p["tokens"] for p in finished),
                       min(p["cached_tokens"] for p in finished))
        return P.chunk(cid, model, created, [], used)

    try:
        async for event in sse_events(channel, jobs, delta, done, usage):
            yield event
    finally:  # also when the client left during the role chunks, before sse_events started
        for j in jobs:
            j.cancel()


async def sse_events(channel: Channel, jobs: list, delta, done, last):
    """The jobs' events as SSE: `delta(index, payload)` makes a chunk, `done(index, payload)` one or
    a list of them, `last(done payloads)` a final chunk (or None); then [DONE]. A job's error ends
    the stream with its error object. If the client disconnects, the server cancels this generator, and `finally`
    cancels the jobs."""
    finished = []
    try:
        while len(finished) < len(jobs):
            index, kind, payload = await channel.get()
            if kind == "delta":
                yield P.sse(delta(index, payload))
            elif kind == "done":
                finished.append(payload)
                out = done(index, payload)
                for c in out if isinstance(out, list) else [out]:
                    yield P.sse(c)
            elif kind == "error":
                yield P.sse(job_error(payload).body())
                return
            else:
                return
        final = last(finished)
        if final is not None:
            yield P.sse(final)
        yield P.sse("[DONE]")
    finally:
        for j in jobs:
            j.cancel()
