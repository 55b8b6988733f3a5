// An event count: how idle threads wait for "work may be there" without a lock, and how a
// producer wakes only as many of them as it has work for.
//
// A waiter announces itself (prepare_wait), looks at its condition once more, then parks on the
// epoch it read before announcing (wait) or leaves (cancel_wait). A producer makes its work
// visible, then calls notify(n): with a seq_cst announcement on one side and a seq_cst look at
// the sleepers on the other, either the producer sees the waiter and bumps the epoch (so the
// futex wait returns at once or is woken), or the waiter's second look sees the work (Dekker).
// That requires the producer's "work is there" write and the waiter's look at it to be seq_cst
// too: the event count orders only its own two sides.
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <thread>

#include "apportion/mpmc_queue.hpp"
#include "apportion/parking.hpp"

namespace apportion {

class alignas(kCacheLine) EventCount {
 public:
  // count_ packs two 32-bit fields: the announced sleepers in the high half, the wake-ups
  // issued to them and not yet taken in the low half. Both stay <= the number of threads that
  // can wait at once, which kMaxWaiters bounds.
  static constexpr unsigned kSleeperShift = 32;
  static constexpr uint64_t kOneSleeper = uint64_t{1} << kSleeperShift;
  static constexpr uint64_t kWokenMask = kOneSleeper - 1;
  /// Threads that may wait on one event count at once: a wake-up count is handed to the futex
  /// as an int.
  static constexpr uint64_t kMaxWaiters = INT_MAX;
  static_assert(kWokenMask == UINT32_MAX, "wake-ups take the low 32 bits of count_");
  static_assert(kMaxWaiters <= kWokenMask,
                "woken <= sleepers <= kMaxWaiters must fit the low half, so that adding a "
                "wake-up never carries into the sleepers");
  static_assert((kMaxWaiters << kSleeperShift) >> kSleeperShift == kMaxWaiters,
                "kMaxWaiters sleepers must fit the high half of count_");
  static_assert(kMaxWaiters <= static_cast<uint64_t>(INT_MAX),
                "notify() passes a wake-up count to park_wake as an int");
  static_assert(std::atomic<uint64_t>::is_always_lock_free,
                "the sleeper count is updated by CAS on the hot path: it must not take a lock");

  /// Announces the calling thread as a sleeper and returns the ticket to park with. Follow it
  /// with exactly one wait() or cancel_wait(). Safe from any thread.
  uint32_t prepare_wait() noexcept {
    const uint32_t ticket = epoch_.load(std::memory_order_acquire);
    count_.fetch_add(kOneSleeper, std::memory_order_seq_cst);
    return ticket;
  }
  /// Parks until notified (or spuriously, or after `timeout_ns` >= 0), then leaves.
  void wait(uint32_t ticket, int64_t timeout_ns) noexcept {
    park_wait(epoch_, ticket, timeout_ns);
    leave();
  }
  /// Leaves without parking (the condition came true after prepare_wait()).
  void cancel_wait() noexcept { leave(); }

  /// Wakes up to `n` announced sleepers, skipping those that already have a wake-up on its
  /// way: without that, every push made while a woken worker is still being scheduled pays a
  /// futex syscall for nobody, and producers slow to the syscall rate exactly when the
  /// consumers are behind. Returns how many wake-ups it issued. Safe from any thread.
  std::size_t notify(std::size_t n) noexcept {
    uint64_t s = count_.load(std::memory_order_seq_cst);  // the producer's half of the handshake
    uint64_t k = 0;
    for (;;) {
      const uint64_t sleepers = s >> kSleeperShift;
      const uint64_t woken = s & kWokenMask;
      if (woken >= sleepers) return 0;  // no sleepers, or each has a wake-up in flight
      k = std::min<uint64_t>(n, sleepers - woken);
      if (count_.compare_exchange_weak(s, s + k, std::memory_order_acq_rel,
                                       std::memory_order_relaxed)) {
        break;
      }
    }
    epoch_.fetch_add(1, std::memory_order_release);
    park_wake(epoch_, static_cast<int>(k));
    return static_cast<std::size_t>(k);
  }
  /// Wakes every parked thread, announced or about to park (a thread that read the epoch before
  /// this call does not park). For shutdown: a caller sets its stop flag first. Safe from any
  /// thread.
  void notify_all() noexcept {
    epoch_.fetch_add(1, std::memory_order_release);
    park_wake(epoch_);
  }

