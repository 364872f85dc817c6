"""Build a TensorRT engine from an export artifact.

    python -m export.trt --model DIR [--plugins attention,gelu | --no-plugins] [--max-batch N]
                         [--max-seq-len N] [--timing-cache FILE] [--tf32] [--graph-only] [--check-only]

With plugins (the default) the artifact's fused ONNX is rewritten into the plugin graph
(export/plugins/graph_pass.py: static in-place KV cache, Triton kernels compiled ahead of time) and
written beside it as model.plugins.onnx; --no-plugins parses the artifact's own graph (past/present
I/O, TensorRT's native Attention/Gelu importers). Two optimization profiles: 0 = prefill, 1 = decode.
The plan and its manifest (model/artifact.EngineManifest: TensorRT version, GPU, profiles, plugins, source
ONNX sha256) are written beside the ONNX as trt_plugins.plan/.json or trt_native.plan/.json.
--graph-only writes the plugin graph and stops (needs neither TensorRT nor a GPU). Every build first runs the
TensorRT-parser lint (export/trt_lint.py: onnx-tensorrt's rules for the ops, attributes and types we emit) on the
graph it would parse and refuses with one line naming the rule; --check-only runs only the lint (no TensorRT).

Written against TensorRT's documented Python API for 10.14+ and 11.x (strongly typed networks:
precision comes from the ONNX types; builder flags are looked up by name).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from export import trt_lint
from export.plugins.graph_pass import OPTION_NAMES, GraphPassError, to_plugin_graph
from model.artifact import (
    DECODE,
    MODEL_FILE,
    PLUGIN_GRAPH_DATA,
    PLUGIN_GRAPH_FILE,
    PREFILL,
    PROFILE_NAMES,
    EngineManifest,
    engine_files,
    gpu_identity,
    platform_identity,
    read_artifact,
    require_tensorrt_and_gpu,
    write_engine_manifest,
)
from model.errors import CliParser, ModelError, run_cli
from model.files import sha256_file, write_atomic


class EngineBuildError(ModelError):
    """TensorRT's parser or builder refused the network (its log above says why)."""


# --hardware-compatibility -> the manifest's record (model.artifact.HARDWARE_COMPATIBILITY) and TensorRT's enum value
HARDWARE_COMPATIBILITY = {"none": "none", "ampere-plus": "ampere_plus"}
HARDWARE_COMPATIBILITY_LEVELS = {"none": "NONE", "ampere-plus": "AMPERE_PLUS"}  # pyCore.cpp HardwareCompatibilityLevel


def parse_plugins(spec: str | None, no_plugins: bool) -> tuple[str, ...]:
    if no_plugins:
        if spec:
            raise ModelError("--plugins and --no-plugins exclude each other")
        return ()
    names = tuple(dict.fromkeys(p.strip() for p in (spec or "attention,gelu").split(",") if p.strip()))
    bad = [n for n in names if n not in OPTION_NAMES]
    if bad or not names:
        raise ModelError(f"--plugins {spec!r}: choose from {', '.join(OPTION_NAMES)} (comma-separated)")
    return names


def check_parser_rules(artifact_dir: Path, plugins: tuple[str, ...]) -> None:
    """The TensorRT-parser lint (export/trt_lint.py) on the graph this build would parse, before any TensorRT work:
    a ModelError of one line naming the first rule broken.
    Quantized artifacts pass or fail here like any other (int4 at block 64/128 passes; INT8 block scales and other
    INT4 blocks fail)."""
    name, graph = trt_lint.graph_to_parse(artifact_dir, plugins)
    findings = trt_lint.lint_model(graph)
    if findings:
        raise ModelError(trt_lint.refusal(str(artifact_dir / name), findings))


