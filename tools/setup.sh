#!/usr/bin/env bash
# Installs what gradq needs from Debian's packages (bookworm). Quick when everything is present.
#   bash tools/setup.sh            Debian's LibTorch 1.13 (the default line)
#   bash tools/setup.sh --torch2   PyTorch 2.x's libtorch: the `torch` wheel in .venv-torch2 (pip),
#                                  the other libraries from Debian. Prints the CMake prefix of torch.
#   bash tools/setup.sh --fuzz     also what the fuzz build needs (tools/fuzz.sh): clang 14, its
#                                  libFuzzer and sanitizer runtimes (libclang-rt-14-dev) and lld.
# The options combine (--torch2 --fuzz). GRADQ_TORCH2_VERSION picks the wheel (default 2.11.0, the
# version of the GPU machine that tools/device_check.sh runs on, so that CI tests what the device
# check builds).
set -euo pipefail
cd "$(dirname "$0")/.."
line=debian
fuzz=0
for arg in "$@"; do
  case "$arg" in
    --torch2) line=torch2 ;;
    --fuzz) fuzz=1 ;;
    *) echo "setup: unknown option '$arg' (expected --torch2 and/or --fuzz)" >&2; exit 1 ;;
  esac
done
# OpenBLAS built for OpenMP: libtorch's loops run in the OpenMP pool, and a BLAS in the same pool
# lets gradq::linear alternate the two without the pthreads build's idle threads competing for the
# cores (docs/BENCHMARKS.md, "Batched linear"). Either OpenBLAS build is far faster than the
# reference BLAS that libtorch-dev pulls in.
packages=(cmake ninja-build g++ libsentencepiece-dev libfmt-dev libcxxopts-dev nlohmann-json3-dev libgtest-dev
          libtcmalloc-minimal4)
if [ "$line" = debian ]; then
  packages+=(libtorch-dev libopenblas0-openmp)
elif ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  packages+=(python3-venv)  # the torch wheel's BLAS is its own: no OpenBLAS to select
fi
[ "$fuzz" -eq 0 ] || packages+=(clang-14 libclang-rt-14-dev lld)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
else
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian picks among installed BLAS builds by priority, and the pthreads build outranks the OpenMP
# one: select the OpenMP build where another is selected.
triplet=$(gcc -print-multiarch)
for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  want=/usr/lib/$triplet/openblas-openmp/$lib
  current=$(update-alternatives --query "$lib-$triplet" 2>/dev/null | sed -n 's/^Value: //p')
  if [ -e "$want" ] && [ "$current" != "$want" ]; then
    echo "setup: selecting $want (was ${current:-none})"
    $SUDO update-alternatives --quiet --set "$lib-$triplet" "$want"
  fi
done
if [ "$line" = torch2 ]; then
  venv=.venv-torch2
  version=${GRADQ_TORCH2_VERSION:-2.11.0}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if [ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" = "$version" ]; then
    echo "setup: torch $version present in $venv"
  else
    # With nvcc on the PATH, PyPI's default wheel: it is CUDA-enabled and pulls about 3 GB of CUDA
    # libraries, but only against it does the CUDA op registration (csrc/ops/ops_cuda.cpp) compile,
    # which is what CI checks on this line. Without nvcc, the CPU wheel (about 200 MB) where its
    # index is reachable, otherwise PyPI's.
    index=()
    cpu_index=https://download.pytorch.org/whl/cpu
    if ! command -v nvcc >/dev/null &&
        "$venv/bin/pip" index versions torch --index-url "$cpu_index" --timeout 10 --retries 0 2>/dev/null |
        grep -q "[ ,]$version[,+]"; then
      index=(--index-url "$cpu_index")
    fi
    echo "setup: installing torch==$version into $venv from ${index[1]:-PyPI}"
    "$venv/bin/pip" install -q --progress-bar off "${index[@]}" "torch==$version"
  fi
  echo "setup: torch's CMake prefix: $("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
fi
echo "setup: done"
