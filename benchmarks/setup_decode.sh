#!/usr/bin/env bash
# Set up the anchors of benchmarks/decode.py (idempotent: a finished step is skipped).
#
# * ORT GenAI and its model builder run in rarefy's own venv (.venv): onnxruntime-genai 0.18
#   installs beside rarefy's onnxruntime / torch / transformers, and the builder needs nothing
#   more (checked: `python -m onnxruntime_genai.models.builder -i SMOLLM2 -p int4 -e cpu` runs).
# * llama-cpp-python gets its own venv, .bench/llamacpp: its llama.cpp libraries build from source
#   with cmake (at nice 19, one compile job at a time, so the machine stays usable), and keeping
#   the build out of .venv leaves rarefy's environment as its setup makes it.
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

# 2. llama-cpp-python in its own venv, from that sdist: its Python package as shipped, and the
#    llama / ggml shared libraries it loads, built with cmake from the sdist's vendor/llama.cpp.
#    Only the `llama` target (and ggml under it): `pip install` of the sdist also builds llama.cpp's
#    `common` library and the multimodal `mtmd` tool (~100 more compile units the Python bindings
#    of a text model never load), which on this loaded 2-core machine took past 30 minutes.
VENV="$BENCH/llamacpp"
BUILD="$BENCH/llama_build"
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy psutil typing-extensions diskcache jinja2
  if [ ! -f "$BUILD/bin/libllama.so" ]; then
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
      -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_RPATH='$ORIGIN'
    CMAKE_BUILD_PARALLEL_LEVEL=1 nice -n 19 cmake --build "$BUILD" --target llama
  fi
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -rf "$SITE/llama_cpp" && cp -r "$SRC/llama_cpp" "$SITE/llama_cpp"
  mkdir -p "$SITE/llama_cpp/lib" && cp -P "$BUILD"/bin/lib*.so* "$SITE/llama_cpp/lib/"
fi

# 3. The converter imports sentencepiece even for a BPE tokenizer: beside .venv, not in it.
if [ ! -d "$BENCH/convert_deps/sentencepiece" ]; then
  "$ROOT/.venv/bin/pip" install -q --target "$BENCH/convert_deps" sentencepiece
fi

echo "llama.cpp venv: $VENV"
echo "converter:      $SRC/vendor/llama.cpp/convert_hf_to_gguf.py (PYTHONPATH=$SRC/vendor/llama.cpp/gguf-py:$BENCH/convert_deps)"
