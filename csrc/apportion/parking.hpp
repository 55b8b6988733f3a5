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
#include <sched.h>
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

/// The CPU this thread runs on now (-1 where unknown). Cheap (vDSO / rseq).
inline int current_cpu() noexcept {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

/// How many hand-offs in a row a thread must find its peer on its own CPU before it stops
/// spinning for it, provided no other CPU of its set was idle lately (other_cpu_idle). On an
/// idle machine two threads share a CPU only for moments (the scheduler moves one), or settle
/// there once both park; on a busy one, every CPU but this one is taken.
inline constexpr uint32_t kColocatedStreak = 4;
/// Whether an idle worker's spin for its next request can pay, judged by when its requests
/// were submitted: a spin catches only a request submitted within it. A worker whose last
/// kLateInARow requests each came later than its spin would have lasted is `late`, and parks
/// at once while another CPU is idle (a spin would only hold a CPU that its callers, or the
/// threads between them and it, need: a network front's lone client sends its next request
/// ~400 us after the answer, and a 50 us spin after each request put 10% on its round trip on
/// 2 CPUs). Judged from each request's submission time whether the worker spun or parked, so
/// one request within the spin ends it. Not while every other CPU is busy: there the gaps
/// measure the host (a caller that parked waits for a CPU to wake on, and a worker that parks
/// makes its caller park too), not the caller's pace, and the colocated streak rules the spin.
/// Every kProbeEvery-th wait while late spins anyway, in case the gaps came from such a busy
/// moment. One per worker, touched only by its thread.
class ArrivalSpin {
 public:
  static constexpr uint32_t kLateInARow = 2;
  static constexpr uint32_t kProbeEvery = 16;

  /// The last kLateInARow requests came after the spin would have ended.
  bool late() const noexcept { return late_ >= kLateInARow; }
  /// For a wait while late: true every kProbeEvery-th call (spin anyway, to find out).
  bool probe() noexcept {
    if (++parked_ < kProbeEvery) return false;
    parked_ = 0;
    return true;
  }
  /// The worker went idle at `idle_from_ns` and its next request was submitted at `submit_ns`;
  /// `spin_ns` is its spin budget.
  void arrived(int64_t idle_from_ns, int64_t submit_ns, int64_t spin_ns) noexcept {
    if (submit_ns - idle_from_ns <= spin_ns) {
      in_time();
    } else if (late_ < kLateInARow) {
      ++late_;
    }
  }
  /// The worker's next request was queued before it went idle (it did not wait for it).
  void in_time() noexcept {
    late_ = 0;
    parked_ = 0;
  }

 private:
  uint32_t late_ = 0;    // requests in a row that came after the spin would have ended (saturates)
  uint32_t parked_ = 0;  // waits parked at once since the last probe
};

/// How long a waiter spins for a request that no worker has started before it asks whether a
/// CPU is idle (if none is, the worker woken for it is waiting for the CPU the spin holds).
/// Longer than a spinning worker takes to claim a request (~1 us); shorter than a futex wake.
inline constexpr int64_t kUnstartedSpinNs = 5'000;

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

/// Spinning that backs off where it does not pay. A spin before parking pays only when what
/// it waits for comes within it, and that needs the peer to get a CPU: on a machine whose CPUs
/// are busy the spinner keeps its own peer waiting (measured on 2 CPUs with one kept busy:
/// 115-120 us process round trips spinning, 11-17 us parking at once). After kFailedSpins
/// spins in a row ran out, waits park at once, except every kProbeEvery-th, which spins again
/// to find out whether spinning pays again; a spin that catches its event ends the suspension.
/// Also saves the CPU a spin would burn before every wait for a slow peer. One waiter at a
/// time (successive waiters may be different threads: hence atomics, all relaxed).
/// Used by the process channel. (Not by futures: there the spin is shorter than many round
/// trips it waits for, and backing off cost 1.5-2x on an idle machine in a first try. Engine
/// workers judge their spin by ArrivalSpin, from when their requests were submitted.)
class AdaptiveSpin {
 public:
  static constexpr uint32_t kFailedSpins = 2;
  static constexpr uint32_t kProbeEvery = 64;

  /// How long this wait may spin: `spin_ns`, or 0 while spinning is suspended (but `spin_ns`
  /// on a probe). Call once per wait, then caught() or ran_out() if it spun.
  int64_t budget(int64_t spin_ns) noexcept {
    if (spin_ns <= 0 || failed_.load(std::memory_order_relaxed) < kFailedSpins) return spin_ns;
    const uint32_t n = (parked_.load(std::memory_order_relaxed) + 1) % kProbeEvery;
    parked_.store(n, std::memory_order_relaxed);
    return n == 0 ? spin_ns : 0;
  }
  /// The spin saw its event.
  void caught() noexcept {
    if (failed_.load(std::memory_order_relaxed) != 0) failed_.store(0, std::memory_order_relaxed);
  }
  /// The spin used its whole budget in vain.
  void ran_out() noexcept {
    const uint32_t f = failed_.load(std::memory_order_relaxed);
    if (f < kFailedSpins) failed_.store(f + 1, std::memory_order_relaxed);
  }
  /// Whether waits now park at once (probes aside).
  bool suspended() const noexcept { return failed_.load(std::memory_order_relaxed) >= kFailedSpins; }

 private:
  std::atomic<uint32_t> failed_{0};  // spins in a row that ran out (saturates)
  std::atomic<uint32_t> parked_{0};  // waits parked at once since the last probe
};

}  // namespace apportion
