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

void batch_observe(std::vector<int64_t>& cost_ns, std::size_t n, int64_t ns) noexcept {
  if (n >= cost_ns.size()) return;
  ns = std::max<int64_t>(ns, 1);
  int64_t& e = cost_ns[n];
  // EWMA with weight 1/4: follows a model that warms up or a machine that gets busier within
  // a few calls, without letting one outlier decide alone.
  e = e == 0 ? ns : e + (ns - e) / 4;
}

void batch_forget(std::vector<int64_t>& cost_ns) noexcept {
  for (int64_t& e : cost_ns) {
    if (e > 1) e /= 2;
  }
}

Batcher::Batcher(const BatchingOptions& opt, const std::vector<int64_t>& cost_ns)
    : opt_(opt), cost_ns_(cost_ns) {
  batch_.reserve(opt.max_size);
  claimed_.reserve(opt.max_size);
}

Batcher::Fit Batcher::offer(Request* r, int64_t deadline, int64_t now) {
  if (deadline != Request::kNoDeadline && deadline < now + batch_estimate_ns(cost_ns_, 1)) {
    return Fit::hopeless;
  }
  const int64_t limit = std::min(deadline, min_deadline_);
  if (!batch_.empty() && limit != Request::kNoDeadline &&
      limit < now + batch_estimate_ns(cost_ns_, batch_.size() + 1)) {
    return Fit::next_batch;
  }
  if (batch_.empty()) opened_ = now;
  if (!seen_submit_) {
    seen_submit_ = true;
    last_submit_ = r->submit_ns;
  } else if (r->submit_ns > last_submit_) {
    const int64_t gap = r->submit_ns - last_submit_;
    gap_ns_ = gap_ns_ == 0 ? gap : gap_ns_ + (gap - gap_ns_) / 8;
    last_submit_ = r->submit_ns;
  }
  batch_.push_back(r);  // reserved: never allocates
  min_deadline_ = limit;
  return batch_.size() >= opt_.max_size ? Fit::full : Fit::joined;
}

bool Batcher::preferred(std::size_t n) const noexcept {
  return std::binary_search(opt_.preferred_sizes.begin(), opt_.preferred_sizes.end(), n);
}

bool Batcher::dispatch_now(bool stopping) const noexcept {
  return stopping || preferred(batch_.size()) || !waiting_pays();
}

bool Batcher::waiting_pays() const noexcept {
  const std::size_t n = batch_.size();
  const int64_t one = batch_estimate_ns(cost_ns_, 1), now = batch_estimate_ns(cost_ns_, n),
                more = batch_estimate_ns(cost_ns_, n + 1);
  if (gap_ns_ == 0 || one == 0 || now == 0 || more == 0) return true;
  return gap_ns_ < now + one - more;
}

int64_t Batcher::wait_until() const noexcept {
  const int64_t by_deadline =
      min_deadline_ == Request::kNoDeadline
          ? Request::kNoDeadline
          : min_deadline_ - batch_estimate_ns(cost_ns_, batch_.size() + 1);
  return std::min(opened_ + opt_.max_delay_ns, by_deadline);
}

}  // namespace apportion
