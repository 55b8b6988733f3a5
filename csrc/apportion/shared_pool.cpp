#include "apportion/shared_pool.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace apportion {

namespace {

// Charged up front for a member whose calls were never measured: small, so an unknown model
// is not held back, and corrected at the release.
constexpr int64_t kFirstEstimateNs = 1'000;

}  // namespace

std::shared_ptr<SharedPool::Member> SharedPool::join(std::string name, double weight,
                                                     int32_t priority_class) {
  if (!(weight > 0.0) || !std::isfinite(weight)) {
    throw std::invalid_argument("model '" + name + "': weight must be a positive, finite number");
  }
  std::shared_ptr<Member> m(new Member(std::move(name), weight, priority_class));
  std::lock_guard lock(mu_);
  m->vtime_ = vnow_;
  return m;
}

void SharedPool::set_class(Member& m, int32_t priority_class) {
  std::lock_guard lock(mu_);
  if (!reserve_.empty()) {
    throw std::invalid_argument("model '" + m.name_ + "': its priority class cannot change while the pool has "
                                "class reservations (a worker's OS priority follows its class from its start)");
  }
  if (m.priority_class_.load(std::memory_order_relaxed) == priority_class) return;
  m.priority_class_.store(priority_class, std::memory_order_relaxed);
  // Its clock was kept against another class's members: from now on it competes with these.
  // The pool's clock runs with the calls granted, mostly the top class's, so a class below
  // it whose members wait keeps clocks behind it: the member starts level with the one of
  // them furthest behind (moved down, it would else wait until they all caught up with the
  // pool's clock; moved up, it banks nothing it did not wait for beside them). With none of
  // them waiting, it starts from the pool's clock, as a member back from idle does.
  const Member* behind = nullptr;
  for (const Waiter* w : waiters_) {
    if (w->member != &m && w->member->priority_class_.load(std::memory_order_relaxed) == priority_class &&
        (behind == nullptr || w->member->vtime_ < behind->vtime_)) {
      behind = w->member;
    }
  }
  if (behind != nullptr) {
    m.vtime_ = behind->vtime_;
  } else {
    const int64_t est = m.estimate_ns_ > 0 ? m.estimate_ns_ : kFirstEstimateNs;
    m.vtime_ = std::max(m.vtime_, vnow_ - static_cast<double>(est) / m.weight_);
  }
  grant_waiters();  // a waiter of a raised class may go first now
}

void SharedPool::set_capacity(uint32_t capacity) {
  std::lock_guard lock(mu_);
  // Units held stay held: after a shrink nothing is free until enough of them come back.
  capacity_ = capacity;
  grant_waiters();
}

uint32_t SharedPool::capacity() const {
  std::lock_guard lock(mu_);
  return capacity_;
}

void SharedPool::set_reserve(std::vector<Reservation> reserve, int nice) {
  for (std::size_t i = 0; i < reserve.size(); ++i) {
    if (reserve[i].units == 0) {
      throw std::invalid_argument("pool reservation for priority class " +
                                  std::to_string(reserve[i].priority_class) + ": units must be >= 1");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (reserve[j].priority_class == reserve[i].priority_class) {
        throw std::invalid_argument("pool reservation: priority class " +
                                    std::to_string(reserve[i].priority_class) + " given twice");
      }
    }
  }
  if (!reserve.empty() && (nice < 1 || nice > 19)) {
    throw std::invalid_argument("pool reservation: nice must be in 1..19, got " + std::to_string(nice));
  }
  std::lock_guard lock(mu_);
  reserve_ = std::move(reserve);
  reserve_nice_ = reserve_.empty() ? 0 : nice;
  grant_waiters();  // a larger headroom may let a waiter in now
}

uint32_t SharedPool::headroom_locked(int32_t priority_class) const noexcept {
  uint32_t h = 0;
  for (const Reservation& r : reserve_) {
    if (r.priority_class <= priority_class) h = std::max(h, r.units);
  }
  return h;
}

