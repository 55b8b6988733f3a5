#include "apportion/batcher.hpp"

#include <algorithm>

namespace apportion {

int64_t batch_estimate_ns(const std::vector<int64_t>& cost_ns, std::size_t n) noexcept {
  const std::size_t known = cost_ns.size();
  if (n < known && cost_ns[n] > 0) return cost_ns[n];
  // Scaling a smaller size up linearly over-estimates (a call has fixed costs): when in doubt
  // a request is kept out of a batch rather than put in one that finishes too late.
  for (std::size_t k = std::min(n, known); k-- > 1;) {
    if (cost_ns[k] > 0) return cost_ns[k] / static_cast<int64_t>(k) * static_cast<int64_t>(n);
  }
  for (std::size_t k = n + 1; k < known; ++k) {
    if (cost_ns[k] > 0) return cost_ns[k];
  }
  return 0;
}

void batch_observe(std::vector<int64_t>& cost_ns, std::size_t n, int64_t ns, bool replace) noexcept {
  if (n >= cost_ns.size()) return;
  ns = std::max<int64_t>(ns, 1);
  int64_t& e = cost_ns[n];
  if (replace) {
    e = ns;
    return;
  }
  // EWMA, weight 1/4 upwards: follows a machine that gets busier within a few calls without
  // letting one slow outlier decide alone. Weight 1/2 downwards: an estimate that is too high
  // keeps requests from running, so it is corrected by fewer calls (see Batcher::offer).
  if (e == 0) {
    e = ns;
  } else if (ns < e) {
    e -= (e - ns) / 2;
  } else {
    e += (ns - e) / 4;
  }
}

Batcher::Batcher(const BatchingOptions& opt, const std::vector<int64_t>& cost_ns)
    : opt_(opt), cost_ns_(cost_ns) {
  batch_.reserve(opt.max_size);
  claimed_.reserve(opt.max_size);
  gap_ns_.assign(opt.max_size + 1, -1);
}

bool Batcher::estimate_stale(int64_t now, int64_t estimate) const noexcept {
  return opened_any_ && now - opened_ > kProbeAfterEstimates * estimate;
}

Batcher::Fit Batcher::offer(Request* r, int64_t deadline, int64_t now) {
  if (dry_) {
    // An arrival, whatever becomes of it. Submitted before the worker looked (still being
    // pushed, or in a lane it had not reached): no gap at all.
    dry_ = false;
    const int64_t gap = std::min(std::max<int64_t>(r->submit_ns - dry_at_, 0), opt_.max_delay_ns);
    int64_t& e = gap_ns_[dry_size_];  // dry_size_ < max_size: a full batch is never open
    e = e < 0 ? gap : e + (gap - e) / 8;
  }
  if (deadline != Request::kNoDeadline) {
    const int64_t one = batch_estimate_ns(cost_ns_, 1);
    // Hopeless by an estimate that only calls can correct: once no batch has opened for a
    // while, the next request runs anyway and re-measures (see kProbeAfterEstimates).
    if (deadline < now + one) {
      if (!estimate_stale(now, one)) return Fit::hopeless;
      probe_ = true;
    }
  }
  const int64_t limit = std::min(deadline, min_deadline_);
  if (!batch_.empty() && limit != Request::kNoDeadline &&
      limit < now + batch_estimate_ns(cost_ns_, batch_.size() + 1)) {
    return Fit::next_batch;
  }
  if (batch_.empty()) {
    opened_ = now;
    opened_any_ = true;
  }
  batch_.push_back(r);  // reserved: never allocates
  min_deadline_ = limit;
  return batch_.size() >= opt_.max_size ? Fit::full : Fit::joined;
}

bool Batcher::preferred(std::size_t n) const noexcept {
  return std::binary_search(opt_.preferred_sizes.begin(), opt_.preferred_sizes.end(), n);
}

bool Batcher::dispatch_now(bool stopping, bool sibling_idle) const noexcept {
  return stopping || sibling_idle || preferred(batch_.size()) || !waiting_pays();
}

bool Batcher::waiting_pays() const noexcept {
  const std::size_t n = batch_.size();
  const int64_t one = batch_estimate_ns(cost_ns_, 1), now = batch_estimate_ns(cost_ns_, n),
                more = batch_estimate_ns(cost_ns_, n + 1);
  const int64_t gap = arrival_gap_ns(n);
  if (gap < 0 || one == 0 || now == 0 || more == 0) return true;
  // Each of the n requests in hand waits the gap too: the wait pays only if the worker time
  // saved exceeds the time it costs them all. (Divided, not multiplied: a gap of up to
  // max_delay times up to max_size requests can overflow.)
  return gap < opt_.max_delay_ns && gap < (now + one - more) / static_cast<int64_t>(n);
}

int64_t Batcher::wait_until() const noexcept {
  const int64_t by_deadline =
      min_deadline_ == Request::kNoDeadline
          ? Request::kNoDeadline
          : min_deadline_ - batch_estimate_ns(cost_ns_, batch_.size() + 1);
  return std::min(opened_ + opt_.max_delay_ns, by_deadline);
}

}  // namespace apportion
