// Prompt expiry: queued requests complete with `expired` within about a millisecond of their
// deadline even while every worker is busy in a long call, instead of when a worker reaches
// them. One timer thread per model (models with on_timeout=reject) and a min-heap of the
// requests that have a deadline and are not complete.
//
// The heap holds a reference to each request in it. A request leaves it when it completes
// (Model::complete removes it, on the completing thread) or when its deadline passes (the timer
// pops it, then claims it: a request already running or completed is left to its owner and the
// timer's reference goes back through the handler, which knows what releasing needs, e.g. the
// GIL). So the heap never holds more than the model's queued and running requests: a completed
// request, and its result, are never kept alive until their deadline.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "apportion/request.hpp"

namespace apportion {

class ExpiryHeap {
 public:
  /// The longest single wait of the timer (it looks at the clock again after it).
  static constexpr int64_t kMaxWaitNs = int64_t{3600} * 1'000'000'000;

  /// Adds `r` (deadline set) and takes a reference to it. Wakes the timer only if `r` is due
  /// before the timer's next wake-up: requests of one timeout submitted one after another
  /// (each due after the one before) wake it once per timeout, not once each (a wake-up and a
  /// second wait cost the submitting thread a futex call and the machine a context switch).
  void add(Request* r);
  /// Takes `r` out if it is in (then drops the heap's reference; never the last one: its
  /// completer holds one). Called by Model::complete.
  void remove(Request* r) noexcept;
  /// The timer's loop: pops every request whose deadline passed and hands them to
  /// `expire(due, now)` together (a std::vector<Request*>&; `expire` owns the heap's reference
  /// to each from then on), until stop(). Together: whatever expiring needs per batch (the
  /// GIL) is taken once for requests that share a deadline, not once each, so the last of a
  /// burst is not late by the others' hand-offs. Never holds the heap's lock while `expire`
  /// runs.
  template <class Expire>
  void run(Expire&& expire);
  void stop();
  /// Requests still in (tests, and a last sweep after the workers are gone).
  std::size_t size() const;
  /// Times add() woke the timer (tests).
  uint64_t wakeups() const;
  /// Removes and returns everything left (the caller owns those references).
  std::vector<Request*> drain();

 private:
  void sift_up(std::size_t i) noexcept;
  void sift_down(std::size_t i) noexcept;
  void erase_at(std::size_t i) noexcept;
  void place(std::size_t i, Request* r) noexcept {
    heap_[i] = r;
    r->heap_index = static_cast<int64_t>(i);
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Request*> heap_;
  /// When the timer looks at the heap next: the deadline it waits for (kept while the heap
  /// empties, and waited for even then: it wakes at it, finds what came since and waits
  /// again), or kNoDeadline while it waits for a notify.
  int64_t wakes_at_ = Request::kNoDeadline;
  uint64_t wakeups_ = 0;
  bool stop_ = false;
};

template <class Expire>
void ExpiryHeap::run(Expire&& expire) {
  std::vector<Request*> due;
  std::unique_lock lock(mu_);
  while (!stop_) {
    if (heap_.empty()) {
      // Until the deadline it last woke for, though that request completed: requests of its
      // timeout submitted since are due after it and have not woken this thread (a round
      // trip completes before the timer looks: waiting for a notify here made every one wake
      // it again).
      const int64_t now = now_ns();
      if (wakes_at_ != Request::kNoDeadline && wakes_at_ > now) {
        cv_.wait_for(lock, std::chrono::nanoseconds(std::min<int64_t>(wakes_at_ - now, kMaxWaitNs)));
      } else {
        wakes_at_ = Request::kNoDeadline;
        cv_.wait(lock);
      }
      continue;
    }
    const int64_t deadline = heap_.front()->deadline_ns, now = now_ns();
    if (deadline > now) {
      // At most an hour at a time: a deadline near INT64_MAX overflowed the clock's time point,
      // so the wait returned at once and this thread spun holding the lock (stop() waited).
      const int64_t wait = std::min<int64_t>(deadline - now, kMaxWaitNs);
      wakes_at_ = now + wait;
      cv_.wait_for(lock, std::chrono::nanoseconds(wait));
      continue;
    }
    while (!heap_.empty() && heap_.front()->deadline_ns <= now) {
      due.push_back(heap_.front());
      erase_at(0);
    }
    lock.unlock();
    expire(due, now);
    due.clear();
    lock.lock();
  }
}

}  // namespace apportion
