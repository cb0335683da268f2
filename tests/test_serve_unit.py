"""The serving machinery without HTTP: batched decode steps, the worker, the store, the KV-cache LRU."""

import sqlite3
import threading

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.chat.session import Engine, Session
from dialogen.chat.templates import get_template
from dialogen.decoding.settings import Sampling
from dialogen.models.loading import load
from dialogen.serve.batching import decode_rows
from dialogen.serve.service import Keys, SessionCache
from dialogen.serve.store import Store
from dialogen.serve.worker import Busy, Cancelled, Worker


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    path, _ = request.getfixturevalue(request.param)
    return load(str(path)).model


@pytest.fixture(scope="module")
def llama(tiny_llama):
    loaded = load(str(tiny_llama[0]))
    return loaded.model, loaded.tokenizer


@torch.no_grad()
def test_batched_decode_step_equals_separate_steps(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (1, n), generator=g) for n in (3, 11, 7)]  # rows of different lengths
    batched = [model.new_cache(1) for _ in prompts]
    single = [model.new_cache(1) for _ in prompts]
    for p, cb, cs in zip(prompts, batched, single):
        model(p, cb)
        model(p, cs)
    for _ in range(4):
        tokens = [int(x) for x in torch.randint(0, 49152, (3,), generator=g)]
        got = decode_rows(model, tokens, batched)  # (3, V)
        want = torch.cat([model(torch.tensor([[tok]]), c)[:, -1] for tok, c in zip(tokens, single)])
        assert (got - want).abs().max().item() < 1e-4
    assert [c.length for c in batched] == [c.length for c in single] == [7, 15, 11]


def _engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer, get_template("chatml", tokenizer), 256, "tiny")


def _replies_direct(model, tokenizer, convos, samplings):
    out = []
    for (system, text), s in zip(convos, samplings):
        out.append(Session(_engine(model, tokenizer), system, s, max_context_tokens=200).send(text).run().text)
    return out


def test_worker_batches_concurrent_replies_and_matches_one_by_one(llama):
    model, tok = llama
    convos = [(None, "hello"), ("Be brief.", "what is up " * 30), (None, "tell me a story"), ("x", "y")]
    samplings = [Sampling(temperature=0, max_new_tokens=12), Sampling(seed=1, max_new_tokens=20),
                 Sampling(seed=2, temperature=1.0, max_new_tokens=15), Sampling(temperature=0, max_new_tokens=9)]
    want = _replies_direct(model, tok, convos, samplings)
    worker = Worker(model, max_active=8, prefill_chunk=16)  # the long prompt goes in chunks
    try:
        eng = _engine(worker.proxy, tok)
        got = [None] * len(convos)

        def job_for(i):
            def run(job):
                got[i] = Session(eng, convos[i][0], samplings[i], max_context_tokens=200).send(convos[i][1]).run().text
            return run

        jobs = [worker.submit(job_for(i), lambda ev: None) for i in range(len(convos))]
        for j in jobs:
            assert j.finished.wait(60)
        assert got == want
        stats = worker.load()
        assert stats["max_batch"] >= 2  # decode steps of different replies ran together
        assert stats["rounds"] < stats["decode_rows"]
        assert stats["completed"] == 4
    finally:
        worker.close()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_worker_runs_plain_replies_itself_batched_and_equal_to_chat(tiny_llama, dtype):
    """`Worker.stream`: the model thread feeds the prompt (in chunks), samples and emits the deltas of
    many replies, decoded in one batch; each reply equals the same turn in `dialogen chat`. With
    blocks (int8), the prompts' chunks are rows of the same native steps as the others' tokens."""
    loaded = load(str(tiny_llama[0]), dtype)
    model, tok = loaded.model, loaded.tokenizer
    convos = [(None, "hello"), ("Be brief.", "what is up " * 30), (None, "tell me a story"), ("x", "y")]
    samplings = [Sampling(temperature=0, max_new_tokens=12), Sampling(seed=1, max_new_tokens=20, stop=["e"]),
                 Sampling(seed=2, temperature=1.0, max_new_tokens=15, logprobs=2),
                 Sampling(temperature=0, max_new_tokens=9, frequency_penalty=1.5)]
    want = [Session(_engine(model, tok), s, p, max_context_tokens=200).send(t).run() for (s, t), p
            in zip(convos, samplings)]
    worker = Worker(model, max_active=8, prefill_chunk=16)
    try:
        eng = _engine(worker.proxy, tok)
        got, deltas, finished = [None] * 4, [[] for _ in convos], []

        def job_for(i):
            def run(job):
                gen = Session(eng, convos[i][0], samplings[i], max_context_tokens=200).send(convos[i][1])
                gen.on_finish = lambda g: finished.append(i)
                worker.stream(gen, deltas[i].append)
                got[i] = gen
            return run

        jobs = [worker.submit(job_for(i), lambda ev: None) for i in range(len(convos))]
        for j in jobs:
            assert j.finished.wait(60)
        for g, w, d in zip(got, want, deltas):
            assert (g.text, g.tokens, g.finish_reason) == (w.text, w.tokens, w.finish_reason)
            assert "".join(d) == g.text
        assert [lp[0] for lp in got[2].logprobs] == pytest.approx([lp[0] for lp in want[2].logprobs], abs=1e-4)
        assert sorted(finished) == [0, 1, 2, 3]  # on_finish ran once each
        stats = worker.load()
        # replies shared steps (how many rounds they shared depends on the machine's timing)
        assert stats["max_batch"] >= 2 and stats["completed"] == 4
    finally:
        worker.close()


