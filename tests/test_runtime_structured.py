"""Structured output (runtime/structured.py, llguidance): every output parses and validates against its JSON
schema (jsonschema), greedy and sampled, through runtime.generate and the scheduler (rows with and without a
schema in one batch), on torch and onnxruntime; a char vocabulary that cannot spell JSON is refused up front."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from runtime import generate as cli
from runtime.loop import GenerationError, SamplingParams, generate
from runtime.open_backend import open_backend
from runtime.scheduler import Completion, Scheduler
from runtime.structured import json_object_grammar, json_schema_grammar, regex_grammar
from tests.helpers import save_random_hf_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {  # bounded, so a random model's output always completes within max_new_tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "A longer prompt, about the weather today"]
SAMPLED = [dict(temperature=1.0, top_k=None, seed=s) for s in (1, 2)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2-shaped model with GPT-2's BPE (the demo's char vocabulary has no `{`)."""
    return save_random_hf_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2", seed=3, initializer_range=0.2,
                               n_layer=2, n_head=2, n_embd=32, n_positions=256)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend(request, gpt2_dir, tmp_path_factory):
    if request.param == "torch":
        return open_backend("torch", str(gpt2_dir))
    from export.onnx import export_artifact

    out = tmp_path_factory.mktemp("art") / "gpt2"
    export_artifact(gpt2_dir, out, verify=False, log=lambda s: None)
    return open_backend("onnxruntime", str(out), threads=1)


def valid(text: str, schema: dict) -> bool:
    jsonschema.validate(json.loads(text), schema)  # raises with the reason
    return True


@pytest.mark.parametrize("sampling", [dict(greedy=True), *SAMPLED], ids=["greedy", "seed1", "seed2"])
def test_generate_output_validates(backend, sampling):
    tok = backend.tokenizer
    params = SamplingParams(max_new_tokens=80, grammar=json_schema_grammar(SCHEMA), **sampling)
    r = generate(backend, [tok.encode(p) for p in PROMPTS], params)
    for text, reason in zip(r.texts, r.finish_reasons):
        assert valid(text, SCHEMA) and reason == "stop", text
    free = generate(backend, [tok.encode(PROMPTS[0])], SamplingParams(max_new_tokens=40, **sampling))
    with pytest.raises(ValueError):  # the constraint is what makes it JSON
        json.loads(free.texts[0])


def test_scheduler_rows_with_and_without_a_schema_in_one_batch(backend):
    tok = backend.tokenizer
    grammar = json_schema_grammar(SCHEMA)
    kinds = [SamplingParams(max_new_tokens=80, greedy=True, grammar=grammar),
             SamplingParams(max_new_tokens=30, greedy=True),
             SamplingParams(max_new_tokens=80, grammar=grammar, **SAMPLED[0]),
             SamplingParams(max_new_tokens=30, **SAMPLED[1])]
    rows = [Completion(tok.encode(p), k) for p, k in zip(PROMPTS * 2, kinds)]
    scheduler = Scheduler(backend, max_batch=4, max_queue=8)
    scheduler.submit(rows)
    for _ in range(200):
        if all(c.finish_reason for c in rows):
            break
        scheduler.step()
    for c in rows:  # each row is what runtime.generate gives it alone
        alone = generate(backend, [c.prompt], c.params)
        assert c.tokens == alone.tokens[0], c.params
        if c.params.grammar is not None:
            assert valid(c.text, SCHEMA) and c.finish_reason == "stop"


def test_json_object_and_regex():
    backend = open_backend("torch", "demo")  # a char vocabulary: no `{`, no `"`
    tok = backend.tokenizer
    for grammar in (json_schema_grammar(SCHEMA), json_object_grammar()):
        with pytest.raises(GenerationError, match="cannot spell"):
            generate(backend, [tok.encode("A")], SamplingParams(max_new_tokens=40, greedy=True, grammar=grammar))
    regex = r"[A-Z][a-z]+( [a-z]+){2,5}\."  # what it can spell; it ends with the regex (a virtual end token)
    for sampling in (dict(greedy=True), *SAMPLED):
        r = generate(backend, [tok.encode("ROMEO:\n")],
                     SamplingParams(max_new_tokens=60, grammar=regex_grammar(regex), **sampling))
        assert re.fullmatch(regex, r.texts[0]) and r.finish_reasons == ["stop"], r.texts[0]


def test_json_object_on_gpt2(gpt2_dir):
    backend = open_backend("torch", str(gpt2_dir))
    tok = backend.tokenizer
    close = tuple((tok.encode(s)[0], 6.0) for s in ('"', "}", '"}'))  # a random model: nudge it to finish
    r = generate(backend, [tok.encode(p) for p in PROMPTS],
                 SamplingParams(max_new_tokens=120, greedy=True, grammar=json_object_grammar(), logit_bias=close))
    for text, reason in zip(r.texts, r.finish_reasons):
        assert isinstance(json.loads(text), dict) and reason == "stop", text


def test_cli_json_schema(gpt2_dir, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert cli.main(["--model", str(gpt2_dir), "--prompt", "Hello", "--json-schema", str(schema), "--seed", "3",
                     "--max-new-tokens", "80"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and valid(out[len("Hello"):-1], SCHEMA)
    schema.write_text("{not json")
    with pytest.raises(Exception, match="not a JSON schema file"):
        cli.main(["--model", str(gpt2_dir), "--prompt", "Hello", "--json-schema", str(schema)])