def write_plugin_graph(artifact_dir: Path, plugins: tuple[str, ...]) -> Path:
    """Rewrite the artifact's model.onnx into the plugin graph, written atomically beside it."""
    art = read_artifact(artifact_dir, verify=True)
    if art.spec.graph != "fused":
        check_parser_rules(artifact_dir, ())  # the ort graph's operators: name the rule first
        raise ModelError(f"{artifact_dir}: plugins need the fused export (this one is "
                         f"{art.spec.graph!r}; re-export with --opset 23, or pass --no-plugins)")
    model = onnx.load(str(artifact_dir / MODEL_FILE), load_external_data=True)
    try:
        plugin_graph = to_plugin_graph(model, plugins)  # aot=1 on every plugin node: graph_pass.AOT
    except GraphPassError as e:
        check_parser_rules(artifact_dir, ())  # a graph the pass cannot take may break a parser rule: name it
        raise ModelError(f"{artifact_dir / MODEL_FILE}: {e}") from None
    del model
    findings = trt_lint.lint_model(plugin_graph)
    if findings:
        raise ModelError(trt_lint.refusal(str(artifact_dir / PLUGIN_GRAPH_FILE), findings))
    out = artifact_dir / PLUGIN_GRAPH_FILE
    tmp_dir = Path(tempfile.mkdtemp(prefix=".plugins.tmp-", dir=artifact_dir))
    try:
        external = art.external_data
        onnx.save_model(plugin_graph, str(tmp_dir / PLUGIN_GRAPH_FILE), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=PLUGIN_GRAPH_DATA, size_threshold=1024)
        if external:
            os.replace(tmp_dir / PLUGIN_GRAPH_DATA, artifact_dir / PLUGIN_GRAPH_DATA)
        os.replace(tmp_dir / PLUGIN_GRAPH_FILE, out)
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    return out


def profile_shapes(config: Any, plugin_attention: bool, max_batch: int, max_seq_len: int
                   ) -> list[dict[str, list[tuple[int, ...]]]]:
    """[prefill, decode] profiles: input name -> [min, opt, max] shapes."""
    H, D, M, B = config.n_head, config.head_dim, max_seq_len, max_batch
    opt_seq = max(1, min(M, 128))

    def tokens(lo_s: int, opt_s: int, hi_s: int) -> list[tuple[int, ...]]:
        return [(1, lo_s), (B, opt_s), (B, hi_s)]

    profiles = []
    for phase in (PREFILL, DECODE):
        seq = tokens(1, opt_seq, M) if phase == PREFILL else tokens(1, 1, 1)
        total = tokens(1, opt_seq, M) if phase == PREFILL else tokens(1, opt_seq, M)
        shapes = {"input_ids": seq, "attention_mask": total, "position_ids": seq}
        for i in range(config.n_layer):
            for kind in ("key", "value"):
                if plugin_attention:  # the static cache: only the batch varies
                    shapes[f"cache.{i}.{kind}"] = [(1, H, M, D), (B, H, M, D), (B, H, M, D)]
                elif phase == PREFILL:  # zero-length past: legal in a profile
                    shapes[f"past_key_values.{i}.{kind}"] = [(1, H, 0, D), (B, H, 0, D), (B, H, 0, D)]
                else:
                    shapes[f"past_key_values.{i}.{kind}"] = [(1, H, 1, D), (B, H, opt_seq - 1 or 1, D),
                                                            (B, H, M - 1, D)]
        profiles.append(shapes)
    return profiles


def plugin_manifest(capability: int) -> dict[str, Any]:
    """The manifest's record of the plugin kernels: the PTX ISA and target every embedded kernel declares
    (export/plugins/kernels.py pins them) and the oldest driver that can JIT-compile that PTX."""
    from export.plugins import kernels  # imports triton (the tensorrt extra)

    try:
        return {"ptx": kernels.ptx_target(capability)}
    except ValueError as e:
        raise ModelError(str(e)) from None


def check_plugin_grids(config: Any, max_batch: int, max_seq_len: int) -> None:
    """Refuse an engine whose largest step would launch a plugin grid over CUDA's limits."""
    from export.plugins import kernels  # imports triton (the tensorrt extra)

    for dtype in (torch.float16, torch.float32):
        for tactic, tile in kernels.attention_tactics(dtype, config.head_dim).items():
            grid_x, grid_y = kernels.attention_grid(max_batch, config.n_head, max_seq_len, tile)
            if grid_x > kernels.GRID_X_LIMIT or grid_y > kernels.GRID_Y_LIMIT:
                raise ModelError(f"--max-batch {max_batch} x {config.n_head} heads x --max-seq-len {max_seq_len}: "
                                 f"the attention grid ({grid_x}, {grid_y}) of tactic {tactic} exceeds CUDA's limits "
                                 f"({kernels.GRID_X_LIMIT}, {kernels.GRID_Y_LIMIT}); lower them")


