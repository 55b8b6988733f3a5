// An event count: how idle threads wait for "work may be there" without a lock on the way to
// the work, and how a producer wakes only as many of them as it has work for.
//
// A waiter announces itself (prepare_wait), looks at its condition once more, then parks on the
// ticket it got (wait) or leaves (cancel_wait). A producer makes its work visible, then calls
// notify(n): with a seq_cst announcement on one side and a seq_cst look at the sleepers on the
// other, either the producer sees the waiter and wakes it, or the waiter's second look sees the
// work (Dekker). That requires the producer's "work is there" write and the waiter's look at it
// to be seq_cst too: the event count orders only its own two sides.
//
// Wake-ups go to the sleeper that parked last. Each waiter parks on its own word, and parked
// waiters form a stack: the thread that found nothing most recently is the one that finished
// its last piece of work most recently, and its cache, its CPU and the data it used are the
// warmest. A futex on one shared word wakes its oldest sleeper instead, which under a lone
// closed-loop client alternates between two idle workers and runs every call cold (a torch MLP
// served by 2 instances computed in 0.28-0.40 ms a call against 0.19-0.22 ms with 1 instance,
// on 2 CPUs). The stack sits behind a mutex taken only by waiters announcing and leaving and by
// producers that found a sleeper to wake: the paths that make a futex syscall anyway. A
// producer with no sleeper to wake reads one atomic and returns. The wake-up syscall itself is
// made after the lock is let go: a woken waiter leaving at once would otherwise block on the
// lock, and the producer pay a second syscall to let it in.
//
// A waiter spinning in await() counts itself as a spinner, and a producer claims a spinner
// before it wakes a sleeper: the spinner finds the work in its spin, so waking a parked thread
// for it only costs the producer a syscall and that thread a trip through the scheduler to
// find nothing (under a lone closed-loop client, one such wake-up a request). A spinner whose
// spin ends while claimed (it finds the count at zero) looks once more before it parks, as
// every waiter does, and sees the claimed work: the producer made it visible before it claimed.
// Spinners are interchangeable: the one that finds the count at zero is the one claimed.
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <mutex>
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
  /// Threads that may wait on one event count at once.
  static constexpr uint64_t kMaxWaiters = INT_MAX;
  static_assert(kWokenMask == UINT32_MAX, "wake-ups take the low 32 bits of count_");
  static_assert(kMaxWaiters <= kWokenMask,
                "woken <= sleepers <= kMaxWaiters must fit the low half, so that adding a "
                "wake-up never carries into the sleepers");
  static_assert((kMaxWaiters << kSleeperShift) >> kSleeperShift == kMaxWaiters,
                "kMaxWaiters sleepers must fit the high half of count_");
  static_assert(std::atomic<uint64_t>::is_always_lock_free,
                "the sleeper count is read on the producers' hot path: it must not take a lock");

  /// One waiting thread's place: the word it parks on and its links in the stack of sleepers.
  /// Each thread has one (this_thread()); a thread announces itself on one event count at a
  /// time. Tests that announce several sleepers from one thread pass their own.
  struct alignas(kCacheLine) Waiter {
    std::atomic<uint32_t> word{0};  // bumped by the wake-up meant for this waiter
    // idle -> listed (prepare_wait) -> woken (a notify took it off the stack) -> idle (leave).
    // Changes away from `listed` are made under the event count's lock.
    enum State : uint32_t { idle, listed, woken };
    std::atomic<uint32_t> state{idle};
    // Wake-up syscalls naming `word` that notifiers have yet to make (they make them after
    // letting go of the lock). The waiter does not wait for them: one that comes late finds
    // the word already changed, or wakes a later wait of the same waiter spuriously (which
    // looks again). Only the waiter's end waits, so that no syscall names a word that is gone.
    std::atomic<uint32_t> inflight{0};
    Waiter() = default;
    Waiter(const Waiter&) = delete;
    Waiter& operator=(const Waiter&) = delete;
    ~Waiter() {
      while (inflight.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    }
    Waiter* older = nullptr;  // the stack's links, guarded by the event count's lock
    Waiter* newer = nullptr;
  };
  static Waiter& this_thread() noexcept {
    thread_local Waiter w;
    return w;
  }
  /// What prepare_wait() hands to wait() or cancel_wait().
  struct Ticket {
    Waiter* waiter;
    uint32_t word;  // the waiter's word before it announced itself
  };

  /// Announces `w` (the calling thread's by default) as a sleeper and returns the ticket to
  /// park with: on top of the stack, or at its bottom when `cold` (a waiter that was woken and
  /// found nothing to take has not worked since it last parked: the sleepers above it worked
  /// more recently, and stay first in line). Follow it with exactly one wait() or cancel_wait().
  Ticket prepare_wait(Waiter& w = this_thread(), bool cold = false) noexcept {
    // Read before announcing: a wake-up issued from here on changes the word, and the wait
    // does not sleep through it.
    const uint32_t word = w.word.load(std::memory_order_acquire);
    count_.fetch_add(kOneSleeper, std::memory_order_seq_cst);
    std::lock_guard<std::mutex> g(lock_);
    if (cold && bottom_ != nullptr) {
      w.newer = bottom_;
      w.older = nullptr;
      bottom_->older = &w;
      bottom_ = &w;
    } else {
      w.older = top_;
      w.newer = nullptr;
      if (top_ != nullptr) top_->newer = &w;
      top_ = &w;
      if (bottom_ == nullptr) bottom_ = &w;
    }
    w.state.store(Waiter::listed, std::memory_order_relaxed);
    return {&w, word};
  }
  /// Parks until notified (or spuriously, or after `timeout_ns` >= 0), then leaves.
  void wait(Ticket t, int64_t timeout_ns) noexcept {
    park_wait(t.waiter->word, t.word, timeout_ns);
    leave(*t.waiter);
  }
  /// Leaves without parking (the condition came true after prepare_wait()). True if a wake-up
  /// meant for this waiter came meanwhile: a waiter that then acts on what it found, rather
  /// than looking again, passes it on (notify(1)); await() does.
  bool cancel_wait(Ticket t) noexcept { return leave(*t.waiter); }

  /// Claims up to `n` spinners (each takes a piece of work in its spin, or looks for it
  /// before it parks), then wakes up to the rest of `n` announced sleepers, the most recently
  /// announced first, skipping those that already have a wake-up on its way: without that,
  /// every push made while a woken worker is still being scheduled pays a futex syscall for
  /// nobody, and producers slow to the syscall rate exactly when the consumers are behind.
  /// Returns how many spinners it claimed plus how many wake-ups it issued. Safe from any
  /// thread.
  std::size_t notify(std::size_t n) noexcept {
    return notify(n, [n] { return n; });
  }
  /// notify(n) for work that consumers may have taken already: `left()`, called only once a
  /// sleeper could be woken, says how much of it is still there to take (seq_cst), and no
  /// more sleepers than that are woken. A spinning consumer often takes a piece of work
  /// between its publication and the producer's notify: without this look, the producer then
  /// woke a parked consumer to find nothing (under a lone closed-loop client, one wake-up and
  /// one futex syscall per request). Skipping the wake-up loses none: work that is gone needs
  /// no taker, and work published later has a producer of its own that notifies.
  template <class Left>
  std::size_t notify(std::size_t n, Left&& left) noexcept {
    const std::size_t claimed = claim_spinners(n);
    if (claimed == n) return claimed;
    n -= claimed;
    const uint64_t s = count_.load(std::memory_order_seq_cst);  // the producer's half of the handshake
    if ((s & kWokenMask) >= (s >> kSleeperShift)) return claimed;  // none, or each has a wake-up in flight
    n = std::min<std::size_t>(n, left());
    if (n == 0) return claimed;
    // Announced but not on the stack yet (between its count and its lock): it looks at the
    // work after it takes the lock, so after this producer's work is visible; not woken here.
    std::size_t k = 0;
    while (k < n) {
      const std::size_t got = wake_top(n - k);
      k += got;
      if (got < kWakeChunk) break;  // the stack ran out (or n did)
    }
    return claimed + k;
  }
  /// Wakes every announced sleeper. For shutdown: a caller sets its stop flag first; a thread
  /// announced after this call sees it (it looks after taking the lock this call released).
  /// Safe from any thread.
  void notify_all() noexcept {
    while (wake_top(kWakeChunk) == kWakeChunk) {
    }
  }

  /// Spinners not claimed, for tests and diagnostics (a moment's view).
  uint32_t spinners() const noexcept { return spinners_.load(std::memory_order_relaxed); }
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
  /// after the waiter announced itself, so a waiter that notify_all() did not find on the
  /// stack sees it instead of sleeping through the stop.
  template <class SpinCheck, class Check, class Pending, class Stopping>
  Wait await(int64_t spin_ns, int64_t until_ns, SpinCheck&& spin_check, Check&& check,
             Pending&& pending, Stopping&& stopping) noexcept {
    if (spin_check()) return Wait::ready;
    if (spin_ns > 0) {
      int64_t spin_until = now_ns() + spin_ns;
      if (until_ns >= 0) spin_until = std::min(spin_until, until_ns);
      spinners_.fetch_add(1, std::memory_order_seq_cst);
      bool caught = false;
      do {
        for (int i = 0; i < 16; ++i) cpu_relax();
        caught = spin_check();
      } while (!caught && now_ns() < spin_until && !stopping());
      stop_spinning();
      if (caught) return Wait::ready;
      // Claimed or not, it looks (`check`) before it parks: what a claim was for is there.
    }
    bool parked = false;  // it parked, and woke (or timed out): if it finds nothing, it is cold
    for (;;) {
      if (stopping()) return check() ? Wait::ready : Wait::stopped;
      const Ticket ticket = prepare_wait(this_thread(), parked);
      if (check()) {
        // What it took was there before any wake-up addressed to it: one that came meanwhile
        // is for other work, and the sleeper it goes to now is the one that takes that.
        if (cancel_wait(ticket)) notify(1);
        return Wait::ready;
      }
      const bool on_its_way = pending();
      int64_t remaining = -1;
      if (until_ns >= 0) {
        remaining = until_ns - now_ns();
        if (remaining <= 0) {
          if (cancel_wait(ticket)) notify(1);  // passed on: this waiter takes nothing more
          return Wait::timeout;
        }
      }
      if (!on_its_way && !stopping()) {
        wait(ticket, remaining);
        parked = true;
      } else {
        (void)cancel_wait(ticket);  // kept: it looks again before it takes anything
      }
      // Unregistered, so notifies meanwhile skip the wake-up syscall; on a busy core the thread
      // we wait for (a producer between announcing and publishing) gets to run.
      if (on_its_way) std::this_thread::yield();
    }
  }

 private:
  static constexpr std::size_t kWakeChunk = 16;

  // Takes up to `n` unclaimed spinners off the count; returns how many. seq_cst: the work the
  // producer published comes before its claim, and a spinner that finds itself claimed looks
  // for work after its own seq_cst look at the count.
  std::size_t claim_spinners(std::size_t n) noexcept {
    uint32_t s = spinners_.load(std::memory_order_seq_cst);
    while (s != 0 && n != 0) {
      const uint32_t take = static_cast<uint32_t>(std::min<std::size_t>(s, n));
      if (spinners_.compare_exchange_weak(s, s - take, std::memory_order_seq_cst)) return take;
    }
    return 0;
  }
  // A spinner stops spinning: takes itself off the count as a producer's claim would, unless
  // producers claimed every spinner there was (the count is zero): then it is one of the claimed.
  void stop_spinning() noexcept { (void)claim_spinners(1); }

  // Takes up to min(n, kWakeChunk) sleepers off the top of the stack and wakes them (the
  // syscalls after the lock is let go). Returns how many.
  std::size_t wake_top(std::size_t n) noexcept {
    Waiter* picked[kWakeChunk];
    std::size_t k = 0;
    {
      std::lock_guard<std::mutex> g(lock_);
      while (k < n && k < kWakeChunk && top_ != nullptr) {
        Waiter* w = top_;
        unlink(*w);
        w->state.store(Waiter::woken, std::memory_order_relaxed);
        w->inflight.fetch_add(1, std::memory_order_relaxed);
        count_.fetch_add(1, std::memory_order_relaxed);
        w->word.fetch_add(1, std::memory_order_release);
        picked[k++] = w;
      }
    }
    for (std::size_t i = 0; i < k; ++i) {
      park_wake(picked[i]->word, 1);
      picked[i]->inflight.fetch_sub(1, std::memory_order_release);
    }
    return k;
  }
  // Takes `w` off the stack, wherever it is (lock held).
  void unlink(Waiter& w) noexcept {
    if (w.older != nullptr) w.older->newer = w.newer;
    if (w.newer != nullptr) w.newer->older = w.older;
    if (top_ == &w) top_ = w.older;
    if (bottom_ == &w) bottom_ = w.newer;
    w.older = w.newer = nullptr;
  }
  // A sleeper stops waiting (for any reason): off the stack if no wake-up took it off, and
  // the wake-up meant for it, if one came, taken with it (then true).
  bool leave(Waiter& w) noexcept {
    uint32_t st = w.state.load(std::memory_order_acquire);
    if (st == Waiter::listed) {
      std::lock_guard<std::mutex> g(lock_);
      st = w.state.load(std::memory_order_relaxed);
      if (st == Waiter::listed) {  // still on the stack: no wake-up came
        unlink(w);
        w.state.store(Waiter::idle, std::memory_order_relaxed);
        count_.fetch_sub(kOneSleeper, std::memory_order_relaxed);
        return false;
      }
    }
    // Woken: the wake-up meant for it goes with it.
    w.state.store(Waiter::idle, std::memory_order_relaxed);
    count_.fetch_sub(kOneSleeper + 1, std::memory_order_relaxed);
    return true;
  }

  std::atomic<uint64_t> count_{0};
  std::atomic<uint32_t> spinners_{0};  // in await()'s spin, not claimed by a producer
  std::mutex lock_;
  Waiter* top_ = nullptr;     // first in line to be woken; guarded by lock_
  Waiter* bottom_ = nullptr;  // last in line; guarded by lock_
};

}  // namespace apportion