uint32_t SharedPool::headroom(int32_t priority_class) const {
  std::lock_guard lock(mu_);
  return headroom_locked(priority_class);
}

int SharedPool::nice_for(int32_t priority_class) const {
  std::lock_guard lock(mu_);
  for (const Reservation& r : reserve_) {
    if (r.priority_class > priority_class) return reserve_nice_;
  }
  return 0;
}

bool SharedPool::fits(const Member& m, uint32_t units) const noexcept {
  if (capacity_ == 0) return false;  // no pool yet: nobody runs, reserved or not
  return static_cast<uint64_t>(held_) + units <=
         static_cast<uint64_t>(capacity_) + headroom_locked(m.priority_class_.load(std::memory_order_relaxed));
}

uint32_t SharedPool::clamp(uint32_t units) const noexcept {
  return std::clamp<uint32_t>(units, 1, std::max<uint32_t>(capacity_, 1));
}

void SharedPool::activate(Member& m) noexcept {
  // Back from idle: start from (about) now, not from where it stopped, or a model that sat
  // idle would then hold the pool alone until its clock caught up. The slack of one of its
  // own calls keeps a model that was idle only for the moment between two calls (its worker
  // preempted on the way back to the pool) from losing its place.
  if (m.active_++ == 0) {
    const int64_t est = m.estimate_ns_ > 0 ? m.estimate_ns_ : kFirstEstimateNs;
    m.vtime_ = std::max(m.vtime_, vnow_ - static_cast<double>(est) / m.weight_);
  }
}

bool SharedPool::better(const Member& a, uint64_t a_seq, const Member& b, uint64_t b_seq) noexcept {
  const int32_t ca = a.priority_class_.load(std::memory_order_relaxed);
  const int32_t cb = b.priority_class_.load(std::memory_order_relaxed);
  if (ca != cb) return ca > cb;
  if (a.vtime_ != b.vtime_) return a.vtime_ < b.vtime_;
  return a_seq < b_seq;
}

void SharedPool::charge(Member& m, uint32_t units) noexcept {
  // Start-time fair queuing: the call starts at the member's clock, which advances by its
  // expected cost now; release() corrects it by what the call really cost.
  vnow_ = std::max(vnow_, m.vtime_);
  const int64_t est = m.estimate_ns_ > 0 ? m.estimate_ns_ : kFirstEstimateNs;
  m.vtime_ += static_cast<double>(est) * units / m.weight_;
  held_ += units;
  ++m.grants_;
}

uint32_t SharedPool::try_acquire(Member& m, uint32_t units) {
  std::lock_guard lock(mu_);
  units = clamp(units);
  if (!fits(m, units)) return 0;
  // Someone already waiting goes first unless this one outranks them all: it must also not
  // be behind on its share, or a member that never waits would take every free slot.
  activate(m);
  for (const Waiter* w : waiters_) {
    if (!better(m, next_seq_, *w->member, w->seq)) {
      --m.active_;
      return 0;
    }
  }
  charge(m, units);
  return units;
}

uint32_t SharedPool::acquire(Member& m, uint32_t units, const std::function<void()>& before_wait) {
  std::unique_lock lock(mu_);
  if (m.withdrawn_) return 0;
  units = clamp(units);
  activate(m);
  return wait_in_line(lock, m, units, before_wait);
}

uint32_t SharedPool::wait_in_line(std::unique_lock<std::mutex>& lock, Member& m, uint32_t units,
                                  const std::function<void()>& before_wait) {
  Waiter w{&m, units, next_seq_++};
  waiters_.push_back(&w);
  grant_waiters();
  if (!w.granted && before_wait) {
    // In line already (the member counts as waiting throughout), so the caller may let go of
    // what it holds (the GIL) without a moment in which its model looks idle.
    lock.unlock();
    before_wait();
    lock.lock();
  }
  // The granter sets `granted` and notifies under the mutex: this frame cannot be gone when
  // it does.
  w.cv.wait(lock, [&] { return w.granted; });
  return w.units;
}

