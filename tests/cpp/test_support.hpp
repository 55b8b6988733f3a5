// Helpers shared by the C++ tests: sanitizer detection, a deadlock watchdog, and a check that a
// thread is asleep in the kernel.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <mutex>
#include <string>
#include <thread>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace apportion::testing {

// Sanitizer builds run 5-20x slower: tests scale their iteration counts and limits by this.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

/// `n`, or a tenth of it (at least 1) under a sanitizer.
constexpr uint64_t scaled(uint64_t n) { return kSanitized ? std::max<uint64_t>(n / 10, 1) : n; }

/// Aborts the process, naming the test, unless destroyed within `limit` (4x under sanitizers).
/// A hung thread cannot be cancelled from inside the process (joining or destroying a
/// std::async future would hang too), so ending the process is the only reliable way to turn a
/// deadlock into a failure with a useful message.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::seconds limit) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = info ? std::string(info->test_suite_name()) + "." + info->name() : "?";
    const auto effective = kSanitized ? limit * 4 : limit;
    thread_ = std::thread([this, effective] {
      std::unique_lock lock(mu_);
      if (!cv_.wait_for(lock, effective, [this] { return done_; })) {
        std::fprintf(stderr, "\nWATCHDOG: %s did not finish within %lld s (deadlock or missed wake-up?)\n",
                     name_.c_str(), static_cast<long long>(effective.count()));
        std::fflush(stderr);
        std::abort();
      }
    });
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  ~Watchdog() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

/// Runs `fn` on another thread; if it does not finish within `limit` (4x under sanitizers) the
/// test fails and the process aborts, naming the test: a hung thread cannot be joined, and a
/// std::async future would wait for it in its destructor.
template <class Fn>
void guarded(std::chrono::seconds limit, Fn fn) {
  auto fut = std::async(std::launch::async, std::move(fn));
  const auto effective = kSanitized ? limit * 4 : limit;
  if (fut.wait_for(effective) != std::future_status::ready) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    ADD_FAILURE() << "deadlock guard: did not finish within " << effective.count() << " s";
    std::fprintf(stderr, "\nDEADLOCK GUARD: %s.%s did not finish within %lld s\n",
                 info ? info->test_suite_name() : "?", info ? info->name() : "?",
                 static_cast<long long>(effective.count()));
    std::fflush(stderr);
    std::abort();
  }
  fut.get();
}

/// Live-object counter for test request types: construct/destroy bump these, so a leak or a
/// double destruction shows as live() != its value before the test.
#if defined(__linux__)
/// The calling thread's kernel id.
inline int this_tid() { return static_cast<int>(::syscall(SYS_gettid)); }

/// True once thread `tid` of this process is asleep in the kernel ('S' in
/// /proc/self/task/<tid>/stat). A test whose thread makes one blocking call only (a futex wait)
/// reads this as "parked there".
inline bool is_sleeping(int tid) {
  std::ifstream stat("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const auto close_paren = line.rfind(')');
  return close_paren != std::string::npos && close_paren + 2 < line.size() &&
         line[close_paren + 2] == 'S';
}
#endif

inline std::atomic<int64_t> g_constructed{0};
inline std::atomic<int64_t> g_destroyed{0};
inline int64_t live() { return g_constructed.load() - g_destroyed.load(); }

}  // namespace apportion::testing
