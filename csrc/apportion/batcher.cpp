#include "apportion/batcher.hpp"

#include <algorithm>

namespace apportion {

namespace {

// `values` (by size) for a call of `n` requests, by the sizes `cost_ns` has measured: the
// value of n if measured, else scaled linearly from the nearest smaller measured size, else
// that of the nearest larger one, else 0.
int64_t by_measured_size(const std::vector<int64_t>& values, const std::vector<int64_t>& cost_ns,
                         std::size_t n) noexcept {
  const std::size_t known = std::min(cost_ns.size(), values.size());
  if (n < known && cost_ns[n] > 0) return values[n];
  // Scaling a smaller size up linearly over-estimates (a call has fixed costs): when in doubt
  // a request is kept out of a batch rather than put in one that finishes too late.
  for (std::size_t k = std::min(n, known); k-- > 1;) {
    if (cost_ns[k] > 0) return values[k] / static_cast<int64_t>(k) * static_cast<int64_t>(n);
  }
  for (std::size_t k = n + 1; k < known; ++k) {
    if (cost_ns[k] > 0) return values[k];
  }
  return 0;
}

// The duration of a call of `n` requests by `cost_ns`, for weighing a wait rather than a
// deadline: measured; else between the nearest measured sizes below and above (looking at most
// n sizes up, which keeps a worker of max_size 65,536 from reading its whole table each time),
// interpolated linearly; else, with none above, `none_above` (kScaleUp: the nearest smaller size
// scaled up, as batch_estimate_ns); else, with none below, the nearest one above (as
// batch_estimate_ns: 0 when nothing is known). A deadline's estimate scales the smaller size up,
// which over-estimates: c(1) = c(3) = 20 ms reads c(2) as 40 ms, one more request in a batch of
// one as saving nothing, and a worker that never waits with one request never measures two.
constexpr int64_t kScaleUp = -1;

int64_t weighed_ns(const std::vector<int64_t>& cost_ns, std::size_t n, int64_t none_above) noexcept {
  if (n < cost_ns.size() && cost_ns[n] > 0) return cost_ns[n];
  std::size_t below = 0, above = 0;
  for (std::size_t k = std::min(n, cost_ns.size()); k-- > 1;) {
    if (cost_ns[k] > 0) {
      below = k;
      break;
    }
  }
  for (std::size_t k = n + 1; k < std::min(cost_ns.size(), 2 * n + 1); ++k) {
    if (cost_ns[k] > 0) {
      above = k;
      break;
    }
  }
  if (below != 0 && above != 0) {
    return cost_ns[below] + (cost_ns[above] - cost_ns[below]) * static_cast<int64_t>(n - below) /
                                static_cast<int64_t>(above - below);
  }
  if (below != 0) {
    return none_above != kScaleUp ? none_above
                                  : cost_ns[below] / static_cast<int64_t>(below) * static_cast<int64_t>(n);
  }
  return above != 0 ? cost_ns[above] : batch_estimate_ns(cost_ns, n);
}

}  // namespace

int64_t batch_estimate_ns(const std::vector<int64_t>& cost_ns, std::size_t n) noexcept {
  return by_measured_size(cost_ns, cost_ns, n);
}

int64_t batch_deadline_estimate_ns(const std::vector<int64_t>& cost_ns, const std::vector<int64_t>* slow_ns,
                                   std::size_t n) noexcept {
  const int64_t e = batch_estimate_ns(cost_ns, n);
  return slow_ns == nullptr ? e : e + kSlowCalls * by_measured_size(*slow_ns, cost_ns, n);
}

void batch_observe(std::vector<int64_t>& cost_ns, std::size_t n, int64_t ns, bool replace,
                   std::vector<int64_t>* slow_ns) noexcept {
  if (n >= cost_ns.size()) return;
  ns = std::max<int64_t>(ns, 1);
  int64_t& e = cost_ns[n];
  if (slow_ns != nullptr && n < slow_ns->size() && e != 0 && !replace) {
    // Weight 1/8: the excess of one slow call is its own noise; a run of them moves it.
    int64_t& s = (*slow_ns)[n];
    const int64_t excess = std::max<int64_t>(ns - e, 0);
    s += (excess - s) / 8;
  }
  if (replace) {
    // A probe re-measures an estimate that kept requests from running: the overrun it was
    // planned with is as stale (it would keep them out on its own), and is learned again.
    e = ns;
    if (slow_ns != nullptr && n < slow_ns->size()) (*slow_ns)[n] = 0;
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

Batcher::Batcher(const BatchingOptions& opt, const std::vector<int64_t>& cost_ns,
                 const std::vector<int64_t>* slow_ns)
    : opt_(opt), cost_ns_(cost_ns), slow_ns_(slow_ns) {
  batch_.reserve(opt.max_size);
  claimed_.reserve(opt.max_size);
  gap_count_.assign((std::min(opt.max_size, kGapSizes) + 1) * (kGapBuckets + 1), 0.0F);
  gap_sum_ns_.assign(gap_count_.size(), 0.0F);
}

bool Batcher::estimate_stale(int64_t now, int64_t estimate) const noexcept {
  return opened_any_ && now - opened_ > kProbeAfterEstimates * estimate;
}

Batcher::Fit Batcher::offer(Request* r, int64_t deadline, int64_t now) {
  if (dry_) {
    // An arrival, whatever becomes of it. Submitted before the worker looked (still being
    // pushed, or in a lane it had not reached): no gap at all.
    dry_ = false;
    record_gap(dry_size_, std::max<int64_t>(r->submit_ns - dry_at_, 0));
  }
  if (deadline != Request::kNoDeadline) {
    // Hopeless by an estimate that only calls can correct: once no batch has opened for a
    // while, the next request runs anyway and re-measures (see kProbeAfterEstimates).
    if (deadline < now + deadline_estimate(1)) {
      if (!estimate_stale(now, batch_estimate_ns(cost_ns_, 1))) return Fit::hopeless;
      probe_ = true;
    }
  }
  const int64_t limit = std::min(deadline, min_deadline_);
  if (!batch_.empty() && limit != Request::kNoDeadline &&
      limit < now + deadline_estimate(batch_.size() + 1)) {
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

int64_t Batcher::gap_edge_ns(std::size_t k) const noexcept {
  if (k >= kGapBuckets - 1) return opt_.max_delay_ns;
  return std::min(kGapFloorNs << k, opt_.max_delay_ns);
}

void Batcher::record_gap(std::size_t n, int64_t gap) noexcept {
  if (n > opt_.max_size) return;  // dry_size_ < max_size: a full batch is never open
  std::size_t k = 0;
  if (gap >= opt_.max_delay_ns) {
    k = kGapBuckets;  // nothing came within the longest wait there could be
  } else {
    while (gap > gap_edge_ns(k)) ++k;  // < kGapBuckets: the last edge is max_delay
  }
  // Weight 7/8 for what came before: a change in the load shows within a few rounds.
  float* count = &gap_count_[gap_row(n)];
  float* sum = &gap_sum_ns_[gap_row(n)];
  for (std::size_t j = 0; j <= kGapBuckets; ++j) {
    count[j] *= 0.875F;
    sum[j] *= 0.875F;
    // Nothing there for ~100 gaps: nothing at all. (Decayed on, a count would become a
    // subnormal float that never reaches 0, and every multiplication a slow one.)
    if (count[j] < 1e-6F) count[j] = sum[j] = 0.0F;
  }
  count[k] += 1.0F;
  if (k < kGapBuckets) sum[k] += static_cast<float>(gap);
}

double Batcher::gaps_seen(std::size_t n) const noexcept {
  if (n > opt_.max_size) return 0;
  double w = 0;
  for (std::size_t j = 0; j <= kGapBuckets; ++j) w += gap_count_[gap_row(n) + j];
  return w;
}

double Batcher::gaps_beyond_max_delay(std::size_t n) const noexcept {
  return n > opt_.max_size ? 0 : gap_count_[gap_row(n) + kGapBuckets];
}

int64_t Batcher::latest_dispatch() const noexcept {
  const int64_t by_deadline =
      min_deadline_ == Request::kNoDeadline
          ? Request::kNoDeadline
          : min_deadline_ - deadline_estimate(batch_.size() + 1);
  return std::min(opened_ + opt_.max_delay_ns, by_deadline);
}

int64_t Batcher::wait_for_more_ns() const noexcept {
  const std::size_t n = batch_.size();
  const int64_t one = weighed_ns(cost_ns_, 1, kScaleUp), now = weighed_ns(cost_ns_, n, kScaleUp),
                // A size beyond all measured ones is assumed to cost what n does: once a wait
                // brings one more request, its call measures it (scaled up from n instead, one
                // more request would save nothing, and the batch would never grow to show it).
                more = weighed_ns(cost_ns_, n + 1, now);
  const double seen = gaps_seen(n);
  if (n == 0 || seen <= 0 || one == 0 || now == 0 || more == 0) return -1;
  // How long the batch may still wait: only a request that comes by then joins it.
  const int64_t left = dry_ ? latest_dispatch() - dry_at_ : opt_.max_delay_ns;
  if (left <= 0) return 0;
  // The worker time one more request saves, and the worth of waiting up to each bucket's edge t:
  // the chance that the next request comes by t times that, less the wait every request in
  // hand sits through (the gaps caught, each its own length; the rest, all of t). A bucket
  // whose edge is past the time left is weighed at the time left, with its own gaps uncaught.
  const double saved = static_cast<double>(now + one - more);
  const float* count = &gap_count_[gap_row(n)];
  const float* sum = &gap_sum_ns_[gap_row(n)];
  double caught = 0, caught_ns = 0, best = 0;
  int64_t wait = 0;
  for (std::size_t k = 0; k < kGapBuckets; ++k) {
    const int64_t edge = gap_edge_ns(k);
    const bool last = edge >= left;
    if (!last) {
      caught += count[k];
      caught_ns += sum[k];
    }
    const int64_t t = last ? left : edge;
    const double worth =
        (caught * saved - static_cast<double>(n) * (caught_ns + (seen - caught) * static_cast<double>(t))) / seen;
    if (worth > best) {
      best = worth;
      wait = t;
    }
    if (last) break;
  }
  return wait;
}

int64_t Batcher::wait_until() const noexcept {
  if (min_deadline_ != Request::kNoDeadline && batch_estimate_ns(cost_ns_, batch_.size() + 1) == 0) {
    // No call measured yet: nothing says how long before the deadline the batch must go, and
    // waiting up to the deadline itself would make it late for sure. It goes now (and its
    // call is the first measure).
    return opened_;
  }
  const int64_t wait = dry_ ? wait_for_more_ns() : -1;
  return std::min(latest_dispatch(), wait >= 0 ? dry_at_ + wait : Request::kNoDeadline);
}

}  // namespace apportion
