// gradq_load_check MODEL [OPS_LIBRARY]: a plain libtorch program (no gradq linked) that loads a
// TorchScript causal LM, optionally after dlopen()ing the gradq op library, and prints the logits'
// shape and sum. Tests use it to show that a packed checkpoint runs in any libtorch program once the
// ops are loaded, and fails with a clear message when they are not.

#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>
#include <iostream>

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: gradq_load_check MODEL [OPS_LIBRARY]\n";
    return 2;
  }
  if (argc == 3 && !dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    const at::Tensor tokens = at::arange(1, 17, at::kLong).view({2, 8});
    const at::Tensor logits = model.forward({tokens}).toTensor();
    std::printf("logits %s sum %.6f\n", c10::str(logits.sizes()).c_str(), logits.sum().item<double>());
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
