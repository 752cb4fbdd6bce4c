#pragma once
// Small platform facts shared by every component.

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace dynbatch {

// A project constant rather than std::hardware_destructive_interference_size, which GCC warns
// about because its value may differ between translation units compiled with other flags.
inline constexpr std::size_t cache_line_size = 64;

// Staging buffers start on page boundaries: memcpy slows down sharply when source and
// destination alias modulo 4 KiB.
inline constexpr std::size_t page_size = 4096;

using Nanoseconds = std::int64_t;

inline Nanoseconds now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline constexpr Nanoseconds no_deadline = INT64_MAX;

inline constexpr std::size_t align_up(std::size_t value, std::size_t alignment) noexcept {
  return (value + alignment - 1) / alignment * alignment;
}

} // namespace dynbatch
