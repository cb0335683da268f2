#!/bin/sh
# Builds llama.cpp's own server, quantizer and tokenizer (llama-server, llama-quantize, llama-tokenize)
# from the source vendored in the llama-cpp-python sdist the decode bench uses, for this CPU's SIMD
# (bench/llamacpp_flags.sh), into $1 (default .venv/bin). bench/serve_peer.py runs the server side by
# side with `dialogen serve`; bench/make_models.py quantizes with llama-quantize. About 10 minutes on
# 2 cores. With $2, a venv made for llama.cpp's converter: the same source's convert_hf_to_gguf.py
# (and its conversion package) is copied into $2/llama.cpp and its gguf-py installed into that venv.
set -eu
dest=$(cd "${1:-.venv/bin}" && pwd)
flags=$(sh "$(dirname "$0")/llamacpp_flags.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$dest/python" -m pip download -q --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$work"
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
src="$work/llama_cpp_python-0.3.36/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" $flags -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" --target llama-server llama-quantize llama-tokenize -j "$(nproc)" >/dev/null
for exe in llama-server llama-quantize llama-tokenize; do
  cp "$work/build/bin/$exe" "$dest/$exe"
done
echo "built $dest/llama-server, llama-quantize, llama-tokenize"
if [ -n "${2:-}" ]; then
  mkdir -p "$2/llama.cpp"
  cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$2/llama.cpp/"
  "$2/bin/python" -m pip install -q --disable-pip-version-check "$src/gguf-py"
  echo "installed $2/llama.cpp/convert_hf_to_gguf.py"
fi
