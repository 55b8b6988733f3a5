// A request's lifecycle, independent of what it carries.
//
// Exactly-once completion rests on one rule: a request leaves `queued` through a single CAS, and
// whoever wins it (a worker starting it, a worker expiring it, a caller cancelling it, a shutdown
// cancelling it) is the only party that may complete it. Completion publishes `done` last.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "apportion/mpmc_queue.hpp"
#include "apportion/cpu_idle.hpp"
#include "apportion/parking.hpp"

namespace apportion {

enum class Outcome : uint8_t { pending = 0, ok, error, rejected, expired, cancelled };

enum class RequestState : uint32_t {
  queued = 0,   // in a queue; may be claimed by exactly one party
  running = 1,  // a worker is executing the model for it
  claimed = 2,  // completed without running (expiry or cancellation in progress)
  done = 3,     // outcome and payload published; terminal
};

/// Per-model outcome counters. Shared (by shared_ptr) between a model and its requests so a
/// request can be cancelled and counted after its model was removed.
struct ModelCounters {
  explicit ModelCounters(std::string model_name) : name(std::move(model_name)) {}
  const std::string name;
  // Submitters and workers write different groups: keep them on different cache lines.
  alignas(kCacheLine) std::atomic<uint64_t> submitted{0};
  std::atomic<uint64_t> rejected{0};
  /// Queued cells whose requests were settled while queued (expired by the timer, cancelled)
  /// and gave their admission slot back before a worker popped them (see Model::claim_queued).
  /// Read by every admission: on the submitters' line.
  std::atomic<std::size_t> returned{0};
  /// How many such cells the model's lanes have room for beyond its admission bound: the
  /// bound on `returned`. Set before the model takes requests.
  std::size_t spare_cells = 0;
  alignas(kCacheLine) std::atomic<uint64_t> completed{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> expired{0};
  std::atomic<uint64_t> cancelled{0};
  /// Admission::deadline only (`track_held`, set before the model takes requests): requests
  /// workers have taken and not completed yet (in a forming batch, waiting for the shared
  /// pool, running), which a new request waits behind as much as the queued ones.
  std::atomic<std::size_t> held{0};
  bool track_held = false;
  /// Admission::deadline only: how far requests have been completing (or expiring) past the
  /// time admission estimated for them (Request::eta_ns), smoothed; ns, >= 0. It rises half
  /// way towards each late request's overrun at once and decays by 1/32 with each request in
  /// time. Admission adds it to its estimate: what stretches calls after admission (another
  /// process taking the CPUs, the hypervisor taking the vCPUs) shows nowhere else.
  std::atomic<int64_t> overrun_ns{0};

  void note_overrun(int64_t late_ns) noexcept {
    // Workers race here: one may drop another's sample, never tear one.
    const int64_t ov = overrun_ns.load(std::memory_order_relaxed);
    overrun_ns.store(late_ns > ov ? ov + (late_ns - ov) / 2 : ov - ov / 32, std::memory_order_relaxed);
  }

  void count(Outcome o) noexcept {
    switch (o) {
      case Outcome::ok: completed.fetch_add(1, std::memory_order_relaxed); break;
      case Outcome::error: failed.fetch_add(1, std::memory_order_relaxed); break;
      case Outcome::rejected: rejected.fetch_add(1, std::memory_order_relaxed); break;
      case Outcome::expired: expired.fetch_add(1, std::memory_order_relaxed); break;
      case Outcome::cancelled: cancelled.fetch_add(1, std::memory_order_relaxed); break;
      case Outcome::pending: break;
    }
  }
};

class ExpiryHeap;

/// Base of every request. Intrusively reference counted; the payload lives in a subclass.
class Request {
 public:
  static constexpr int64_t kNoDeadline = std::numeric_limits<int64_t>::max();

  Request() = default;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  virtual ~Request() = default;

  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }

  /// Drops one reference, destroying the request on the last. Safe from any thread, but the
  /// subclass decides whether destruction needs more (a Python payload needs the GIL).
  static void release(Request* r) noexcept {
    // acq_rel: the destroying thread must see every write made by the other owners.
    if (r->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete r;
  }

  RequestState state() const noexcept {
    return static_cast<RequestState>(state_.load(std::memory_order_acquire));
  }
  bool done() const noexcept { return state() == RequestState::done; }

  /// Takes the request out of `queued` into `to` (running or claimed). True for exactly one
  /// caller over the request's life. Safe from any thread.
  bool try_claim(RequestState to) noexcept {
    auto expected = static_cast<uint32_t>(RequestState::queued);
    return state_.compare_exchange_strong(expected, static_cast<uint32_t>(to),
                                          std::memory_order_acq_rel, std::memory_order_acquire);
  }

  /// Publishes the outcome and wakes waiters. Only the claim winner calls it, once, after the
  /// payload (result or error) is stored: the release store makes that payload visible to
  /// every thread that later observes `done`.
  void publish(Outcome o) noexcept {
    outcome_ = o;
    state_.store(static_cast<uint32_t>(RequestState::done), std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_seq_cst) != 0) park_wake(state_);
  }

