// Per-model metrics of the engine: latency histograms sharded by worker (each written only by
// its worker, merged on read), the counters the serving loop keeps beside ModelCounters, the
// direct calls' histograms, and the snapshot that puts them together.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

#include "apportion/histogram.hpp"
#include "apportion/mpmc_queue.hpp"
#include "apportion/request.hpp"

namespace apportion {

struct ModelSnapshot;

/// Latency histograms written only by the worker that owns them (merged on read).
struct alignas(kCacheLine) WorkerShard {
  LogHistogram queue_wait;
  LogHistogram compute;
  LogHistogram end_to_end;
  LogHistogram batch_size;  // one sample per model call: how many requests it served

  /// Records a completed request's queue wait, compute and end-to-end time (it ran: start_ns
  /// is set), ending at `end_ns`. The owning worker only.
  void record(const Request& r, int64_t end_ns) noexcept {
    queue_wait.record(static_cast<uint64_t>(r.start_ns - r.submit_ns));
    compute.record(static_cast<uint64_t>(end_ns - r.start_ns));
    end_to_end.record(static_cast<uint64_t>(end_ns - r.submit_ns));
  }
  /// Adds this shard's histograms into `s`'s. Safe from any thread (best effort while the
  /// owner records).
  void merge_into(ModelSnapshot& s) const noexcept;
};

struct ModelSnapshot {
  uint64_t submitted = 0, completed = 0, failed = 0, rejected = 0, expired = 0, cancelled = 0;
  uint64_t queued = 0;
  /// Requests moved to the delayed lane (on_timeout=delay); each still completes once.
  uint64_t delayed = 0;
  LogHistogram::Snapshot queue_wait, compute, end_to_end;
  /// One sample per model call (its number of requests): total is the number of calls.
  LogHistogram::Snapshot batch_size;
  /// Shared pool use (zero without a pool): calls granted capacity, and the pool time they
  /// held (duration x units, summed).
  uint64_t pool_grants = 0;
  uint64_t pool_busy_unit_ns = 0;
  /// Requests served by burst workers.
  uint64_t burst_served = 0;
  /// Requests a worker took from another group's lanes to serve or settle (zero without groups).
  uint64_t stolen = 0;
  /// Requests served by their callers directly (Model::count_direct).
  uint64_t direct = 0;
  /// Model calls the workers are in now, and how long the oldest of them has run (0: none).
  uint64_t running_calls = 0;
  uint64_t oldest_call_ns = 0;
};

/// What a model counts beside its ModelCounters and its workers' shards.
class ModelMetrics {
 public:
  /// A request moved to the delayed lane. Safe from any thread.
  void count_delayed() noexcept { delayed_.fetch_add(1, std::memory_order_relaxed); }
  /// A request a burst worker took. Safe from any thread.
  void count_burst() noexcept { burst_served_.fetch_add(1, std::memory_order_relaxed); }
  /// A direct call that took `took_ns`: no queue wait, compute and end to end both `took_ns`.
  /// Safe from any thread (under a lock: one per direct call, which already costs a process
  /// round trip).
  void record_direct(uint64_t took_ns) noexcept;

  /// Outcome counters into `s`: outcomes first, submitted last, so a reader never sees more
  /// outcomes than submissions.
  static void read_counters(const ModelCounters& c, ModelSnapshot& s) noexcept;
  /// Adds this model's own counters and the direct calls into `s`, after the workers' shards
  /// were merged into it (the direct calls are counted as the end-to-end samples they add).
  /// `single_calls`: the calls of workers that serve one request per call (they record no
  /// batch size: every such call serves one, so the histogram follows from the count, at no
  /// cost per call); the direct calls are added to them.
  void finish(ModelSnapshot& s, uint64_t single_calls) const noexcept;

 private:
  std::atomic<uint64_t> delayed_{0};  // rare: a worker moved a request to the delayed lane
  std::atomic<uint64_t> burst_served_{0};
  mutable std::mutex direct_mu_;  // guards direct_shard_'s writers (readers are best effort)
  WorkerShard direct_shard_;
};

}  // namespace apportion