def build_engine(artifact_dir: str | os.PathLike, plugins: tuple[str, ...] = ("attention", "gelu"), *,
                 max_batch: int = 8, max_seq_len: int | None = None, timing_cache: str | os.PathLike | None = None,
                 tf32: bool = False, detailed_profile: bool = False, hardware_compatibility: str = "none",
                 log=print) -> Path:
    """Build and write the plan + manifest; returns the manifest path.

    detailed_profile: ProfilingVerbosity.DETAILED, so that the engine inspector lists every layer with
    its I/O tensors (NvInfer.h IBuilderConfig::setProfilingVerbosity; benchmarks/gpu_check.py uses it).
    hardware_compatibility: "none" (this GPU model only) or "ampere-plus" (HARDWARE_COMPATIBILITY)."""
    artifact_dir = Path(artifact_dir)
    if hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise ModelError(f"--hardware-compatibility {hardware_compatibility!r}: choose from "
                         f"{', '.join(HARDWARE_COMPATIBILITY)}")
    portable = hardware_compatibility == "ampere-plus"
    art = read_artifact(artifact_dir, verify=True)
    check_parser_rules(artifact_dir, plugins)
    limit = art.spec.max_seq_len
    max_seq_len = limit if max_seq_len is None else max_seq_len
    if not 2 <= max_seq_len <= limit:
        raise ModelError(f"--max-seq-len {max_seq_len} is out of range (2..{limit}, the artifact's max_seq_len)")
    if not 1 <= max_batch <= 4096:
        raise ModelError(f"--max-batch {max_batch} is out of range (1..4096)")
    if "attention" in plugins:
        check_plugin_grids(art.config, max_batch, max_seq_len)
    trt = require_tensorrt_and_gpu()
    major, minor = torch.cuda.get_device_capability()
    if portable and major < 8:  # NvInfer.h kAMPERE_PLUS: "only supported for engines built on ... Ampere and later"
        raise ModelError(f"--hardware-compatibility ampere-plus: TensorRT builds such engines only on Ampere and newer "
                         f"GPUs; this one is sm {major}.{minor}")
    t0 = time.perf_counter()
    variant = "plugins" if plugins else "native"
    kernels_record = {}
    kernel_target = contextlib.nullcontext()
    if plugins:
        import export.plugins.register  # noqa: F401 - registers the plugin creators before parsing (needs tensorrt)
        from export.plugins import kernels  # imports triton (the tensorrt extra)

        capability = kernels.PORTABLE_CAPABILITY if portable else 10 * major + minor
        kernels_record = plugin_manifest(capability)
        # register.py's aot_impl compiles for this process's GPU, or for plain sm_80 in a portable engine
        kernel_target = kernels.aot_target(capability if portable else None)

        onnx_path = write_plugin_graph(artifact_dir, plugins)
        log(f"[graph] {onnx_path.name}: plugins {', '.join(plugins)}")
    else:
        onnx_path = artifact_dir / MODEL_FILE

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, the only mode on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + " | ".join(errors)[:400])

    config = builder.create_builder_config()
    set_hardware_compatibility(trt, config, hardware_compatibility)
    if "attention" in plugins:  # the cache outputs are aliased to the cache inputs
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if detailed_profile:  # pyCore.cpp: IBuilderConfig property profiling_verbosity, enum ProfilingVerbosity
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):  # fp32 GEMMs exact, for the 1e-4 parity bound
        config.clear_flag(trt.BuilderFlag.TF32)
    timing_cache = None if timing_cache is None else Path(timing_cache)
    cache = None if timing_cache is None else use_timing_cache(config, timing_cache)

    shapes = profile_shapes(art.config, "attention" in plugins, max_batch, max_seq_len)
    input_names = {network.get_input(i).name for i in range(network.num_inputs)}
    add_profiles(builder, config, shapes, input_names, onnx_path.name)

    log(f"[build] {variant} engine: max batch {max_batch}, max seq {max_seq_len}, TensorRT {trt.__version__}")
    with kernel_target:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the TensorRT log above)")
    built_level = engine_hardware_compatibility(trt, trt.Runtime(logger), plan, hardware_compatibility)
    plan_name, manifest_name = engine_files(variant)
    write_atomic(artifact_dir / plan_name, bytes(plan))
    if cache is not None:
        write_atomic(timing_cache, bytes(cache.serialize()))
    manifest = EngineManifest(
        tensorrt=trt.__version__,
        gpu=gpu_identity(),
        platform=platform_identity(),
        hardware_compatibility=built_level,
        variant=variant,
        plugins=tuple(plugins),
        kv_cache="static" if "attention" in plugins else "past_present",
        plugin_ids=tuple(f"gptdeploy::{n}" for n in _plugin_op_names(plugins)),
        plugin_kernels=kernels_record,
        onnx={"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        source_onnx={"file": MODEL_FILE, "sha256": art.files[MODEL_FILE]},
        plan={"file": plan_name, "sha256": sha256_file(artifact_dir / plan_name)},
        dtype=art.spec.dtype,
        logits=art.spec.logits,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        tf32=tf32,
        profiles=tuple({"index": k, "name": PROFILE_NAMES[k],
                        "shapes": {n: [list(s) for s in v] for n, v in p.items()}} for k, p in enumerate(shapes)),
        build_seconds=round(time.perf_counter() - t0, 1),
    )
    write_engine_manifest(artifact_dir / manifest_name, manifest)
    log(f"[write] {plan_name} ({(artifact_dir / plan_name).stat().st_size / 1e6:.1f} MB), {manifest_name} "
        f"in {manifest.build_seconds}s")
    return artifact_dir / manifest_name


def set_hardware_compatibility(trt: Any, config: Any, level: str) -> None:
    """IBuilderConfig's hardware compatibility level. pyCore.cpp (release/10.14 :1867-1868, release/11.0
    :1746-1747) binds it as the property hardware_compatibility_level over a setter that returns nothing, so
    the value is read back. kAMPERE_PLUS (NvInfer.h:9935-9946 @ release/10.14): the engine runs on Ampere and newer
    GPUs, with the builder's kernels limited to 48 KiB of shared memory with the driver's reserve."""
    wanted = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY_LEVELS[level])
    config.hardware_compatibility_level = wanted
    if config.hardware_compatibility_level != wanted:
        raise ModelError(f"--hardware-compatibility {level}: TensorRT kept {config.hardware_compatibility_level}")