def test_worker_stream_cancel_stops_the_reply_and_finishes_it(llama):
    model, tok = llama
    worker = Worker(model)
    seen, events = threading.Event(), []
    try:
        eng = _engine(worker.proxy, tok)

        def run(job):
            gen = Session(eng, None, Sampling(max_new_tokens=200, seed=0, temperature=1.0), max_context_tokens=50).send("hi")

            def on_delta(d):
                seen.set()
                job.cancel()
            try:
                worker.stream(gen, on_delta)
            finally:
                events.append(("finish", gen.finish_reason, len(gen.tokens) < 200))

        job = worker.submit(run, events.append)
        assert job.finished.wait(30) and seen.is_set()
        assert events == [("finish", "interrupted", True), ("cancelled", None)]
        assert worker.load()["cancelled"] == 1

        def cancelled_first(job):  # cancelled before the reply is handed over: it never starts
            job.cancel()
            gen = Session(eng, None, Sampling(max_new_tokens=5), max_context_tokens=50).send("hi")
            try:
                worker.stream(gen, seen.set)
            finally:
                events.append(("finish", gen.finish_reason, gen.tokens))

        events.clear()
        assert worker.submit(cancelled_first, events.append).finished.wait(30)
        assert events == [("finish", "interrupted", []), ("cancelled", None)]
    finally:
        worker.close()


def test_worker_queue_bound_and_cancel(llama):
    model, tok = llama
    worker = Worker(model, max_active=1, max_queue=1)
    gate = threading.Event()
    events = []
    try:
        eng = _engine(worker.proxy, tok)

        def long_reply(job):
            gen = Session(eng, None, Sampling(max_new_tokens=200, seed=0), max_context_tokens=50).send("hi")
            for _ in gen:
                gate.set()
            events.append(("finished", gen.finish_reason))

        first = worker.submit(long_reply, events.append)
        second = worker.submit(lambda job: None, events.append)  # waits in the queue
        with pytest.raises(Busy):
            worker.submit(lambda job: None, events.append)
        assert gate.wait(30)
        first.cancel()
        assert first.finished.wait(30) and second.finished.wait(30)
        assert ("cancelled", None) in events and not any(e[0] == "finished" for e in events)
        assert worker.load()["cancelled"] == 1 and worker.load()["rejected"] == 1
        worker.submit(lambda job: None, events.append).finished.wait(10)  # room again
    finally:
        worker.close()


def test_cancelled_job_raises_at_its_next_model_call(llama):
    model, _ = llama
    worker = Worker(model)
    seen = []
    try:
        def run(job):
            job.cancel()
            try:
                worker.proxy(torch.tensor([[1, 2]]), model.new_cache(1))
            except Cancelled:
                seen.append("cancelled")
                raise
        worker.submit(run, seen.append).finished.wait(10)
        assert seen == ["cancelled", ("cancelled", None)]
    finally:
        worker.close()


