"""The CPU int4 matmul kernels within reach, one matmul at a time, at gpt2's shapes.

    python -m benchmarks.int4_kernels [--threads 2] [--blocks 32 128] [--batches 1 8 32]

- onnxruntime's MatMulNBits (what the quantized artifacts run: 4-bit symmetric weights, one fp32 scale per block),
  by block size and accuracy_level: 0 = fp32 compute of the dequantized weights, 4 = activations quantized to
  int8 per block with int32 accumulation (what the artifacts ship with);
- torch's CPU int4 weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, gpt-fast's CPU path).

Each matmul reads the same weights over and over, so at batch 1 they may sit partly in the CPU's cache: read the
batch-1 column as an upper bound on what a whole model gets from memory. Larger batches are compute-bound, and
there the GMAC/s say which kernel would win. Prints one line per kernel and shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from model.errors import CliParser, ModelError, run_cli

# gpt2's matmuls (K = input features, N = output features): c_attn, attn c_proj, c_fc, mlp c_proj, lm_head
GPT2_SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257))


def seconds_per_call(fn: Callable[[np.ndarray], object], x: np.ndarray, budget_s: float = 0.5) -> float:
    for _ in range(3):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget_s or n < 5:
        fn(x)
        n += 1
    return elapsed / n


def matmul_nbits(k: int, n: int, block: int, accuracy_level: int, threads: int):
    """An onnxruntime session of one com.microsoft MatMulNBits node (random int4 weights and scales)."""
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)  # two 4-bit values a byte
    scales = (rng.random(n * (k // block), dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"A": x})


def torch_int4(k: int, n: int, block: int):
    """torch's CPU int4 kernel on random weights: x [M, k] float32 -> [M, n]."""
    if n % 16:
        return None  # its packing needs N divisible by 16 (gpt2's vocabulary, 50257, is not)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.rand(k // block, n, 2) * 0.01
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, block, scales_zeros)


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.int4_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each kernel (default: %(default)s)")
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 128], help="block sizes (default: 32 128)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="rows M (default: 1 8 32)")
    a = p.parse_args(argv)
    if a.threads < 1 or min(a.batches) < 1:
        raise ModelError("--threads and --batches must be >= 1")
    for b in a.blocks:
        if b < 16 or b & (b - 1) or any(k % b for k, _ in GPT2_SHAPES):
            raise ModelError(f"--blocks: {b} is not a power of two >= 16 dividing 768 and 3072")
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(1)
    print(f"{a.threads} threads; time per call, and GMAC/s = M*K*N / time; weight bytes: 4 bits + a 4-byte scale "
          "per block")
    for k, n in GPT2_SHAPES:
        for block in a.blocks:
            kernels = {f"MatMulNBits acc {lvl}": matmul_nbits(k, n, block, lvl, a.threads) for lvl in (0, 4)}
            t4 = torch_int4(k, n, block)
            if t4 is not None:
                kernels["torch int4pack"] = lambda x, f=t4: f(torch.from_numpy(x))
            for name, fn in kernels.items():
                cells = []
                for m in a.batches:
                    x = rng.standard_normal((m, k), dtype=np.float32)
                    s = seconds_per_call(fn, x, 0.2 if "torch" in name else 0.5)
                    cells.append(f"M={m} {s * 1e3:7.3f} ms {m * k * n / s / 1e9:6.1f} GMAC/s")
                mb = (k * n / 2 + k // block * n * 4) / 1e6
                print(f"K={k:<4} N={n:<5} block {block:<3} {name:<18} ({mb:5.1f} MB): " + " | ".join(cells),
                      flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
