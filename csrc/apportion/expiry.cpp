#include "apportion/expiry.hpp"

#include <utility>

namespace apportion {

void ExpiryHeap::add(Request* r) {
  r->add_ref();
  std::lock_guard lock(mu_);
  heap_.push_back(r);
  place(heap_.size() - 1, r);
  sift_up(heap_.size() - 1);
  if (r->deadline_ns < wakes_at_) {
    wakes_at_ = r->deadline_ns;  // the timer looks again now: later ones need not wake it
    ++wakeups_;
    cv_.notify_one();
  }
}

void ExpiryHeap::remove(Request* r) noexcept {
  {
    std::lock_guard lock(mu_);
    const int64_t i = r->heap_index;
    if (i < 0 || static_cast<std::size_t>(i) >= heap_.size() || heap_[static_cast<std::size_t>(i)] != r) return;
    erase_at(static_cast<std::size_t>(i));
  }
  Request::release(r);  // not the last reference: the completer holds one
}

void ExpiryHeap::stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
}

std::size_t ExpiryHeap::size() const {
  std::lock_guard lock(mu_);
  return heap_.size();
}

uint64_t ExpiryHeap::wakeups() const {
  std::lock_guard lock(mu_);
  return wakeups_;
}

std::vector<Request*> ExpiryHeap::drain() {
  std::lock_guard lock(mu_);
  for (Request* r : heap_) r->heap_index = -1;
  return std::exchange(heap_, {});
}

void ExpiryHeap::sift_up(std::size_t i) noexcept {
  Request* r = heap_[i];
  while (i > 0) {
    const std::size_t parent = (i - 1) / 2;
    if (heap_[parent]->deadline_ns <= r->deadline_ns) break;
    place(i, heap_[parent]);
    i = parent;
  }
  place(i, r);
}

void ExpiryHeap::sift_down(std::size_t i) noexcept {
  Request* r = heap_[i];
  const std::size_t n = heap_.size();
  for (;;) {
    std::size_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && heap_[child + 1]->deadline_ns < heap_[child]->deadline_ns) ++child;
    if (r->deadline_ns <= heap_[child]->deadline_ns) break;
    place(i, heap_[child]);
    i = child;
  }
  place(i, r);
}

void ExpiryHeap::erase_at(std::size_t i) noexcept {
  Request* gone = heap_[i];
  gone->heap_index = -1;
  Request* last = heap_.back();
  heap_.pop_back();
  if (i == heap_.size()) return;
  place(i, last);
  if (i > 0 && heap_[(i - 1) / 2]->deadline_ns > last->deadline_ns) {
    sift_up(i);
  } else {
    sift_down(i);
  }
}

}  // namespace apportion