  /// Waits until done, at most `timeout_ns` (< 0: forever). Polls for up to `spin_ns` first
  /// (bounded by the timeout): a result that arrives within microseconds is picked up without
  /// a futex round trip. Safe from any thread.
  bool wait_done(int64_t timeout_ns, int64_t spin_ns = 50'000) noexcept {
    if (done()) return true;
    if (timeout_ns >= 0 && spin_ns > timeout_ns) spin_ns = timeout_ns;
    if (spin_ns > 0) {
      // A spin pays only while the worker runs on another CPU: on this one, it cannot run
      // until we stop. A busy host puts both on the one CPU left, hand-off after hand-off
      // (kColocatedStreak of them in a row: stop spinning).
      // Nor while no worker has started it yet with no CPU idle: the worker woken for it
      // waits for a CPU, and this spin holds one (measured beside one busy loop on 2 CPUs,
      // a no-op round trip: ~70 us spinning the whole budget, the worker getting a CPU only
      // once the spin ended).
      thread_local uint32_t colocated = 0;
      const int me = current_cpu();
      bool seen = false, looked = false;
      const int64_t start = now_ns(), until = start + spin_ns;
      int64_t now = start;
      do {
        for (int i = 0; i < 16; ++i) cpu_relax();
        if (done()) break;
        if (!seen && me >= 0 && worker_cpu.load(std::memory_order_relaxed) == me) {
          seen = true;
          if (++colocated >= kColocatedStreak && !other_cpu_idle(me)) break;
        }
        now = now_ns();
        if (!looked && now - start >= kUnstartedSpinNs && state() == RequestState::queued) {
          looked = true;
          if (me >= 0 && !other_cpu_idle(me)) break;
        }
      } while (now < until);
      if (!seen) colocated = 0;
      if (done()) return true;
    }
    const int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
    for (;;) {
      // seq_cst pairs with publish(): either it sees waiters_ > 0 and wakes us, or we see done.
      waiters_.fetch_add(1, std::memory_order_seq_cst);
      const uint32_t s = state_.load(std::memory_order_seq_cst);
      if (s == static_cast<uint32_t>(RequestState::done)) {
        waiters_.fetch_sub(1, std::memory_order_relaxed);
        return true;
      }
      int64_t remaining = -1;
      if (deadline >= 0) {
        remaining = deadline - now_ns();
        if (remaining <= 0) {
          waiters_.fetch_sub(1, std::memory_order_relaxed);
          return done();
        }
      }
      park_wait(state_, s, remaining);
      waiters_.fetch_sub(1, std::memory_order_relaxed);
      if (done()) return true;
    }
  }

  /// Meaningful once done() is true.
  Outcome outcome() const noexcept { return outcome_; }

  // Written by the submitter before the request is published to a queue (the queue's release
  // store orders them), read by the claim winner afterwards.
  int64_t submit_ns = 0;
  int64_t deadline_ns = kNoDeadline;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  uint32_t priority = 0;
  /// Admission::deadline: when admission expected it to complete (0: no estimate yet). Its
  /// completion's overrun of this feeds ModelCounters::overrun_ns.
  int64_t eta_ns = 0;
  /// The CPU the submitter ran on at admission (-1: unknown); written with the fields above.
  int32_t submit_cpu = -1;
  /// The CPU of the worker running it, set only when that is the submitter's CPU (-1:
  /// otherwise, or not running yet). A waiter's spin reads it.
  std::atomic<int32_t> worker_cpu{-1};
  /// Where this request sits in its model's expiry heap (-1: not in it); guarded by the heap.
  int64_t heap_index = -1;
  /// The expiry heap holding it (models with prompt expiry); set before it is queued.
  std::shared_ptr<ExpiryHeap> expiry;
  /// Whether it holds an admission slot while it sits in a lane: set when it is pushed;
  /// whoever clears it first, the worker that pops it or a thread that settles it while it is
  /// queued (expiry timer, cancel), gives the slot back (see Model::claim_queued).
  std::atomic<bool> counted{false};
  /// Counted in ModelCounters::held (see there): set by the worker that takes it, cleared
  /// by whoever completes it.
  std::atomic<bool> held{false};
  /// The lane group to queue into on a model with groups; out of range (the default): the
  /// engine routes it by the submitting CPU.
  uint32_t group = UINT32_MAX;
  std::shared_ptr<ModelCounters> counters;

 private:
  std::atomic<uint32_t> refs_{1};
  std::atomic<uint32_t> state_{static_cast<uint32_t>(RequestState::queued)};
  std::atomic<uint32_t> waiters_{0};
  Outcome outcome_ = Outcome::pending;  // ordered by state_'s store/load
};

/// Owning pointer to a Request subclass (adds no reference on adoption).
template <class T>
class Ref {
 public:
  Ref() = default;
  explicit Ref(T* p) noexcept : p_(p) {}  // adopts one reference
  Ref(const Ref& o) noexcept : p_(o.p_) {
    if (p_) p_->add_ref();
  }
  Ref(Ref&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  Ref& operator=(Ref o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~Ref() {
    if (p_) Request::release(p_);
  }
  T* get() const noexcept { return p_; }
  T* operator->() const noexcept { return p_; }
  T& operator*() const noexcept { return *p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  T* detach() noexcept { return std::exchange(p_, nullptr); }

 private:
  T* p_ = nullptr;
};

}  // namespace apportion
