#!/usr/bin/env bash
# Installs what gradq needs from Debian's packages (bookworm). Quick when everything is present.
# --fuzz also installs what the fuzz build needs (tools/fuzz.sh): clang 14, its libFuzzer and
# sanitizer runtimes (libclang-rt-14-dev) and lld.
set -euo pipefail
fuzz=0
for arg in "$@"; do
  case "$arg" in
    --fuzz) fuzz=1 ;;
    *) echo "setup: unknown option '$arg' (expected --fuzz)" >&2; exit 1 ;;
  esac
done
# OpenBLAS built for OpenMP: libtorch's loops run in the OpenMP pool, and a BLAS in the same pool
# lets gradq::linear alternate the two without the pthreads build's idle threads competing for the
# cores (docs/BENCHMARKS.md, "Batched linear"). Either OpenBLAS build is far faster than the
# reference BLAS that libtorch-dev pulls in.
packages=(cmake ninja-build g++ libtorch-dev libopenblas0-openmp libsentencepiece-dev libfmt-dev
          libcxxopts-dev nlohmann-json3-dev libgtest-dev)
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
echo "setup: done"
