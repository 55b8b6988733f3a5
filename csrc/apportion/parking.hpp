// Parking primitives: futex-style wait/wake on a 32-bit atomic word, with a timeout.
//
// C++20's std::atomic::wait has no timeout, and every blocking operation in apportion needs one
// (deadlines, result(timeout=...), shutdown). On Linux the futex syscall gives exactly that; on
// other platforms a short sleep loop keeps the contract (wake-ups are then up to 50 us late).
#pragma once

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace apportion {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t),
              "futex needs std::atomic<uint32_t> to be a plain 32-bit word");

/// CPU hint for spin loops: lets the sibling hyperthread run and saves power. Safe anywhere.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

/// Monotonic nanoseconds; the one clock used for deadlines and latency metrics.
inline int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// Who may wake a parked thread. `process`: threads of this process only (FUTEX_PRIVATE: the
/// kernel skips the cross-process lookup). `shared`: the word lives in memory mapped by several
/// processes and the waker may be another one.
enum class ParkScope : uint8_t { process, shared };

/// Blocks while `word == expected`, at most `timeout_ns` (< 0: no limit). May return spuriously:
/// callers re-check their condition. Safe from any thread.
inline void park_wait(std::atomic<uint32_t>& word, uint32_t expected, int64_t timeout_ns,
                      ParkScope scope = ParkScope::process) noexcept {
#if defined(__linux__)
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout_ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout_ns % 1'000'000'000);
    tsp = &ts;
  }
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word),
          scope == ParkScope::shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE, expected, tsp, nullptr, 0);
#else
  (void)scope;
  if (word.load(std::memory_order_acquire) != expected) return;
  int64_t step = 50'000;
  if (timeout_ns >= 0 && timeout_ns < step) step = timeout_ns;
  std::this_thread::sleep_for(std::chrono::nanoseconds(step));
#endif
}

/// Wakes up to `count` threads parked on `word` (with the scope they parked with). Safe from
/// any thread.
inline void park_wake(std::atomic<uint32_t>& word, int count = INT_MAX,
                      ParkScope scope = ParkScope::process) noexcept {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word),
          scope == ParkScope::shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
#else
  (void)word;
  (void)count;
  (void)scope;
#endif
}

}  // namespace apportion
