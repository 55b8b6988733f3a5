// Dynamic batching: which requests a worker puts into one model call, and how long it waits
// for more. Pure decisions over the batch being formed (no queue, no clock, no threads), so
// that the serving loop only takes requests and dispatches what the batcher says.
//
// A batch is dispatched when it reaches max_size, when nothing more is queued and its size is
// preferred (or the model stops), or when max_delay has passed since its first request was
// taken. Deadline-aware: a request joins only if the batch, by the worker's own measure of
// calls of that size and of how much its slow ones overran (see batch_deadline_estimate_ns),
// finishes before the request's deadline and those
// of the requests already in it; one that no call could serve in time is hopeless (expired, or
// delayed); one that only this batch would make late, or that would make this batch late, opens
// the next batch.
//
// A batch never waits while another instance of the model waits idle for work: the next request is
// that instance's at once, and the wait would only delay the batch. Otherwise the batch waits
// for more only as long as waiting pays. The worker keeps, for each batch size n, how long after
// the queue ran dry (nothing more to take) with n requests in the batch the next request was
// submitted: a decaying histogram of those gaps, log-spaced from about a microsecond up to
// max_delay, plus how often nothing came within max_delay. Waiting t after the queue ran dry
// with a batch of n is worth
//   P(gap <= t) * (c(n) + c(1) - c(n+1))  -  n * E[min(gap, t)]
// by the measured call costs c: the worker time one more request in this batch saves when it
// comes in time, against the wait every one of the n requests in hand sits through. The batch
// waits for the t (a bucket's upper edge, or the time it has left before max_delay or its
// deadlines make it go) worth most, and dispatches at once when no wait is worth anything. A
// size never called is weighed between the measured sizes around it, and one beyond all of
// them as costing no more than n (the first wait that brings one more request measures it). The gaps are kept as a distribution because they are seldom one value: a batch of
// one is the first request of a round of closed-loop clients answered together (the rest follow
// within microseconds) as often as the last straggler of one (nothing follows until it is
// answered). An average of the two is worth no wait at all, or a full max_delay, and the batcher
// alternated between the two, splitting every round; the distribution waits the microseconds
// that catch the round and no longer. Closed-loop clients whose requests are all in the batch
// send nothing more until its answers come, so their next request comes a call later, never
// within the wait: such a batch is dispatched at once, whether it holds one client's request or
// every one of eight. (The gaps between the submissions that filled a batch say the opposite:
// eight clients answered together submit together, and a batcher that waited on that measure held
// every full round for max_delay. That is why the gaps are kept by batch size.)
//
// The estimates are measured only by calls, and a request judged hopeless never makes one: a
// few slow calls (a cold model's first calls per shape, a moment of contention) could raise
// the estimate above every deadline and keep the model from running anything, for good. So a
// hopeless verdict holds only while the estimate is fresh: once no batch has opened for
// kProbeAfterEstimates estimated calls, the next request runs anyway and its call's duration
// replaces the estimate for its size (probing()).
// A model that really is too slow for its deadlines runs one such probe per that interval.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "apportion/request.hpp"

