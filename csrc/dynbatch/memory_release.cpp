#include "dynbatch/memory_release.hpp"

#include <cstdlib> // defines __GLIBC__ (through <features.h>) where it applies

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace dynbatch {

void release_cached_memory() noexcept {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

} // namespace dynbatch
