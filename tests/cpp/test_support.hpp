#pragma once
// A minimal self-contained test harness for the C++ tests (no GoogleTest, nothing downloaded).
//
// - TEST_CASE(name) { ... } registers a test; run_all(argc, argv) runs them in order (an
//   optional argv[1] runs only the tests whose name contains it) and prints one closing line,
//   "N passed, M failed", returning non-zero when anything failed.
// - CHECK(cond), CHECK_EQ/NE/LT/LE/GT/GE(a, b) and CHECK_THROWS_AS(expr, type) record a failure
//   with file:line and the values, and go on. They are safe to call from worker threads.
//   REQUIRE(cond) additionally ends the current test (test thread only).
// - Each test runs under a watchdog: a test that hangs longer than DYNBATCH_TEST_HANG_S
//   seconds (default 90) is named on stderr and the process aborts, so a deadlock is a failure
//   with a name rather than a ctest timeout.
// - env_size("NAME", default) reads a size override from the environment (stress sizes).

#include <atomic>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace dynbatch::testing {

// True when compiled with ThreadSanitizer (GCC and Clang spell it differently).
#if defined(__SANITIZE_THREAD__)
inline constexpr bool under_tsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool under_tsan = true;
#else
inline constexpr bool under_tsan = false;
#endif
#else
inline constexpr bool under_tsan = false;
#endif

namespace detail {

struct TestCase {
  std::string name;
  std::function<void()> body;
};

inline std::vector<TestCase> &registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline std::atomic<std::uint64_t> &failure_count() {
  static std::atomic<std::uint64_t> failures{0};
  return failures;
}

inline std::mutex &output_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct Registrar {
  Registrar(const char *name, void (*body)()) { registry().push_back({name, body}); }
};

// Thrown by REQUIRE to end the current test; the runner catches it.
struct RequireFailed {};

template <class T>
concept Streamable = requires(std::ostream &os, const T &value) { os << value; };

template <class T> std::string show(const T &value) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, bool>) {
    os << (value ? "true" : "false");
  } else if constexpr (std::is_same_v<T, std::byte>) {
    os << "0x" << std::hex << static_cast<unsigned>(value);
  } else if constexpr (std::is_same_v<T, char> || std::is_same_v<T, signed char> ||
                       std::is_same_v<T, unsigned char>) {
    os << static_cast<int>(value);
  } else if constexpr (std::is_enum_v<T>) {
    os << "enum(" << static_cast<long long>(static_cast<std::underlying_type_t<T>>(value)) << ")";
  } else if constexpr (std::is_pointer_v<T> || std::is_null_pointer_v<T>) {
    os << static_cast<const void *>(value);
  } else if constexpr (Streamable<T>) {
    os << value;
  } else {
    os << "<" << sizeof(T) << "-byte value>";
  }
  return os.str();
}

inline void report_failure(const char *file, int line, const std::string &message) {
  failure_count().fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(output_mutex());
  std::cerr << file << ":" << line << ": FAILED: " << message << std::endl;
}

template <class A, class B>
bool check_compare(bool ok, const A &a, const B &b, const char *op, const char *a_text,
                   const char *b_text, const char *file, int line) {
  if (!ok) {
    report_failure(file, line,
                   std::string(a_text) + " " + op + " " + b_text + "  [" + show(a) + " vs " +
                       show(b) + "]");
  }
  return ok;
}

// Compares integers of mixed signedness by value, everything else with the operator itself.
template <class A, class B> constexpr bool equal(const A &a, const B &b) {
  if constexpr (std::is_integral_v<A> && std::is_integral_v<B> && !std::is_same_v<A, bool> &&
                !std::is_same_v<B, bool>) {
    return std::cmp_equal(a, b);
  } else {
    return a == b;
  }
}
template <class A, class B> constexpr bool less(const A &a, const B &b) {
  if constexpr (std::is_integral_v<A> && std::is_integral_v<B> && !std::is_same_v<A, bool> &&
                !std::is_same_v<B, bool>) {
    return std::cmp_less(a, b);
  } else {
    return a < b;
  }
}

// Aborts the process, naming the test, when one test runs longer than the limit.
class Watchdog {
public:
  Watchdog(std::string name, std::chrono::seconds limit)
      : name_(std::move(name)), thread_([this, limit] { watch(limit); }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    changed_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog &) = delete;
  Watchdog &operator=(const Watchdog &) = delete;

private:
  void watch(std::chrono::seconds limit) {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, limit, [this] { return done_; })) {
      std::fprintf(stderr, "\nTEST HUNG: %s ran longer than %lld s; aborting\n", name_.c_str(),
                   static_cast<long long>(limit.count()));
      std::fflush(stderr);
      std::abort();
    }
  }

  std::string name_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool done_ = false;
  std::thread thread_;
};

} // namespace detail

// Waits (bounded, only to detect a hang) until `done` holds; returns whether it did.
template <class Predicate>
bool eventually(Predicate done, std::chrono::milliseconds bound = std::chrono::seconds(5)) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