def engine_hardware_compatibility(trt: Any, runtime: Any, plan: Any, level: str) -> str:
    """The level the built engine itself reports (ICudaEngine.hardware_compatibility_level, pyCore.cpp:1576 @
    release/10.14), deserialized once after the build: the manifest records it, and an engine that does not carry
    the level asked for (or does not deserialize) is refused in one line before anything is written."""
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    if engine is None:
        raise EngineBuildError("TensorRT built an engine it cannot deserialize (see the TensorRT log above)")
    got = engine.hardware_compatibility_level
    if got != getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY_LEVELS[level]):
        raise EngineBuildError(f"--hardware-compatibility {level}: the built engine reports "
                               f"{getattr(got, 'name', got)}")
    return HARDWARE_COMPATIBILITY[level]


def add_profiles(builder: Any, config: Any, shapes: list[dict[str, list[tuple[int, ...]]]], input_names: set[str],
                 onnx_name: str) -> None:
    """Add the [prefill, decode] profiles to the builder config as profiles 0 and 1 (the runtime's indices)."""
    for k, phase_shapes in enumerate(shapes):
        where = f"optimization profile {k} ({PROFILE_NAMES[k]})"
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in phase_shapes.items():
            if name not in input_names:
                raise ModelError(f"{onnx_name} has no input {name!r} (inputs: {sorted(input_names)})")
            try:  # pyCore.cpp opt_profile_set_shape: a false setDimensions raises RuntimeError, it returns nothing
                profile.set_shape(name, lo, opt, hi)
            except RuntimeError as e:
                raise ModelError(f"{where}: input {name} min {lo} opt {opt} max {hi}: TensorRT: {e}") from None
        # NvInfer.h IBuilderConfig::addOptimizationProfile: "the index of the optimization profile ... or -1 if
        # the input is not valid" (pyCore.cpp binds it as is)
        index = config.add_optimization_profile(profile)
        if index < 0:
            bad = [n for n, dims in phase_shapes.items()
                   if len({len(d) for d in dims}) > 1 or any(not a <= b <= c for a, b, c in zip(*dims))]  # noqa: B905
            raise ModelError(f"{where}: TensorRT refused the profile as invalid (min <= opt <= max fails for: "
                             f"{', '.join(bad) or 'no input by our own check'})")
        if index != k:
            raise ModelError(f"{where}: TensorRT numbered it {index}; the runtime selects profiles by index")