def test_worker_logs_admission_rounds_and_release(llama, caplog):
    model, _ = llama
    worker = Worker(model)
    try:
        with caplog.at_level("DEBUG", logger="dialogen.serve"):
            job = worker.submit(lambda job: worker.proxy(torch.tensor([[1, 2]]), model.new_cache(1)), lambda e: None)
            assert job.finished.wait(10)
        messages = [r.getMessage() for r in caplog.records if r.name == "dialogen.serve"]
        assert [m for m in messages if m.startswith("admit job")]
        assert [m for m in messages if m.startswith("round ") and "1 other calls" in m]
        assert [m for m in messages if m.startswith("release job") and "completed after 1 model calls" in m]
    finally:
        worker.close()


def test_store_turns_persist_and_owners_are_isolated(tmp_path):
    path = tmp_path / "s.db"
    store = Store(path)
    assert store.journal_mode() == "wal"
    s = store.create("alice", "You are kind.", {"temperature": 0.5})
    assert store.add_turn(s["id"], "hello there", "hi!", {"finish_reason": "stop"})
    assert store.add_turn(s["id"], "how are you", "fine")
    assert store.get(s["id"], "bob") is None and not store.delete(s["id"], "bob")
    store.close()
    # a second connection (as after a restart) sees every committed turn
    store = Store(path)
    got = store.get(s["id"], "alice")
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "hello there"), ("assistant", "hi!"), ("user", "how are you"), ("assistant", "fine")]
    assert got["messages"][1]["finish_reason"] == "stop"
    assert got["persona"] == "You are kind." and got["settings"] == {"temperature": 0.5}
    assert got["title"] == "hello there"
    assert [x["id"] for x in store.list("alice")] == [s["id"]] and store.list("bob") == []
    assert store.delete(s["id"], "alice") and store.get(s["id"], "alice") is None
    assert not store.add_turn(s["id"], "late", "reply")  # a deleted session takes no turns
    raw = sqlite3.connect(path).execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert raw == 0  # its messages went with it


def test_session_cache_evicts_least_recently_used_within_budget(llama):
    model, tok = llama
    eng = _engine(model, tok)
    sessions = [Session(eng, None, Sampling(max_new_tokens=4), 200) for _ in range(3)]
    for s in sessions:
        s.send("hello").run()
    one = sessions[0].cache.nbytes()
    cache = SessionCache(budget_bytes=2 * one)
    cache.put("a", sessions[0])
    cache.put("b", sessions[1])
    assert cache.get("a") is sessions[0]  # a is now the most recent
    claim = cache.claim("b")
    assert claim is not None and cache.claim("b") is None  # b is busy: one turn at a time
    cache.put("c", sessions[2])  # over budget: b is least recent but busy, so a goes
    assert cache.get("a") is None and cache.get("b") is sessions[1] and cache.nbytes() <= 2 * one
    cache.release("b", claim)
    again = cache.claim("b")
    cache.release("b", claim)  # a stale release leaves the newer claim alone
    assert cache.claim("b") is None
    cache.release("b", again)
    cache.put("a", sessions[0])  # c is now the least recent (reading b above refreshed it)
    assert cache.get("c") is None and cache.get("b") is sessions[1] and cache.evictions == 2


def test_keys_map_to_owners():
    keys = Keys(["k1", "k2"])
    assert keys.owner("Bearer k1") and keys.owner("Bearer k1") != keys.owner("Bearer k2")
    assert keys.owner("Bearer nope") is None and keys.owner(None) is None and keys.owner("k1") is None
    assert Keys([]).owner(None) == ""


