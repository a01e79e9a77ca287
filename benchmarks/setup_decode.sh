#!/usr/bin/env bash
# Set up the anchors of benchmarks/decode.py (idempotent: a finished step is skipped).
#
# * ORT GenAI and its model builder run in rarefy's own venv (.venv): onnxruntime-genai 0.18
#   installs beside rarefy's onnxruntime / torch / transformers, and the builder needs nothing
#   more (checked: `python -m onnxruntime_genai.models.builder -i SMOLLM2 -p int4 -e cpu` runs).
# * llama-cpp-python gets its own venv, .bench/llamacpp: it builds from source with cmake
#   (~10 min on 2 cores; built at nice 19, one compile job at a time, so the machine stays usable),
#   and keeping the build out of .venv leaves rarefy's environment as its setup makes it.
# * The GGUF converter (convert_hf_to_gguf.py) ships inside the llama-cpp-python sdist under
#   vendor/llama.cpp; it runs with .venv's python (torch, transformers, safetensors) and the
#   converter's own gguf-py from the same sdist, so converter and runtime agree on the format.
#
# Everything lands under .bench/ (git-ignored). Only PyPI is contacted; nothing from a model hub.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/.bench"
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
mkdir -p "$BENCH/src"

# 1. The llama-cpp-python sdist (source of the build and of convert_hf_to_gguf.py).
SDIST="$BENCH/src/llama_cpp_python-$LLAMA_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$ROOT/.venv/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$BENCH/src"
fi
SRC="$BENCH/src/llama_cpp_python-$LLAMA_VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  tar -xzf "$SDIST" -C "$BENCH/src"
fi

# 2. llama-cpp-python in its own venv, built from that sdist.
VENV="$BENCH/llamacpp"
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q numpy psutil
  CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=ON" \
    nice -n 19 "$VENV/bin/pip" install --no-cache-dir "$SDIST"
fi

echo "llama.cpp venv: $VENV"
echo "converter:      $SRC/vendor/llama.cpp/convert_hf_to_gguf.py (PYTHONPATH=$SRC/vendor/llama.cpp/gguf-py)"
