#!/usr/bin/env bash
# Sets up, builds the CLI, and runs gradq's main job on the embedded default (stories260K, its
# tokenizer and TinyStories text): convert to TorchScript, generate, and evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADQ_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target gradq_cli
mkdir -p out
./build/gradq convert --from llama2c third_party/assets/stories260K/stories260K.bin -o out/stories260K.pt
./build/gradq generate --model out/stories260K.pt --steps 100
./build/gradq eval --model out/stories260K.pt --json out/eval.json