def test_stateless_requests_reuse_a_kept_kv_cache(llama, tmp_path):
    """A client that resends the whole conversation each turn: its later turns feed only the tokens
    after the kept prefix, and the next-token logits equal a fresh session's (up to float rounding)."""
    from dialogen.decoding.settings import Decoding
    from dialogen.serve.service import Limits, Service

    model, tok = llama
    svc = Service(_engine(model, tok), Store(tmp_path / "s.db"), Keys(), Limits())
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=6)
    first_logits = []  # the prefill's output: the distribution of a reply's first token
    hook = model.register_forward_hook(lambda m, args, out: first_logits.append(out[0, -1].clone()))

    def turn(history, user, pooled, owner="k1"):
        out = {}

        def run(job):
            if pooled:
                s = svc.stateless_session(owner, "Be brief.", greedy, history, user)
            else:
                s = svc.new_session("Be brief.", greedy, history)
            n = len(first_logits)
            gen, prompt, cached = svc.reply(s, user, greedy, Decoding())
            out.update(text=gen.run().text, prompt=prompt, cached=cached, logits=first_logits[n])
            if pooled:
                svc.prefixes.give(owner, s, prompt)

        assert svc.worker.submit(run, lambda event: None).finished.wait(60)
        return out

    try:
        history, cached = [], []
        for user in ["Hello there!", "What is your name?", "Where do you live?"]:
            got, want = turn(history, user, pooled=True), turn(history, user, pooled=False)
            assert got["prompt"] == want["prompt"]
            assert (got["logits"] - want["logits"]).abs().max().item() < 1e-4
            cached.append(got["cached"])
            history = history + [Message("user", user), Message("assistant", got["text"])]
        assert cached[0] == 0 and cached[1] > 10 and cached[2] > cached[1]
        assert len(svc.prefixes) == 1  # each turn took the kept session and gave it back
        assert turn(history, "Hi again.", pooled=True, owner="k2")["cached"] == 0  # another key's: never lent
        assert len(svc.prefixes) == 2
        other = turn([], "A new conversation.", pooled=True)  # shares only the persona: served by a copy
        assert 0 < other["cached"] < cached[1] and len(svc.prefixes) == 3
        again = turn(history, "And then?", pooled=True)  # the first conversation still has its own cache
        assert again["cached"] > cached[2]
    finally:
        hook.remove()
        svc.close()


def test_prefix_pool_lends_the_best_match_and_stays_within_its_bounds(llama):
    from dialogen.serve.service import PrefixPool

    model, tok = llama
    eng = _engine(model, tok)

    def session(*texts):
        s = Session(eng, "persona", Sampling(max_new_tokens=2), 200)
        s.messages = [Message("user", t) for t in texts]
        ids = s.prompt_ids()
        model(torch.tensor([ids]), s.cache)  # a cache that holds the prompt
        s.cache_ids = ids
        return s, len(ids)

    pool = PrefixPool(budget_bytes=1 << 30, max_sessions=2)
    a, na = session("one")
    b, nb = session("two", "three")
    pool.give("k", a, na)
    pool.give("k", b, nb)
    want = [Message("system", "persona"), Message("user", "two"), Message("user", "three"), Message("user", "four")]
    fresh = lambda: Session(eng, "persona", Sampling(max_new_tokens=2), 200)  # noqa: E731
    assert pool.take("other key", want, fresh) is None  # never another owner's
    assert pool.take("k", want, fresh) is b and len(pool) == 1  # continues b's conversation: lent
    assert pool.take("k", [Message("user", "no persona")], fresh) is None and len(pool) == 1  # nothing in common
    copied = pool.take("k", [Message("system", "persona"), Message("user", "another")], fresh)  # the persona only
    assert copied is not a and len(pool) == 1 and copied.cache_ids == a.cache_ids  # a copy; a stays for its own
    assert copied.cache.length == a.cache.length and copied.cache.k[0] is not a.cache.k[0]
    assert torch.equal(copied.cache.k[0][:, :, :na], a.cache.k[0][:, :, :na])
    c, nc = session("five")
    pool.give("k", b, nb)
    pool.give("k", c, nc)  # a third: the oldest (a) goes
    assert len(pool) == 2 and pool.take("k", want, fresh) is b
    small = PrefixPool(budget_bytes=1, max_sessions=8)
    small.give("k", c, nc)  # over the byte budget: not kept
    assert len(small) == 0


def test_the_model_thread_alone_computes_in_parallel(llama):
    """The model thread keeps the thread count its creator had, and job threads take one, so no
    other thread starts an OpenMP pool (more pool threads than cores slows every decode step,
    `kernels.threads.in_passing_thread`). A count set later elsewhere does not change the model thread's."""
    from dialogen.models.kernels import threads

    model, _ = llama
    seen = {}

    class Probe(torch.nn.Module):  # not batchable: its calls run on the model thread as they are
        def forward(self, ids, cache=None):
            seen["model"] = torch.get_num_threads()
            return model(ids, cache)

    before = torch.get_num_threads()
    threads.own_threads(2)
    worker = Worker(Probe())
    try:
        def job(_):
            seen["job"] = torch.get_num_threads()
            worker.proxy(torch.tensor([[1, 2, 3]]), model.new_cache(1))

        for _ in range(2):
            assert worker.submit(job, lambda event: None).finished.wait(30)
        assert seen == {"job": 1, "model": 2}
    finally:
        worker.close()
        threads.own_threads(before)
    assert threads.in_passing_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="bad"):
        threads.in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