namespace apportion {

/// Dynamic batching. max_size <= 1: off (every call serves one request).
struct BatchingOptions {
  std::size_t max_size = 1;
  /// How long a worker holding a partial batch waits for more requests, from the moment it
  /// took the batch's first request.
  int64_t max_delay_ns = 0;
  /// Sizes at which a batch is dispatched as soon as no further request is immediately
  /// queued (ascending, each <= max_size). Empty: wait up to max_delay_ns below max_size.
  std::vector<std::size_t> preferred_sizes;
};

/// The estimated duration of a call with `n` requests from `cost_ns` (index = size; 0: never
/// observed): measured for n, else scaled from the nearest smaller size measured, else the
/// nearest larger one, else 0 (nothing known yet).
int64_t batch_estimate_ns(const std::vector<int64_t>& cost_ns, std::size_t n) noexcept;
/// Folds a call of `n` requests that took `ns` into `cost_ns` (sizes beyond it are ignored);
/// `replace`: the estimate of that size becomes `ns` (a probe's measure, see Batcher), and its
/// slow calls' excess starts again from 0.
/// `slow_ns` (same sizes as `cost_ns`), when given, follows how much longer than the estimate
/// calls of each size run: a moving average of the excess (0 for a call within it).
void batch_observe(std::vector<int64_t>& cost_ns, std::size_t n, int64_t ns, bool replace = false,
                   std::vector<int64_t>* slow_ns = nullptr) noexcept;
/// The duration to plan deadlines with for a call of `n` requests: the estimate plus
/// kSlowCalls times the average excess of the calls that ran over it (`slow_ns`, see
/// batch_observe; null: the estimate alone). The estimate is a typical call; on a loaded
/// machine calls vary, and a request planned to finish by its deadline on the typical call
/// finishes after it on every slower one.
int64_t batch_deadline_estimate_ns(const std::vector<int64_t>& cost_ns, const std::vector<int64_t>* slow_ns,
                                   std::size_t n) noexcept;
inline constexpr int64_t kSlowCalls = 2;

/// One worker's batch in formation. Not thread-safe: the worker's own.
class Batcher {
 public:
  /// `cost_ns` (the worker's call durations by size, see batch_estimate_ns) and `slow_ns`
  /// (how much slower its slow calls ran, see batch_observe; null: not followed) must outlive
  /// the batcher. Deadlines are judged by batch_deadline_estimate_ns. Reserves max_size
  /// entries: forming and dispatching batches never allocates.
  Batcher(const BatchingOptions& opt, const std::vector<int64_t>& cost_ns,
          const std::vector<int64_t>* slow_ns = nullptr);

  /// How many estimated calls of one request without a batch opening make the estimate
  /// stale: the next request then runs even if the estimate says it cannot make its deadline.
  static constexpr int64_t kProbeAfterEstimates = 3;

  enum class Fit : uint8_t {
    joined,      // in the batch; it may take more
    full,        // in the batch, which reached max_size: dispatch it
    next_batch,  // not in the batch: dispatch the batch, then offer it again (carry())
    hopeless,    // no call could serve it before its deadline: settle it as expired
  };
  /// Offers a request taken at `now` with deadline `deadline` (Request::kNoDeadline: none).
  Fit offer(Request* r, int64_t deadline, int64_t now);

  /// The worker found nothing queued at `now` while this batch is open. The next request
  /// offered after that (in this batch or a later one) measures how long after it ran dry the
  /// next request came (a gap at this batch's size, see wait_for_more_ns()); of several calls before it,
  /// the first counts.
  void ran_dry(int64_t now) noexcept {
    if (dry_) return;
    dry_ = true;
    dry_at_ = now;
    dry_size_ = batch_.size();
  }
  /// With nothing queued right now (call ran_dry() first): whether to dispatch at once (the
  /// model is `stopping`, the batch has a preferred size, another instance of the model waits
  /// idle (`sibling_idle`: the next request is its, not this batch's), or waiting for the next
  /// request would not pay, see waiting_pays()) instead of waiting for more.
  bool dispatch_now(bool stopping, bool sibling_idle = false) const noexcept;
  /// How long after the queue ran dry (ran_dry()) this batch should wait for one more request:
  /// the wait worth most by the gaps seen at this batch's size and the measured call costs
  /// (see the top of this file), within the time the batch has left; 0: no wait is worth
  /// anything, dispatch now; -1: nothing known (no gap seen at this size, or no call
  /// measured), wait as configured and learn.
  int64_t wait_for_more_ns() const noexcept;
  /// Whether waiting for one more request pays: wait_for_more_ns() != 0.
  bool waiting_pays() const noexcept { return wait_for_more_ns() != 0; }
  /// How many gaps (decayed: each new one weighs 1, the one before 7/8, ...) the batcher has
  /// seen with `n` requests in the batch (kGapSizes or more: all such sizes together), and of
  /// those, how many nothing came within max_delay.
  double gaps_seen(std::size_t n) const noexcept;
  double gaps_beyond_max_delay(std::size_t n) const noexcept;
  /// How many log-spaced buckets up to max_delay the gaps are kept in (one more holds those
  /// beyond max_delay), and the upper edge of bucket `k`: kGapFloorNs << k, at most max_delay,
  /// and max_delay for the last. Each edge is a wait the batcher may choose; the shortest,
  /// about a microsecond, gives a request still being pushed when the worker looked (a gap of 0)
  /// the time to land.
  static constexpr std::size_t kGapBuckets = 16;
  static constexpr int64_t kGapFloorNs = 1024;
  /// Batches of this many requests or more share one histogram (a worker of max_size 65,536
  /// would otherwise keep 9 MB of them).
  static constexpr std::size_t kGapSizes = 1024;
  int64_t gap_edge_ns(std::size_t k) const noexcept;
  /// Until when to wait for one more request (ns, the clock of now_ns()): max_delay after the
  /// batch opened, or earlier if one more request would make it finish after its earliest
  /// deadline, or once the wait that pays (wait_for_more_ns(), from when the queue ran dry) is
  /// over; when it holds a deadline and no call was measured yet, the time it opened (no
  /// wait). Only for a non-empty batch.
  int64_t wait_until() const noexcept;

