"""Constrained decoding: a JSON schema masks the tokens of sampling, greedy, beam search, sampled
candidates and batched generation; every reply that stops parses and validates."""

import json

import jsonschema
import pytest
import torch

from dialogen.decoding.batch import generate_batch, sample_replies
from dialogen.decoding.beam import BeamSettings, beam_search
from dialogen.decoding.constrain import Grammar, Matcher
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.errors import UserError
from dialogen.models.loading import load

# bounded: every path through it ends within a few dozen tokens, even for a random model
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["intent", "ok", "name"],
          "properties": {"intent": {"enum": ["greet", "order", "cancel"]}, "ok": {"type": "boolean"},
                         "name": {"type": "string", "maxLength": 8}}}


@pytest.fixture(scope="module")
def tiny(tiny_llama, smol_tokenizer):
    return load(str(tiny_llama[0])).model, smol_tokenizer


def _stop(tok):
    return {tok.eos_id}


def _valid(tok, tokens, schema=SCHEMA):
    value = json.loads(tok.decode(tokens))
    jsonschema.validate(value, schema)
    return value


def test_sampling_and_greedy_follow_the_schema(tiny):
    model, tok = tiny
    prompt = tok.encode_text("Reply in JSON:")
    g = Grammar.json_schema(SCHEMA)
    for seed in range(6):
        s = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=80, seed=seed, constraint=g)
        gen = Generation(model, tok, prompt, model.new_cache(1), s, _stop(tok)).run()
        assert gen.finish_reason == "stop"
        _valid(tok, gen.tokens)
    greedy = Generation(model, tok, prompt, model.new_cache(1), Sampling(temperature=0, max_new_tokens=80,
                                                                         constraint=g), _stop(tok)).run()
    assert greedy.finish_reason == "stop" and _valid(tok, greedy.tokens)["intent"] in ("greet", "order", "cancel")
    free = Generation(model, tok, prompt, model.new_cache(1), Sampling(temperature=0, max_new_tokens=20), set()).run()
    with pytest.raises(ValueError):  # the same model unconstrained: not JSON at all
        json.loads(tok.decode(free.tokens))


def test_beam_search_candidates_and_batches_follow_the_schema(tiny):
    model, tok = tiny
    prompt = tok.encode_text("Reply in JSON:")
    g = Grammar.json_schema(SCHEMA)
    beams = beam_search(model, prompt, BeamSettings(beam_size=3, max_new_tokens=80), _stop(tok),
                        grammar=lambda vocab: Matcher(g, tok, vocab, _stop(tok)))
    assert len(beams) == 3 and len({tuple(c.tokens) for c in beams}) == 3
    for c in beams:
        assert c.finish_reason == "stop"
        _valid(tok, c.tokens)
    s = Sampling(temperature=1.0, max_new_tokens=80, seed=3, constraint=g)
    for c in sample_replies(model, prompt, 4, s, _stop(tok), tok):
        assert c.finish_reason == "stop" and _valid(tok, c.tokens)
    rows = generate_batch(model, [prompt, tok.encode_text("JSON please")], s, _stop(tok), tok)
    for c in rows:
        assert c.finish_reason == "stop" and _valid(tok, c.tokens)


def test_json_object_and_the_mask(tiny):
    model, tok = tiny
    m = Matcher(Grammar.json_object(), tok, model.cfg.vocab_size, _stop(tok))
    allowed = m.allowed()
    assert allowed.dtype == torch.bool and allowed.shape == (model.cfg.vocab_size,)
    assert all(tok.decode([i]).startswith("{") for i in torch.nonzero(allowed).flatten().tolist())
    assert not allowed[tok.eos_id]  # an empty reply is not an object
    for t in tok.encode_text('{"a": [1, 2]}'):
        assert m.allowed()[t]
        m.accept(t)
    assert m.allowed()[tok.eos_id] and m.complete


@pytest.mark.parametrize("schema,match", [("{not json", "not valid JSON"), ("[1, 2]", "must be an object"),
                                          ({"type": "object", "properties": {"a": {"type": "nope"}}}, "cannot be used")])
def test_bad_schemas_are_user_errors(schema, match):
    with pytest.raises(UserError, match=match):
        Grammar.json_schema(schema)


def test_a_reply_out_of_budget_is_closed_not_cut(tiny):
    """json_object with a random model never ends on its own; at every budget, sampled or greedy,
    the reply still parses: the closing path takes over before the tokens run out."""
    model, tok = tiny
    prompt = tok.encode_text("JSON:")
    for budget in (3, 6, 12, 25):
        for seed, temperature in ((0, 1.0), (1, 1.0), (None, 0.0)):
            s = Sampling(temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=budget, seed=seed,
                         constraint=Grammar.json_object())
            gen = Generation(model, tok, prompt, model.new_cache(1), s, _stop(tok)).run()
            assert gen.finish_reason == "stop" and len(gen.tokens) < budget
            assert isinstance(json.loads(tok.decode(gen.tokens)), dict)
    s = Sampling(temperature=1.0, max_new_tokens=10, seed=5, constraint=Grammar.json_object())
    for c in sample_replies(model, prompt, 3, s, _stop(tok), tok):
        assert isinstance(json.loads(tok.decode(c.tokens)), dict)
    beams = beam_search(model, prompt, BeamSettings(beam_size=2, max_new_tokens=14), _stop(tok),
                        grammar=lambda vocab: Matcher(Grammar.json_object(), tok, vocab, _stop(tok)))
    assert beams and all(isinstance(json.loads(tok.decode(c.tokens)), dict) for c in beams)


def test_cli_json_schema_and_json(tiny_llama, tmp_path, capsys):
    from dialogen.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    msgs = tmp_path / "msgs.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Book a table."}]))
    base = ["generate", str(msgs), "--model", str(tiny_llama[0]), "--template", "chatml", "--temperature", "1",
            "--seed", "4", "--max-new-tokens", "60"]
    assert main([*base, "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["reply"]), SCHEMA)
    assert main([*base, "--json", "--max-new-tokens", "9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(json.loads(out["reply"]), dict) and out["tokens"] < 9
    schema.write_text('{"type": "object", "properties": {"a": {"type": 5}}}')
    assert main([*base, "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert f"--json-schema {schema}" in err and len(err.strip().splitlines()) == 1


def test_python_entry_point_takes_a_constraint(tiny_llama):
    import dialogen

    model = dialogen.load(str(tiny_llama[0]), template="chatml")
    reply = model.chat([{"role": "user", "content": "Book a table."}], temperature=1.0, seed=1, max_new_tokens=40,
                       constraint=Grammar.json_schema(SCHEMA))
    jsonschema.validate(json.loads(reply), SCHEMA)