  /// Announced sleepers and wake-ups in flight, for tests and diagnostics (a moment's view).
  uint32_t sleepers() const noexcept {
    return static_cast<uint32_t>(count_.load(std::memory_order_relaxed) >> kSleeperShift);
  }
  uint32_t wakeups_in_flight() const noexcept {
    return static_cast<uint32_t>(count_.load(std::memory_order_relaxed) & kWokenMask);
  }

  enum class Wait : uint8_t { ready, timeout, stopped };

  /// Spin-then-park: polls `spin_check` for up to `spin_ns` (bounded by `until_ns` when >= 0),
  /// then announces itself, tries `check` once more and parks, until `check` succeeds
  /// (`ready`), `until_ns` passes (`timeout`; < 0: never), or `stopping` holds and a last
  /// `check` finds nothing (`stopped`). `pending`, looked at (after `check` failed) before
  /// parking, says the work is on its way (a producer between announcing and publishing it):
  /// the waiter then yields and retries instead of parking.
  ///
  /// The spin is bounded by time, not by rounds: the cost of a pause instruction varies ~10x
  /// between CPUs. `stopping` must be set before the stopper's notify_all(): it is read again
  /// after the epoch, so a waiter that read the bumped epoch sees it instead of sleeping
  /// through the stop.
  template <class SpinCheck, class Check, class Pending, class Stopping>
  Wait await(int64_t spin_ns, int64_t until_ns, SpinCheck&& spin_check, Check&& check,
             Pending&& pending, Stopping&& stopping) noexcept {
    if (spin_check()) return Wait::ready;
    if (spin_ns > 0) {
      int64_t spin_until = now_ns() + spin_ns;
      if (until_ns >= 0) spin_until = std::min(spin_until, until_ns);
      do {
        for (int i = 0; i < 16; ++i) cpu_relax();
        if (spin_check()) return Wait::ready;
      } while (now_ns() < spin_until && !stopping());
    }
    for (;;) {
      if (stopping()) return check() ? Wait::ready : Wait::stopped;
      const uint32_t ticket = prepare_wait();
      if (check()) {
        cancel_wait();
        return Wait::ready;
      }
      const bool on_its_way = pending();
      int64_t remaining = -1;
      if (until_ns >= 0) {
        remaining = until_ns - now_ns();
        if (remaining <= 0) {
          cancel_wait();
          return Wait::timeout;
        }
      }
      if (!on_its_way && !stopping()) {
        wait(ticket, remaining);
      } else {
        cancel_wait();
      }
      // Unregistered, so notifies meanwhile skip the wake-up syscall; on a busy core the thread
      // we wait for (a producer between announcing and publishing) gets to run.
      if (on_its_way) std::this_thread::yield();
    }
  }

 private:
  // A sleeper stops waiting (for any reason) and takes one in-flight wake-up with it, if there
  // is one. Wake-ups are not addressed, so the one taken may have been meant for another
  // sleeper; that only leaves `woken` too low (a spare wake-up later), never a missed one.
  void leave() noexcept {
    uint64_t s = count_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t woken = s & kWokenMask;
      const uint64_t next = s - kOneSleeper - (woken != 0 ? 1 : 0);
      if (count_.compare_exchange_weak(s, next, std::memory_order_relaxed)) return;
    }
  }

  std::atomic<uint32_t> epoch_{0};  // what sleepers park on (a futex word)
  std::atomic<uint64_t> count_{0};
};

}  // namespace apportion