  /// A request to offer first to the next batch (Fit::next_batch), with the lane it came from.
  void carry(Request* r, uint32_t lane) noexcept {
    carry_ = r;
    carry_lane_ = lane;
  }
  bool has_carry() const noexcept { return carry_ != nullptr; }
  Request* take_carry(uint32_t& lane) noexcept {
    lane = carry_lane_;
    Request* r = carry_;
    carry_ = nullptr;
    return r;
  }

  bool empty() const noexcept { return batch_.empty(); }
  std::size_t size() const noexcept { return batch_.size(); }
  const std::vector<Request*>& requests() const noexcept { return batch_; }
  /// Scratch for the dispatcher's claimed requests (reserved like the batch).
  std::vector<Request*>& claimed() noexcept { return claimed_; }
  /// Whether this batch runs a request that a stale estimate called hopeless: its call's
  /// duration should replace the estimate rather than be averaged into it.
  bool probing() const noexcept { return probe_; }
  /// The batch was handed to the dispatcher: start a new one.
  void clear() noexcept {
    batch_.clear();
    min_deadline_ = Request::kNoDeadline;
    probe_ = false;
  }

 private:
  bool preferred(std::size_t n) const noexcept;
  bool estimate_stale(int64_t now, int64_t estimate) const noexcept;
  // The latest the batch may go: max_delay after it opened, or earlier when one more request
  // would make it finish after its earliest deadline.
  int64_t latest_dispatch() const noexcept;
  int64_t deadline_estimate(std::size_t n) const noexcept {
    return batch_deadline_estimate_ns(cost_ns_, slow_ns_, n);
  }

  const BatchingOptions& opt_;
  const std::vector<int64_t>& cost_ns_;
  const std::vector<int64_t>* slow_ns_;
  std::vector<Request*> batch_;
  std::vector<Request*> claimed_;
  // A request taken from a lane that fits no longer in the batch being formed, though it could
  // still meet its deadline in a smaller one: it opens the next batch. Uncounted in the
  // model's queue (so idle workers do not wait on it), still `queued` (so it can be cancelled).
  Request* carry_ = nullptr;
  uint32_t carry_lane_ = 0;
  int64_t opened_ = 0;  // when the batch took its first request (the last one to open)
  bool opened_any_ = false;
  bool probe_ = false;
  int64_t min_deadline_ = Request::kNoDeadline;
  bool dry_ = false;          // ran dry since the last request offered
  int64_t dry_at_ = 0;        // when it first did
  std::size_t dry_size_ = 0;  // with how many requests in the batch
  // The gaps by batch size (kGapBuckets + 1 each, the last: beyond max_delay): decayed counts,
  // and the decayed sum of the gaps in each bucket (their mean is the bucket's sum / count).
  std::vector<float> gap_count_;
  std::vector<float> gap_sum_ns_;
  void record_gap(std::size_t n, int64_t gap) noexcept;
  // Where the gaps of batch size n (<= max_size) start in gap_count_ and gap_sum_ns_.
  std::size_t gap_row(std::size_t n) const noexcept { return std::min(n, kGapSizes) * (kGapBuckets + 1); }
};

}  // namespace apportion
