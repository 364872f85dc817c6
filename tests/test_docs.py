"""The README and docs/ stay true to the code: the generated blocks are what the generator writes today (node
counts of the tiny and demo graphs, every command's usage line; gpt2's counts take a minute and are left to
`python -m benchmarks.write_docs`), and every module, test file and link the docs name exists."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from benchmarks import write_docs
from model.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160  # an entrance, not the manual (issue 11)
CHEAP_BLOCKS = write_docs.blocks(gpt2=False)


@pytest.mark.parametrize("doc,name", list(CHEAP_BLOCKS), ids=[f"{d}:{n}" for d, n in CHEAP_BLOCKS])
def test_generated_block_is_up_to_date(doc, name):
    written = write_docs.read_block((write_docs.DOCS / doc).read_text(), name)
    assert written == CHEAP_BLOCKS[(doc, name)]().rstrip(), (
        f"docs/{doc} block {name} is stale: run `python -m benchmarks.write_docs`")


def test_every_marker_is_paired_and_the_slow_blocks_exist():
    for path in DOC_FILES:
        text = path.read_text()
        begins = re.findall(r"<!-- BEGIN GENERATED ([\w-]+) \(", text)
        ends = re.findall(r"<!-- END GENERATED ([\w-]+) -->", text)
        assert begins == ends, path.name
    all_blocks = write_docs.blocks(gpt2=True, bench_json=Path("bench.json"))
    for doc, name in all_blocks:
        write_docs.read_block((write_docs.DOCS / doc).read_text(), name)  # raises when missing


def test_replace_block_rewrites_only_between_the_markers():
    text = f"before\n{write_docs.begin('x')}\nold\n{write_docs.end('x')}\nafter\n"
    new = write_docs.replace_block(text, "x", "new\nlines\n")
    assert new == f"before\n{write_docs.begin('x')}\nnew\nlines\n{write_docs.end('x')}\nafter\n"
    assert write_docs.read_block(new, "x") == "new\nlines"
    with pytest.raises(ModelError, match="'y'"):
        write_docs.replace_block(text, "y", "z")
    with pytest.raises(ModelError, match="exactly once"):
        write_docs.replace_block(text + text, "x", "z")


def test_bench_tables_come_from_a_saved_run(tmp_path):
    """--bench renders benchmarks.report.markdown of the saved bench.json into docs/benchmarks.md's block."""
    from benchmarks import report
    from benchmarks.stats import summarize
    from model.config import GPTConfig

    result = {"status": "ok", "info": {"device": "cpu"}, "prefill": {"128": {"ms": summarize([200.0])}},
              "decode": {"1": {"tokens_per_s": summarize([40.0])}}, "memory": {"peak_rss_mb": 900.0},
              "greedy_tokens": {"tokens": [1, 2]}}
    machine = {"date": "2026-11-26 16:00 UTC", "cpu": "cpu", "cpu_count": 2, "torch_threads": 2, "packages": {},
               "other_processes_cpu_share": 0.0}
    doc = report.assemble(settings={"prefill_lens": [128], "batches": [1], "new_tokens": 8, "decode_prompt_len": 4,
                                    "repeats": 1, "prefill_repeats": 1, "warmup": 1},
                          model_desc="gpt2", config=GPTConfig.preset("tiny"), machine=machine,
                          bandwidth={"gb_per_s": summarize([20.0])}, gemm={"n": 64, "gflop_per_s": summarize([50.0])},
                          results={"ort-fused": result}, artifacts={}, wall_s=1.0)
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(doc))
    docs = tmp_path / "docs"
    docs.mkdir()
    original = (write_docs.DOCS / "benchmarks.md").read_text()
    (docs / "benchmarks.md").write_text(original)
    changed = write_docs.write_docs(docs, bench_json=bench_json, only=("bench-latest",))
    assert changed == ["benchmarks.md:bench-latest"]
    text = (docs / "benchmarks.md").read_text()
    assert write_docs.read_block(text, "bench-latest") == report.markdown(doc).rstrip()
    assert "2026-11-26 16:00 UTC" in text
    outside = lambda t: re.sub(r"BEGIN GENERATED bench-latest.*?END GENERATED", "", t, flags=re.S)  # noqa: E731
    assert outside(text) == outside(original)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ModelError, match="not a benchmark result"):
        write_docs.bench_block(bad)


def test_readme_is_an_entrance():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_named_modules_tests_and_links_exist():
    for path in DOC_FILES:
        text = path.read_text()
        for module in set(re.findall(r"python3? -m ([a-z_]+(?:\.[a-z0-9_]+)+)", text)):
            assert importlib.util.find_spec(module) is not None, f"{path.name}: python -m {module}"
        for test in set(re.findall(r"\b(test_[a-z0-9_]+\.py)", text)):
            assert (ROOT / "tests" / test).exists(), f"{path.name}: {test}"
        for file in set(re.findall(r"`((?:model|export|runtime|benchmarks|tests)/[\w/]+\.py)`", text)):
            assert (ROOT / file).exists(), f"{path.name}: {file}"
        for target, anchor in re.findall(r"\]\(([^)#:]*?\.md)?(?:#([^)]*))?\)", text):
            linked = path.parent / target if target else path
            assert linked.exists(), f"{path.name}: link {target}"
            if anchor:
                assert anchor in heading_anchors(linked.read_text()), f"{path.name}: link {target}#{anchor}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: the heading lowercased, punctuation but '-' dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
