"""`python -m runtime.generate`: output streams, figures, seeds, --help, and every bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.errors import ModelError
from model.gpt import GPT
from model.load import save_checkpoint
from model.tokenizer import char_tokenizer
from runtime import generate as cli

ROOT = Path(__file__).resolve().parents[1]
CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
STATS_LINE = re.compile(r"^\[(\S+)\] prompt tokens: (\d+)(?: \(truncated from \d+\))? \| "
                        r"new tokens: (\d+)(?: \(\d+ samples\))? \| prefill: [\d.]+ ms(?: \(mean\))? \| "
                        r"decode: [\d.]+ tokens/s(?: \| seed: \d+)?$")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=len(CHARS), block_size=64))
    out = tmp_path_factory.mktemp("tiny")
    save_checkpoint(model, char_tokenizer(CHARS), out)
    return out


@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    from export.onnx import export_artifact

    out = tmp_path_factory.mktemp("art") / "tiny"
    export_artifact(tiny_dir, out, verify=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def short_artifact(tiny_dir, tmp_path_factory) -> Path:
    from export.onnx import export_artifact

    out = tmp_path_factory.mktemp("art") / "short"
    export_artifact(tiny_dir, out, max_seq_len=16, verify=False, log=lambda s: None)
    return out


def run_main(capsys, *argv: str) -> tuple[str, str]:
    assert cli.main(list(argv)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_greedy_run_streams_prompt_and_text_and_reports_figures(capsys, tiny_dir):
    out, err = run_main(capsys, "--model", str(tiny_dir), "--prompt", "to be", "--greedy", "--max-new-tokens", "20")
    assert out.startswith("to be") and out.endswith("\n")
    assert len(out) == len("to be") + 20 + 1  # char vocab: one character per token, no eot to stop early
    m = STATS_LINE.match(err.strip())
    assert m, err
    assert m.groups()[:3] == ("torch", "5", "20")


def test_seeded_samples_repeat_and_are_separated(capsys, tiny_dir):
    args = ["--model", str(tiny_dir), "--prompt", "ab", "--max-new-tokens", "30", "--temperature", "1.2",
            "--top-k", "0", "--seed", "3", "--num-samples", "2"]
    out1, err1 = run_main(capsys, *args)
    out2, _ = run_main(capsys, *args)
    assert out1 == out2
    samples = out1.split(f"\n{cli.SAMPLE_SEPARATOR}\n")
    assert len(samples) == 2 and all(s.startswith("ab") for s in samples) and samples[0] != samples[1]
    assert "(2 samples)" in err1 and err1.strip().endswith("seed: 3")
    # sample i uses seed + i: the second sample alone, with seed 4, is the same text
    out3, _ = run_main(capsys, *args[:-4], "--seed", "4")
    assert out3 == samples[1]


def test_stop_string_cuts_the_output(capsys, tiny_dir):
    out, _ = run_main(capsys, "--model", str(tiny_dir), "--prompt", "x", "--greedy", "--max-new-tokens", "40")
    text = out[1:-1]
    stop = text[5:7]  # a stop string that greedy decoding certainly produces
    out, _ = run_main(capsys, "--model", str(tiny_dir), "--prompt", "x", "--greedy", "--max-new-tokens", "40",
                      "--stop", stop)
    assert out == "x" + text[:text.index(stop)] + "\n"


def test_logit_bias_and_penalties_from_the_cli(capsys, tiny_dir):
    args = ["--model", str(tiny_dir), "--prompt", "x", "--greedy", "--max-new-tokens", "30"]
    plain, _ = run_main(capsys, *args)
    z = str(CHARS.index("z"))
    out, _ = run_main(capsys, *args, "--logit-bias", f"{z}=100")
    assert out == "x" + "z" * 30 + "\n"  # +100 outweighs any logit
    out, _ = run_main(capsys, *args, "--frequency-penalty", "2", "--presence-penalty", "2")
    assert out != plain and len(set(out[1:-1])) > len(set(plain[1:-1]))  # repeats cost: more distinct chars


def test_onnxruntime_backend_from_the_cli(capsys, tiny_dir, tiny_artifact):
    args = ["--prompt", "to be", "--greedy", "--max-new-tokens", "40"]
    ort_out, ort_err = run_main(capsys, "--model", str(tiny_artifact), "--backend", "onnxruntime", *args)
    torch_out, _ = run_main(capsys, "--model", str(tiny_dir), *args)
    art_out, _ = run_main(capsys, "--model", str(tiny_artifact), *args)  # torch reads an artifact too
    assert ort_out == torch_out == art_out
    assert STATS_LINE.match(ort_err.strip()).group(1).startswith("onnxruntime")


def test_truncate_fits_the_prompt_into_the_artifacts_max_seq_len(capsys, short_artifact):
    out, err = run_main(capsys, "--model", str(short_artifact), "--backend", "onnxruntime", "--prompt", "abcdefghij",
                        "--max-new-tokens", "10", "--greedy", "--truncate")
    assert out.startswith("abcdefghij") and len(out) == 10 + 10 + 1
    assert STATS_LINE.match(err.strip()).group(2) == "6"  # 16 - 10 prompt tokens kept
    assert "prompt tokens: 6 (truncated from 10)" in err


def test_defaults_run_the_demo_model(capsys):
    out, err = run_main(capsys, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "0")
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 12 + 1
    assert STATS_LINE.match(err.strip()).groups()[:3] == ("torch", "6", "12")


def test_nanogpt_ckpt_with_padded_vocabulary(capsys, tmp_path):
    from model.load import load_model
    from runtime.loop import SamplingParams, generate
    from runtime.torch_backend import TorchBackend
    from tests.helpers import nanogpt_state, save_nanogpt_ckpt

    save_nanogpt_ckpt(tmp_path / "ckpt.pt", nanogpt_state(), dataset="openwebtext")  # 50304 rows, GPT-2 BPE
    out, err = run_main(capsys, "--model", str(tmp_path / "ckpt.pt"), "--prompt", "Hello", "--greedy",
                        "--max-new-tokens", "30")
    model, tok = load_model(tmp_path / "ckpt.pt")
    expected = generate(TorchBackend(model, tok), [tok.encode("Hello")], SamplingParams(max_new_tokens=30, greedy=True))
    assert model.config.vocab_size == 50304 and tok.n_vocab == 50257
    assert out == "Hello" + expected.texts[0] + "\n"
    assert STATS_LINE.match(err.strip()).group(3) == str(len(expected.tokens[0]))


def test_sliding_window_goes_past_block_size(capsys, tiny_dir):
    out, err = run_main(capsys, "--model", str(tiny_dir), "--prompt", "ab" * 30, "--max-new-tokens", "100",
                        "--greedy", "--sliding-window")
    assert STATS_LINE.match(err.strip()).group(3) == "100"  # 60 + 100 tokens through a 64-token context
    assert out.startswith("ab" * 30) and len(out) == 60 + 100 + 1


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest not in ("help", "prompt", "prompt_file", "greedy"):
            assert "default" in (action.help or ""), action.dest
    defaults = cli.DEFAULTS
    for fragment in (f"(default: {defaults.max_new_tokens})", f"(default: {defaults.temperature})",
                     f"(default: {defaults.top_k})", f"(default: {defaults.top_p})", "(default: demo)",
                     "(default: torch)"):
        assert fragment in text


def _corrupt(artifact: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in artifact.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    return bad


def _other_opset(artifact: Path, tmp_path: Path) -> Path:
    """An artifact made for a runtime with a newer ONNX opset than the installed onnxruntime knows."""
    import onnx

    from model.files import sha256_file

    other = tmp_path / "opset99"
    other.mkdir()
    for f in artifact.iterdir():  # the other files as they are
        (other / f.name).write_bytes(f.read_bytes())
    proto = onnx.load(str(artifact / "model.onnx"))
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 99
    onnx.save(proto, str(other / "model.onnx"))
    cfg = json.loads((artifact / "config.json").read_text())
    cfg["export"]["opset"] = 99
    cfg["files"]["model.onnx"] = sha256_file(other / "model.onnx")
    (other / "config.json").write_text(json.dumps(cfg))
    return other


BAD_INPUTS = {  # name: (argv after the fixture paths are substituted, part of the message)
    "unknown backend": (["--backend", "tflite", "--prompt", "a"], "invalid choice: 'tflite'"),
    "missing artifact": (["--backend", "onnxruntime", "--model", "{tmp}/nope", "--prompt", "a"],
                         "no such artifact folder"),
    "checkpoint is not an artifact": (["--backend", "onnxruntime", "--model", "{tiny}", "--prompt", "a"],
                                      "not an artifact folder"),
    "demo is not an artifact": (["--backend", "onnxruntime", "--model", "demo", "--prompt", "a"],
                                "python -m export.onnx --model demo"),
    "tensorrt not installed": (["--backend", "tensorrt", "--model", "{art}", "--prompt", "a"],
                               "TensorRT is not installed"),
    "corrupt artifact": (["--backend", "onnxruntime", "--model", "{corrupt}", "--prompt", "a"], "sha256"),
    "artifact for another opset": (["--backend", "onnxruntime", "--model", "{opset99}", "--prompt", "a"],
                                   "opset 99 is not supported"),
    "missing torch model": (["--model", "{tmp}/nope.pt", "--prompt", "a"], "no such file"),
    "negative max-new-tokens": (["--model", "{tiny}", "--prompt", "a", "--max-new-tokens", "-5"], "max_new_tokens"),
    "absurd max-new-tokens": (["--model", "{tiny}", "--prompt", "a", "--max-new-tokens", "1000000000"],
                              "exceeds the model's block_size 64"),
    "prompt too long": (["--model", "{tiny}", "--prompt", "a" * 60, "--max-new-tokens", "10"], "--truncate"),
    "too long names the sliding window": (["--model", "{tiny}", "--prompt", "a" * 60, "--max-new-tokens", "10"],
                                          "--sliding-window"),
    "truncate and sliding window": (["--model", "{tiny}", "--prompt", "a", "--truncate", "--sliding-window"],
                                    "exclude each other"),
    "beyond the artifact's max_seq_len": (
        ["--backend", "onnxruntime", "--model", "{short}", "--prompt", "abcdefgh", "--max-new-tokens", "9"],
        "exceeds the onnxruntime-cpu artifact's max_seq_len 16"),
    "zero samples": (["--model", "{tiny}", "--prompt", "a", "--num-samples", "0"], "--num-samples"),
    "absurd samples": (["--model", "{tiny}", "--prompt", "a", "--num-samples", "99999999"], "--num-samples"),
    "negative temperature": (["--model", "{tiny}", "--prompt", "a", "--temperature", "-1"], "temperature"),
    "nan temperature": (["--model", "{tiny}", "--prompt", "a", "--temperature", "nan"], "finite"),
    "negative top-k": (["--model", "{tiny}", "--prompt", "a", "--top-k", "-3"], "--top-k"),
    "top-p above 1": (["--model", "{tiny}", "--prompt", "a", "--top-p", "1.5"], "top_p"),
    "negative seed": (["--model", "{tiny}", "--prompt", "a", "--seed", "-1"], "seed"),
    "logit bias not ID=BIAS": (["--model", "{tiny}", "--prompt", "a", "--logit-bias", "a=1"], "TOKEN_ID=BIAS"),
    "logit bias outside the vocabulary": (["--model", "{tiny}", "--prompt", "a", "--logit-bias", "999=1"],
                                          "outside the tokenizer's vocabulary"),
    "penalty out of range": (["--model", "{tiny}", "--prompt", "a", "--frequency-penalty", "5"],
                             "frequency_penalty must be in"),
    "greedy and temperature": (["--model", "{tiny}", "--prompt", "a", "--greedy", "--temperature", "0.5"],
                               "--greedy cannot be combined"),
    "non-numeric": (["--model", "{tiny}", "--prompt", "a", "--max-new-tokens", "ten"], "invalid int value"),
    "empty prompt": (["--model", "{tiny}", "--prompt", ""], "empty prompt"),
    "empty prompt file": (["--model", "{tiny}", "--prompt-file", "{empty}"], "empty prompt"),
    "missing prompt file": (["--model", "{tiny}", "--prompt-file", "{tmp}/nope.txt"], "not found"),
    "no prompt": (["--model", "{tiny}"], "--prompt"),
    "char outside the vocabulary": (["--model", "{tiny}", "--prompt", "caf\u00e9"], "not in the model's"),
    "zero threads": (["--model", "{tiny}", "--prompt", "a", "--threads", "0"], "--threads"),
    "cuda provider not installed": (
        ["--backend", "onnxruntime", "--model", "{art}", "--prompt", "a", "--provider", "cuda"],
        "CUDAExecutionProvider"),
    "device is for torch": (["--backend", "onnxruntime", "--model", "{art}", "--prompt", "a", "--device", "cpu"],
                            "--device is the torch device"),
    "provider is for onnxruntime": (["--model", "{tiny}", "--prompt", "a", "--provider", "cpu"],
                                    "--provider is onnxruntime's"),
    "no cuda for torch": (["--model", "{tiny}", "--prompt", "a", "--device", "cuda"], "no CUDA GPU"),
    "unknown device": (["--model", "{tiny}", "--prompt", "a", "--device", "tpu"], "invalid choice: 'tpu'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(case, tiny_dir, tiny_artifact, short_artifact, tmp_path, capsys):
    argv, message = BAD_INPUTS[case]
    if case == "cuda provider not installed":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("onnxruntime here has the CUDA execution provider")
    if case == "no cuda for torch" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    (tmp_path / "empty.txt").write_text("")
    paths = {"tmp": tmp_path, "tiny": tiny_dir, "art": tiny_artifact, "short": short_artifact,
             "empty": tmp_path / "empty.txt"}
    if any("{corrupt}" in a for a in argv):
        paths["corrupt"] = _corrupt(tiny_artifact, tmp_path)
    if any("{opset99}" in a for a in argv):
        paths["opset99"] = _other_opset(tiny_artifact, tmp_path)
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(ModelError) as e:
        cli.main(argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert capsys.readouterr().out == ""  # nothing generated before the error


def test_cli_process_exit_codes(tiny_dir):
    """As a process: bad input -> one `error:` line on stderr and exit 2; good input -> exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "runtime.generate", "--model", str(tiny_dir), "--prompt", "a",
                          "--max-new-tokens", "-1"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == "" and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
    good = subprocess.run([sys.executable, "-m", "runtime.generate", "--model", str(tiny_dir), "--prompt", "ab",
                           "--max-new-tokens", "8", "--seed", "1"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ab") and len(good.stdout) == 2 + 8 + 1
    assert STATS_LINE.match(good.stderr.strip()), good.stderr