def use_timing_cache(config: Any, path: Path) -> Any:
    """Create the builder's timing cache from `path` (empty if absent) and set it; returns the cache."""
    # pyCore.cpp netconfig_create_timing_cache returns IBuilderConfig::createTimingCache's pointer as is, and
    # NvInfer.h does not promise one for a blob it cannot read: None must not reach set_timing_cache (TypeError)
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None:
        raise ModelError(f"{path}: TensorRT cannot read this timing cache (not one, or damaged); "
                         "delete the file to start a new one")
    # IBuilderConfig::setTimingCache reports a rejected cache by returning false (NvInfer.h), not by raising
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ModelError(f"{path}: TensorRT refused this timing cache (another GPU or TensorRT version?); "
                         "delete it to start a new one")
    return cache


def _plugin_op_names(plugins: tuple[str, ...]) -> list[str]:
    return [OPTION_NAMES[p] for p in plugins]


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="the artifact folder (python -m export.onnx) to build "
                                                              "an engine for; the engine is written into it")
    p.add_argument("--plugins", help="comma-separated: attention,gelu (default: both)")
    p.add_argument("--no-plugins", action="store_true", help="parse the artifact's graph with native importers")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the profiles (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, help="longest past+seq (default: the artifact's max_seq_len)")
    p.add_argument("--timing-cache", help="timing cache file to read and update (speeds up rebuilds)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 GEMMs (faster, ~1e-3 logits error)")
    p.add_argument("--graph-only", action="store_true", help="write model.plugins.onnx and stop (no TensorRT needed)")
    p.add_argument("--hardware-compatibility", choices=list(HARDWARE_COMPATIBILITY), default="none",
                   help="none: the engine runs on this GPU model only; ampere-plus: on every GPU from sm_80 up "
                        "(TensorRT's AMPERE_PLUS; plugin PTX for sm_80; may be slower) (default: %(default)s)")
    p.add_argument("--check-only", action="store_true",
                   help="run the TensorRT-parser lint on the graph a build would parse and stop (no TensorRT needed)")
    a = p.parse_args(argv)
    plugins = parse_plugins(a.plugins, a.no_plugins)
    artifact_dir = Path(a.model)
    if a.check_only:
        read_artifact(artifact_dir, verify=True)
        name, graph = trt_lint.graph_to_parse(artifact_dir, plugins)
        findings = trt_lint.lint_model(graph)
        for f in findings:  # every finding on stdout; the refusal itself is the one error line
            print(f.line())
        if findings:
            raise ModelError(trt_lint.refusal(str(artifact_dir / name), findings))
        print(f"ok: {artifact_dir / name} passes the TensorRT-parser lint ({len(trt_lint.RULES)} rules, "
              f"{trt_lint.OTRT})")
        return 0
    if a.graph_only:
        if not plugins:
            raise ModelError("--graph-only writes the plugin graph: it cannot go with --no-plugins")
        out = write_plugin_graph(artifact_dir, plugins)
        print(f"wrote {out}")
        return 0
    build_engine(artifact_dir, plugins, max_batch=a.max_batch, max_seq_len=a.max_seq_len,
                 timing_cache=a.timing_cache, tf32=a.tf32, hardware_compatibility=a.hardware_compatibility,
                 log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
