#include "dynbatch/build_info.hpp"

namespace dynbatch {
namespace {
std::string compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}
} // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = DYNBATCH_VERSION;
  info.compiler = compiler_name();
#ifdef DYNBATCH_WITH_CUDA
  info.cuda_compiled = true;
  info.cuda_architectures = DYNBATCH_CUDA_ARCHITECTURES;
#endif
  info.cuda_runtime_version = detail::cuda_runtime_version();
  return info;
}

} // namespace dynbatch
