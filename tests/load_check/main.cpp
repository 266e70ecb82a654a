// gradq_load_check [--float] MODEL [OPS_LIBRARY]: a plain libtorch program (no gradq linked) that
// loads a TorchScript causal LM, optionally after dlopen()ing the gradq op library, and prints the
// logits' shape, dtype and sum. Tests use it to show that a packed checkpoint runs in any libtorch
// program once the ops are loaded, and fails with a clear message when they are not. --float converts
// the module's floating tensors to float32 first, as a CPU consumer of an fp16 model must (libtorch
// 1.13 has no fp16 CPU kernels for matmul, norms or softmax).

#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>
#include <cstring>
#include <iostream>

int main(int argc, char** argv) {
  const bool to_float = argc > 1 && std::strcmp(argv[1], "--float") == 0;
  if (to_float) {
    --argc;
    ++argv;
  }
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: gradq_load_check [--float] MODEL [OPS_LIBRARY]\n";
    return 2;
  }
  if (argc == 3 && !dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    if (to_float) {
      // Floating tensors only, as Python's Module.float() does: the C++ Module::to would convert a
      // packed model's integer codes too.
      for (const auto& p : model.named_parameters(true))
        if (p.value.is_floating_point()) p.value.set_data(p.value.to(at::kFloat));
      for (const auto& b : model.named_buffers(true))
        if (b.value.is_floating_point()) b.value.set_data(b.value.to(at::kFloat));
    }
    const at::Tensor tokens = at::arange(1, 17, at::kLong).view({2, 8});
    // The logits as a consumer finds them: the output itself, the first element of a tuple or the
    // "logits" entry of a dict (Hugging Face's outputs, traced).
    const c10::IValue out = model.forward({tokens});
    const at::Tensor logits = out.isTuple()        ? out.toTupleRef().elements().at(0).toTensor()
                              : out.isGenericDict() ? out.toGenericDict().at(std::string("logits")).toTensor()
                                                    : out.toTensor();
    std::printf("logits %s %s sum %.6f\n", c10::str(logits.sizes()).c_str(), c10::toString(logits.scalar_type()),
                logits.to(at::kDouble).sum().item<double>());
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {  // the TorchScript interpreter rethrows op errors as runtime_error
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
