#!/bin/sh
# Builds llama.cpp's own server (llama-server) from the source vendored in the llama-cpp-python sdist
# the decode bench uses, for this CPU's SIMD (bench/llamacpp_flags.sh), into $1 (default .venv/bin).
# bench/serve_peer.py runs it side by side with `dialogen serve`. About 10 minutes on 2 cores.
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
cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
cp "$work/build/bin/llama-server" "$dest/llama-server"
echo "built $dest/llama-server"
