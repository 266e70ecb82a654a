#!/usr/bin/env bash
# Sets up, builds the CLI, and runs gradq's main job on the embedded default (stories260K, its
# tokenizer and TinyStories text): convert to TorchScript, quantize within +5% held-out perplexity,
# then generate with the quantized model and evaluate it against the original on the whole text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADQ_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target gradq_cli
mkdir -p out
./build/gradq convert --from llama2c third_party/assets/stories260K/stories260K.bin -o out/stories260K.pt
./build/gradq quantize --model out/stories260K.pt --max-ppl-increase 0.05 -o out/stories260K-q.pt \
  --fake-quant out/stories260K-fq.pt --save-plan out/plan.json --report out/report.json
./build/gradq generate --model out/stories260K-q.pt --steps 100
./build/gradq eval --model out/stories260K-q.pt --reference out/stories260K.pt --json out/eval.json