void SharedPool::settle(Member& m, uint32_t units, int64_t cost_ns) noexcept {
  const int64_t charged = m.estimate_ns_ > 0 ? m.estimate_ns_ : kFirstEstimateNs;
  cost_ns = std::max<int64_t>(cost_ns, 0);
  if (cost_ns > 0) {
    m.vtime_ += static_cast<double>(cost_ns - charged) * units / m.weight_;
    // EWMA with weight 1/4, as the batch cost estimate: follows a model whose calls change
    // within a few calls without letting one outlier decide.
    m.estimate_ns_ = m.estimate_ns_ == 0 ? cost_ns : m.estimate_ns_ + (cost_ns - m.estimate_ns_) / 4;
    m.busy_unit_ns_ += static_cast<uint64_t>(cost_ns) * units;
  } else {
    m.vtime_ -= static_cast<double>(charged) * units / m.weight_;  // nothing ran: refund
    if (m.grants_ > 0) --m.grants_;
  }
  --m.active_;
  held_ -= std::min(held_, units);
}

void SharedPool::release(Member& m, uint32_t units, int64_t cost_ns) {
  std::lock_guard lock(mu_);
  settle(m, units, cost_ns);
  grant_waiters();
}

uint32_t SharedPool::renew(Member& m, uint32_t units, int64_t cost_ns, bool wait,
                           const std::function<void()>& before_wait) {
  std::unique_lock lock(mu_);
  settle(m, units, cost_ns);
  if (m.withdrawn_) {
    grant_waiters();
    return 0;
  }
  units = clamp(units);
  ++m.active_;  // never idle in between: no rejoin at the pool's clock
  bool best = fits(m, units);
  for (auto it = waiters_.begin(); best && it != waiters_.end(); ++it) {
    best = better(m, next_seq_, *(*it)->member, (*it)->seq);
  }
  if (best) {
    charge(m, units);
    return units;
  }
  if (!wait) {
    --m.active_;
    grant_waiters();
    return 0;
  }
  // Queued in the same critical section: the member never looks idle in between.
  return wait_in_line(lock, m, units, before_wait);
}

void SharedPool::withdraw(Member& m) {
  std::lock_guard lock(mu_);
  m.withdrawn_ = true;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    Waiter& w = **it;
    if (w.member != &m) {
      ++it;
      continue;
    }
    it = waiters_.erase(it);
    --m.active_;
    w.units = 0;
    w.granted = true;  // wakes it, with nothing held (notified under the mutex, as a grant)
    w.cv.notify_one();
  }
  grant_waiters();  // whoever waited behind it may go now
}

void SharedPool::grant_waiters() noexcept {
  while (!waiters_.empty() && capacity_ > 0) {
    auto best = waiters_.begin();
    for (auto it = std::next(best); it != waiters_.end(); ++it) {
      if (better(*(*it)->member, (*it)->seq, *(*best)->member, (*best)->seq)) best = it;
    }
    Waiter& w = **best;
    // A shrink may leave a waiter asking for more than the whole pool: it gets what there is.
    w.units = clamp(w.units);
    // The best waits for more to come free (or, below a reservation, for units within the
    // capacity); nobody jumps it.
    if (!fits(*w.member, w.units)) return;
    charge(*w.member, w.units);
    waiters_.erase(best);
    w.granted = true;
    w.cv.notify_one();
  }
}

SharedPool::MemberStats SharedPool::stats(const Member& m) const {
  std::lock_guard lock(mu_);
  return {m.grants_, m.busy_unit_ns_};
}

std::size_t SharedPool::waiting() const {
  std::lock_guard lock(mu_);
  return waiters_.size();
}

}  // namespace apportion