inline std::size_t env_size(const char *name, std::size_t fallback) {
  const char *text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    return fallback;
  }
  char *end = nullptr;
  const unsigned long long value = std::strtoull(text, &end, 10);
  return (end != nullptr && *end == '\0' && value > 0) ? static_cast<std::size_t>(value) : fallback;
}

inline int run_all(int argc, char **argv) {
  const std::string_view filter = argc > 1 ? std::string_view(argv[1]) : std::string_view();
  const auto hang_limit = std::chrono::seconds(env_size("DYNBATCH_TEST_HANG_S", 90));
  std::size_t passed = 0;
  std::size_t failed = 0;
  const auto start_all = std::chrono::steady_clock::now();
  for (const detail::TestCase &test : detail::registry()) {
    if (!filter.empty() && test.name.find(filter) == std::string::npos) {
      continue;
    }
    {
      std::lock_guard lock(detail::output_mutex());
      std::cout << "[ RUN      ] " << test.name << std::endl;
    }
    const std::uint64_t failures_before = detail::failure_count().load();
    const auto start = std::chrono::steady_clock::now();
    bool threw = false;
    {
      detail::Watchdog watchdog(test.name, hang_limit);
      try {
        test.body();
      } catch (const detail::RequireFailed &) {
        threw = true;
      } catch (const std::exception &error) {
        detail::report_failure(__FILE__, __LINE__,
                               "uncaught exception in " + test.name + ": " + error.what());
        threw = true;
      } catch (...) {
        detail::report_failure(__FILE__, __LINE__, "uncaught non-std exception in " + test.name);
        threw = true;
      }
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    const bool ok = !threw && detail::failure_count().load() == failures_before;
    (ok ? passed : failed) += 1;
    std::lock_guard lock(detail::output_mutex());
    std::cout << (ok ? "[       OK ] " : "[  FAILED  ] ") << test.name << " (" << ms << " ms)"
              << std::endl;
  }
  const auto total_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - start_all)
                            .count();
  std::cout << (argc > 0 ? argv[0] : "tests") << ": " << passed << " passed, " << failed
            << " failed (" << total_ms << " ms)" << std::endl;
  if (passed + failed == 0) {
    std::cout << "no test matched the filter" << std::endl;
    return 2;
  }
  return failed == 0 ? 0 : 1;
}

} // namespace dynbatch::testing

#define DYNBATCH_TEST_CONCAT_INNER(a, b) a##b
#define DYNBATCH_TEST_CONCAT(a, b) DYNBATCH_TEST_CONCAT_INNER(a, b)

#define TEST_CASE(name)                                                                            \
  static void name();                                                                              \
  static const ::dynbatch::testing::detail::Registrar DYNBATCH_TEST_CONCAT(registrar_,             \
                                                                           name)(#name, &name);    \
  static void name()

#define CHECK(cond)                                                                                \
  ((cond) ? true                                                                                   \
          : (::dynbatch::testing::detail::report_failure(__FILE__, __LINE__, "CHECK(" #cond ")"),  \
             false))

#define REQUIRE(cond)                                                                              \
  do {                                                                                             \
    if (!CHECK(cond)) {                                                                            \
      throw ::dynbatch::testing::detail::RequireFailed{};                                          \
    }                                                                                              \
  } while (false)

#define DYNBATCH_CHECK_OP(a, b, op, test)                                                          \
  [&](const auto &dynbatch_a_, const auto &dynbatch_b_) {                                          \
    return ::dynbatch::testing::detail::check_compare(test, dynbatch_a_, dynbatch_b_, op, #a, #b,  \
                                                      __FILE__, __LINE__);                         \
  }((a), (b))

#define CHECK_EQ(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, "==", ::dynbatch::testing::detail::equal(dynbatch_a_, dynbatch_b_))
#define CHECK_NE(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, "!=", !::dynbatch::testing::detail::equal(dynbatch_a_, dynbatch_b_))
#define CHECK_LT(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, "<", ::dynbatch::testing::detail::less(dynbatch_a_, dynbatch_b_))
#define CHECK_LE(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, "<=", !::dynbatch::testing::detail::less(dynbatch_b_, dynbatch_a_))
#define CHECK_GT(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, ">", ::dynbatch::testing::detail::less(dynbatch_b_, dynbatch_a_))
#define CHECK_GE(a, b)                                                                             \
  DYNBATCH_CHECK_OP(a, b, ">=", !::dynbatch::testing::detail::less(dynbatch_a_, dynbatch_b_))

#define CHECK_THROWS_AS(expr, type)                                                                \
  do {                                                                                             \
    bool dynbatch_caught_ = false;                                                                 \
    try {                                                                                          \
      static_cast<void>(expr);                                                                     \
    } catch (const type &) {                                                                       \
      dynbatch_caught_ = true;                                                                     \
    } catch (...) {                                                                                \
    }                                                                                              \
    if (!dynbatch_caught_) {                                                                       \
      ::dynbatch::testing::detail::report_failure(__FILE__, __LINE__,                              \
                                                  "expected " #expr " to throw " #type);           \
    }                                                                                              \
  } while (false)
