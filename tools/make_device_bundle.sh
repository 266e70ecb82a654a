#!/usr/bin/env bash
# Prepares .device-bundle/: what tools/device_check.sh needs on the GPU machine and that machine
# lacks (it has PyTorch, CMake, nvcc and a compiler, but no Debian packages): SentencePiece, fmt,
# cxxopts, nlohmann-json and GoogleTest, copied from this machine's Debian packages with their
# paths under /usr kept, so that their CMake package files (which locate themselves relative to
# their own directory) work from the copy. Carry it with the device tool: carry [".device-bundle"]
# (under its 64 MiB limit; the script prints the size).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh >/dev/null
bundle=.device-bundle
rm -rf "$bundle"
mkdir -p "$bundle/usr"
packages=(libsentencepiece-dev libsentencepiece0 libfmt-dev libfmt9 libcxxopts-dev nlohmann-json3-dev libgtest-dev)
for p in "${packages[@]}"; do
  # Files only (directories come with them), without documentation and pkg-config files.
  dpkg -L "$p" | while read -r f; do
    [ -f "$f" ] || [ -L "$f" ] || continue
    case "$f" in /usr/share/doc/* | /usr/share/man/* | */pkgconfig/*) continue ;; esac
    mkdir -p "$bundle$(dirname "$f")"
    cp -P "$f" "$bundle$f"
  done
done
# The multiarch directory is Debian's; device_check.sh points CMake at each package's files.
echo "$(gcc -print-multiarch)" >"$bundle/multiarch"
size=$(du -sm "$bundle" | cut -f1)
echo "bundle: $bundle, $(find "$bundle" -type f | wc -l) files, ${size} MiB (the device tool carries at most 64 MiB)"
[ "$size" -lt 64 ] || { echo "bundle: ${size} MiB is over the device tool's 64 MiB" >&2; exit 1; }
