// Bounded multi-producer multi-consumer queue.
//
// A ring of sequence-numbered cells (the Vyukov bounded-queue scheme): a producer claims a slot by
// advancing `tail_` with a CAS, writes the item, then publishes it by storing the slot's sequence.
// A consumer does the mirror image on `head_`. No locks and no allocation after construction.
// Progress note: a producer or consumer preempted between its CAS and its sequence store delays
// the one thread that later wants that same cell; every other thread continues.
//
// Blocking: `pop_wait` spins briefly (answering in ~1 us while work keeps arriving), then parks on
// an event count with a futex, so an idle model costs no CPU that belongs to another model.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>

#include "apportion/parking.hpp"

namespace apportion {

/// Size of the unit of cache coherence. Fixed at 64 rather than
/// std::hardware_destructive_interference_size, whose value may change between compiler
/// versions and so is not ABI-stable.
inline constexpr std::size_t kCacheLine = 64;

enum class PopStatus : uint8_t { ok, timeout, closed };

template <class T>
class MpmcQueue {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "items are moved in and out of cells that cannot roll back a throwing move");
  static_assert(std::is_nothrow_destructible_v<T>, "items must be nothrow destructible");
  static_assert(std::is_default_constructible_v<T>, "try_pop fills a caller-made T");

 public:
  /// `capacity` is rounded up to a power of two (at least 2).
  explicit MpmcQueue(std::size_t capacity)
      : mask_(checked_mask(capacity)), cells_(std::make_unique<Cell[]>(mask_ + 1)) {
    for (std::size_t i = 0; i <= mask_; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  }

  MpmcQueue(const MpmcQueue&) = delete;
  MpmcQueue& operator=(const MpmcQueue&) = delete;

  /// Destroys the items still queued. Not safe while other threads use the queue.
  ~MpmcQueue() {
    T item;
    while (try_pop(item)) {
    }
  }

  /// Appends `value` unless the queue is full or closed. Safe from any thread; never blocks.
  /// On failure `value` is left untouched.
  bool try_push(T& value) noexcept { return emplace_impl(value); }
  bool try_push(T&& value) noexcept { return emplace_impl(value); }

  /// Removes the oldest item into `out`. Safe from any thread; never blocks.
  bool try_pop(T& out) noexcept {
    std::size_t pos = head_.load(std::memory_order_relaxed);
    Cell* cell;
    for (;;) {
      cell = &cells_[pos & mask_];
      // acquire: pairs with the producer's release store of `seq`, which published the item.
      const std::size_t seq = cell->seq.load(std::memory_order_acquire);
      const auto dif = static_cast<std::intptr_t>(seq) - static_cast<std::intptr_t>(pos + 1);
      if (dif == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
      } else if (dif < 0) {
        return false;  // empty
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
    T* slot = std::launder(reinterpret_cast<T*>(&cell->storage));
    out = std::move(*slot);
    slot->~T();
    // release: the producer that reuses this cell one lap later must see it emptied.
    cell->seq.store(pos + mask_ + 1, std::memory_order_release);
    return true;
  }

  /// Pops an item, waiting up to `timeout_ns` (< 0: forever). Spins `spin` rounds before parking.
  /// Returns `closed` only once the queue is closed *and* empty, so consumers drain it first.
  /// Safe from any thread.
  PopStatus pop_wait(T& out, int64_t timeout_ns, uint32_t spin = 256) noexcept {
    const int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
    for (;;) {
      if (try_pop(out)) return PopStatus::ok;
      for (uint32_t i = 0; i < spin; ++i) {
        cpu_relax();
        if ((i & 7) == 7 && try_pop(out)) return PopStatus::ok;
      }
      if (closed_.load(std::memory_order_acquire)) {
        return try_pop(out) ? PopStatus::ok : PopStatus::closed;
      }
      const uint32_t epoch = epoch_.load(std::memory_order_acquire);
      // Announce the sleeper, then look at tail_. Both are seq_cst, as are a producer's claim of
      // a slot (its CAS on tail_) and its later load of waiters_, so they fall in one total
      // order: either the claim comes after this announcement, and that producer sees the
      // sleeper and bumps the epoch (the futex wait below then returns at once), or it comes
      // before, and the load of tail_ below sees it. Never both missed.
      waiters_.fetch_add(kOneSleeper, std::memory_order_seq_cst);
      if (try_pop(out)) {
        leave_waiters();
        return PopStatus::ok;
      }
      // A slot claimed but not popped: its item is published or moments from it (the producer is
      // between its CAS and its sequence store), so look again instead of sleeping.
      const bool pending =
          tail_.load(std::memory_order_seq_cst) != head_.load(std::memory_order_relaxed);
      int64_t remaining = -1;
      if (deadline >= 0) {
        remaining = deadline - now_ns();
        if (remaining <= 0) {
          leave_waiters();
          return PopStatus::timeout;
        }
      }
      if (!pending && !closed_.load(std::memory_order_acquire)) {
        park_wait(epoch_, epoch, remaining);
      }
      leave_waiters();
      // Rare: a producer preempted between its claim and its publication. Yield (unregistered,
      // so pushes meanwhile skip the wake-up syscall) so that on a busy core it can finish.
      if (pending) std::this_thread::yield();
    }
  }

  /// Refuses further pushes and wakes every waiter; queued items stay poppable. A push that
  /// races with close() may still land: callers that need every item serialise the two (the
  /// engine does) or drain with try_pop afterwards. Idempotent; safe from any thread.
  void close() noexcept {
    closed_.store(true, std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_release);
    park_wake(epoch_);
  }

  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }

  /// Approximate number of items; exact only when no other thread is using the queue.
  std::size_t size_hint() const noexcept {
    const std::size_t tail = tail_.load(std::memory_order_relaxed);
    const std::size_t head = head_.load(std::memory_order_relaxed);
    return tail > head ? tail - head : 0;
  }

  std::size_t capacity() const noexcept { return mask_ + 1; }

 private:
  struct alignas(kCacheLine) Cell {
    std::atomic<std::size_t> seq{0};
    alignas(T) unsigned char storage[sizeof(T)];
  };
  static_assert(sizeof(Cell) % kCacheLine == 0, "adjacent cells must not share a cache line");

  // The limit is checked before bit_ceil (undefined when the result does not fit in size_t) and
  // before the allocation (which would otherwise fail first, with a less helpful bad_alloc).
  static std::size_t checked_mask(std::size_t capacity) {
    if (capacity > (std::size_t{1} << 40)) throw std::length_error("MpmcQueue capacity too large");
    return std::bit_ceil(capacity < 2 ? std::size_t{2} : capacity) - 1;
  }

  template <class U>
  bool emplace_impl(U& value) noexcept {
    if (closed_.load(std::memory_order_relaxed)) return false;
    std::size_t pos = tail_.load(std::memory_order_relaxed);
    Cell* cell;
    for (;;) {
      cell = &cells_[pos & mask_];
      const std::size_t seq = cell->seq.load(std::memory_order_acquire);
      const auto dif = static_cast<std::intptr_t>(seq) - static_cast<std::intptr_t>(pos);
      if (dif == 0) {
        // seq_cst: this claim is the producer's half of the sleeper handshake in pop_wait. A
        // locked instruction on x86 either way, so the strong order is free there, and it saves
        // a full fence per push (a third locked instruction per push+pop pair).
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
          break;
        }
      } else if (dif < 0) {
        return false;  // full
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
    ::new (static_cast<void*>(&cell->storage)) T(std::move(value));
    cell->seq.store(pos + 1, std::memory_order_release);
    notify_one();
    return true;
  }

  // Wakes one sleeper unless every sleeper already has a wake-up on its way. Without that
  // check, every push made while a woken consumer is still being scheduled (microseconds, far
  // longer on a loaded machine) pays a futex syscall for nobody, and the producer slows to the
  // syscall rate exactly when the consumer is behind.
  void notify_one() noexcept {
    // seq_cst, after the seq_cst claim of tail_ in emplace_impl: see pop_wait. No fence needed
    // (and none that ThreadSanitizer cannot model).
    uint64_t w = waiters_.load(std::memory_order_seq_cst);
    for (;;) {
      const uint64_t sleepers = w >> 32;
      const uint64_t woken = w & kWokenMask;
      if (woken >= sleepers) return;  // no sleepers, or each has a wake-up in flight
      if (waiters_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                         std::memory_order_relaxed)) {
        break;
      }
    }
    epoch_.fetch_add(1, std::memory_order_release);
    park_wake(epoch_, 1);
  }

  // A sleeper stops waiting (for any reason): it takes one in-flight wake-up with it, if there
  // is one. Wake-ups are not addressed, so the one taken may have been meant for another
  // sleeper; that only leaves `woken` too low, which costs a spare wake-up, never a missed one.
  // `woken <= sleepers` holds throughout, so a push never skips a sleeper nobody is waking.
  void leave_waiters() noexcept {
    uint64_t w = waiters_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t woken = w & kWokenMask;
      const uint64_t next = w - kOneSleeper - (woken != 0 ? 1 : 0);
      if (waiters_.compare_exchange_weak(w, next, std::memory_order_relaxed)) return;
    }
  }

  const std::size_t mask_;
  std::unique_ptr<Cell[]> cells_;
  // Consumers hammer head_, producers tail_: separate lines so they do not invalidate each other.
  alignas(kCacheLine) std::atomic<std::size_t> head_{0};
  alignas(kCacheLine) std::atomic<std::size_t> tail_{0};
  alignas(kCacheLine) std::atomic<uint32_t> epoch_{0};
  // Sleepers in the high half, wake-ups issued to them and not yet taken in the low half; one
  // word so that "is anyone asleep that no wake-up is heading for?" is one atomic read.
  static constexpr uint64_t kOneSleeper = uint64_t{1} << 32;
  static constexpr uint64_t kWokenMask = kOneSleeper - 1;
  std::atomic<uint64_t> waiters_{0};
  std::atomic<bool> closed_{false};
};

}  // namespace apportion
