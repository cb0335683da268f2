"""POST /v1/completions (and /completions): OpenAI's legacy text completion, plain or streamed.

The prompt is the model's input as it is: no chat template, control tokens written in it are
parsed (`<|im_start|>` is one token), as llama.cpp's server does. The reply stops at the
tokenizer's end-of-sequence token, a `stop` string or `max_tokens`. A list of prompts gives `n`
choices each (choice `i * n + j` is prompt i's j-th). Each choice is one job on the worker, so
its decode steps join the batched step with every other reply.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..decoding.generate import Generation
from . import protocol as P
from .channel import Channel, read_json, submit_all
from .completions import SSE_HEADERS, choice_sampling, collect_all, fit_reply, sse_events
from .protocol import ApiError
from .schema import CompletionRequest
from .service import Service


def add_routes(app: FastAPI, svc: Service):
    async def completions(request: Request):
        body = await read_json(request, svc.limits.max_body_bytes)
        req = parse_request(svc, body)
        channel = Channel()
        jobs = submit_all(svc, [_job(svc, req, i) for i in range(len(req["prompts"]) * req["n"])], channel)
        headers = P.ignored_header(req["ignored"])
        if req["stream"]:
            return StreamingResponse(_stream(svc, req, channel, jobs), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        results = await collect_all(channel, jobs, request)
        if isinstance(results, JSONResponse):
            return results
        choices = [_choice(i, r["text"], r["finish_reason"], r["logprobs"]) for i, r in sorted(results.items())]
        usage = P.usage(req["prompt_tokens"], sum(r["tokens"] for r in results.values()))
        return JSONResponse(_completion(svc, req, choices, usage), headers=headers)

    for path in ("/v1/completions", "/completions"):
        app.add_api_route(path, completions, methods=["POST"])


def parse_request(svc: Service, body: dict) -> dict:
    req, ignored = P.read_request(svc, CompletionRequest, body)
    for key, ok in (("echo", not req.echo), ("suffix", not req.suffix), ("best_of", (req.best_of or 1) <= 1),
                    ("beam_size", (req.beam_size or 1) <= 1), ("num_candidates", (req.num_candidates or 1) <= 1)):
        if not ok:
            raise ApiError(400, f"'{key}' is not supported by /v1/completions on this server", key,
                           code="unsupported_parameter")
    n = req.n or 1
    if n * len(req.prompt) > svc.limits.max_n:
        raise ApiError(400, f"'n' times the number of prompts must be at most {svc.limits.max_n} on this server, "
                            f"got {n * len(req.prompt)}", "n")
    eng = svc.engine_for(req.model)  # a LoRA adapter's, or the base's
    tok = eng.tokenizer
    prompts = [tok.encode_prompt(p) for p in req.prompt]  # as llama-server: BOS/EOS by the vocabulary's flags
    changes = P.sampling_changes(req, svc.limits.max_tokens, svc.vocab_size)
    fit_reply(svc, changes, max(len(p) for p in prompts), "prompt")
    changes["logprobs"] = req.logprobs
    return {"prompts": prompts, "n": n, "stream": bool(req.stream), "ignored": ignored,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "sampling": P.make_sampling(svc.sampling, changes), "prompt_tokens": sum(len(p) for p in prompts),
            "id": P.new_id("cmpl"), "created": int(time.time()), "model": svc.served_name(req.model),
            "engine": eng}


def _job(svc: Service, req: dict, index: int):
    sampling = choice_sampling(req["sampling"], index)
    prompt = req["prompts"][index // req["n"]]

    def run(job):
        eng = req["engine"]
        stop_ids = {eng.tokenizer.eos_id} - {None}
        gen = Generation(eng.model, eng.tokenizer, prompt, eng.model.new_cache(1), sampling, stop_ids)
        logprobs = LegacyLogprobs(eng.tokenizer, gen, sampling.logprobs)
        svc.worker.stream(gen, lambda delta: job.emit(("delta", (delta, logprobs.new(delta)))))
        job.emit(("done", {"finish_reason": gen.finish_reason, "tokens": len(gen.tokens), "text": gen.text,
                           "logprobs_tail": logprobs.new(""), "logprobs": logprobs.all()}))

    return run


class LegacyLogprobs:
    """The legacy `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`),
    whole or a stream chunk's share at a time."""

    def __init__(self, tokenizer, gen, top: int | None):
        self.tokenizer, self.gen, self.top = tokenizer, gen, top
        self.sent, self.offset = 0, 0

    def _part(self, lo: int, hi: int, offset: int) -> dict:
        items = P.token_logprobs(self.tokenizer, self.gen.tokens[lo:hi], self.gen.logprobs[lo:hi])
        offsets = []
        for item in items:
            offsets.append(offset)
            offset += len(bytes(item["bytes"]).decode("utf-8", "ignore"))
        return {"tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
                "top_logprobs": [{a["token"]: a["logprob"] for a in i["top_logprobs"]} for i in items],
                "text_offset": offsets}

    def new(self, delta: str) -> dict | None:
        if self.top is None:
            return None
        end = len(self.gen.logprobs)
        out = self._part(self.sent, end, self.offset)
        self.sent, self.offset = end, self.offset + len(delta)
        return out

    def all(self) -> dict | None:
        return None if self.top is None else self._part(0, len(self.gen.logprobs), 0)


def _choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def _completion(svc: Service, req: dict, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": req["id"], "object": "text_completion", "created": req["created"], "model": req["model"],
           "choices": choices, "system_fingerprint": None}
    if usage is not None:
        out["usage"] = usage
    return out


async def _stream(svc: Service, req: dict, channel: Channel, jobs: list):
    """SSE: a `text_completion` chunk per delta, one with the finish reason per choice, [DONE]."""
    def delta(index, payload):
        text, logprobs = payload
        return _completion(svc, req, [_choice(index, text, None, logprobs)])

    def done(index, payload):
        return _completion(svc, req, [_choice(index, "", payload["finish_reason"], payload["logprobs_tail"])])

    def usage(finished):
        if not req["include_usage"]:
            return None
        return _completion(svc, req, [], P.usage(req["prompt_tokens"], sum(p["tokens"] for p in finished)))

    async for event in sse_events(channel, jobs, delta, done, usage):
        yield event
