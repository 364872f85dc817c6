#!/usr/bin/env bash
# `make peers`: the optional CPU peers of `make bench` that need more than a wheel (never part of `make test`).
#   llama.cpp: llama-cpp-python's sdist (pinned in constraints.txt), built once with GGML_NATIVE=ON. Its vendored
#   llama.cpp is configured with the tools on, so llama-bench, llama-batched-bench and llama-quantize come from
#   the same build as the Python package's libllama; the build folder and the unpacked source (which holds
#   convert_hf_to_gguf.py and gguf-py) stay in $PEERS_DIR. About 10-15 minutes on 2 cores.
# The Makefile then installs the peers-build extra (the OpenVINO wheels; llama-cpp-python is already there).
# usage: benchmarks/setup_peers.sh PYTHON [PEERS_DIR]
set -euo pipefail
PY=${1:?usage: setup_peers.sh PYTHON [PEERS_DIR]}
PEERS_DIR=$(realpath -m "${2:-.peers}")
CONSTRAINTS=$(realpath constraints.txt)
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$CONSTRAINTS")
[ -n "$VERSION" ] || { echo "error: constraints.txt pins no llama-cpp-python" >&2; exit 2; }
SRC=$PEERS_DIR/src/llama_cpp_python-$VERSION
BUILD=$PEERS_DIR/llama-build

mkdir -p "$PEERS_DIR/src"
if [ ! -f "$SRC/pyproject.toml" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS_DIR/dl"
  tmp=$(mktemp -d "$PEERS_DIR/src/unpack.XXXXXX")
  tar -xzf "$PEERS_DIR/dl/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
  rm -rf "$SRC" && mv "$tmp/llama_cpp_python-$VERSION" "$SRC" && rmdir "$tmp"
fi

# LLAVA_BUILD=OFF: with the tools on, llama.cpp adds tools/mtmd itself (the Python package's own copy would clash)
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "building llama-cpp-python $VERSION ($CMAKE_ARGS) in $BUILD ..."
"$PY" -m pip install -q -c "$CONSTRAINTS" --no-binary llama-cpp-python --config-settings="build-dir=$BUILD" "$SRC"
for tool in llama-bench llama-batched-bench llama-quantize; do
  [ -x "$BUILD/bin/$tool" ] || { echo "error: the build made no $BUILD/bin/$tool" >&2; exit 1; }
done
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "peers ready in $PEERS_DIR: llama.cpp tools in $BUILD/bin, converter in $SRC/vendor/llama.cpp"
