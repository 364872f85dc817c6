#!/usr/bin/env bash
# `make peers`: the optional CPU peers of `make bench` that need more than a wheel (never part of `make test`).
# llama.cpp: llama-cpp-python's sdist (the version pinned in constraints.txt) is unpacked into $PEERS_DIR/src and
# its vendored llama.cpp is built once, with GGML_NATIVE=ON, into $PEERS_DIR/llama-build: libllama and the tools
# llama-bench, llama-batched-bench and llama-quantize. The Python bindings are then installed from the same sdist
# without a second build (LLAMA_BUILD=OFF) and load that libllama (benchmarks/peer_llama.py points
# LLAMA_CPP_LIB_PATH at it), so the rows, the quantizer and llama-bench run the same compiled code;
# convert_hf_to_gguf.py and its gguf-py are read from the unpacked source. About 15 minutes on 2 cores.
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
TOOLS=(llama-bench llama-batched-bench llama-quantize)

mkdir -p "$PEERS_DIR/src"
if [ ! -f "$SRC/pyproject.toml" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS_DIR/dl"
  tmp=$(mktemp -d "$PEERS_DIR/src/unpack.XXXXXX")
  tar -xzf "$PEERS_DIR/dl/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
  rm -rf "$SRC" && mv "$tmp/llama_cpp_python-$VERSION" "$SRC" && rmdir "$tmp"
fi

# the bindings' own CMake project (it adds vendor/llama.cpp with the options it builds its wheels with);
# LLAVA_BUILD=OFF: the tools on, llama.cpp adds tools/mtmd itself, and no target built here needs it
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$SRC" -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF
fi
echo "building llama.cpp (llama-cpp-python $VERSION's vendor/llama.cpp, GGML_NATIVE=ON) in $BUILD ..."
cmake --build "$BUILD" -j "$(nproc)" --target llama "${TOOLS[@]}"
for f in "${TOOLS[@]}" libllama.so; do
  [ -e "$BUILD/bin/$f" ] || { echo "error: the build made no $BUILD/bin/$f" >&2; exit 1; }
done
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
  "$PY" -m pip install -q -c "$CONSTRAINTS" --no-binary llama-cpp-python "$SRC"
LLAMA_CPP_LIB_PATH=$BUILD/bin "$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, \
'on', llama_cpp.llama_print_system_info().decode().strip())"
echo "peers ready in $PEERS_DIR: llama.cpp libllama and tools in $BUILD/bin, converter in $SRC/vendor/llama.cpp"
