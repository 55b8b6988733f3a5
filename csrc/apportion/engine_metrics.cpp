#include "apportion/engine_metrics.hpp"

namespace apportion {

void WorkerShard::merge_into(ModelSnapshot& s) const noexcept {
  queue_wait.snapshot_into(s.queue_wait);
  compute.snapshot_into(s.compute);
  end_to_end.snapshot_into(s.end_to_end);
  batch_size.snapshot_into(s.batch_size);
}

void ModelMetrics::record_direct(uint64_t took_ns) noexcept {
  std::lock_guard<std::mutex> lock(direct_mu_);
  direct_shard_.queue_wait.record(0);
  direct_shard_.compute.record(took_ns);
  direct_shard_.end_to_end.record(took_ns);
}

void ModelMetrics::read_counters(const ModelCounters& c, ModelSnapshot& s) noexcept {
  s.completed = c.completed.load(std::memory_order_relaxed);
  s.failed = c.failed.load(std::memory_order_relaxed);
  s.rejected = c.rejected.load(std::memory_order_relaxed);
  s.expired = c.expired.load(std::memory_order_relaxed);
  s.cancelled = c.cancelled.load(std::memory_order_relaxed);
  s.submitted = c.submitted.load(std::memory_order_relaxed);
}

void ModelMetrics::finish(ModelSnapshot& s, uint64_t single_calls) const noexcept {
  s.delayed = delayed_.load(std::memory_order_relaxed);
  s.burst_served = burst_served_.load(std::memory_order_relaxed);
  direct_shard_.queue_wait.snapshot_into(s.queue_wait);
  direct_shard_.compute.snapshot_into(s.compute);
  const uint64_t served_by_workers = s.end_to_end.total;
  direct_shard_.end_to_end.snapshot_into(s.end_to_end);
  s.direct = s.end_to_end.total - served_by_workers;  // one sample per direct call
  // A call that serves one request recorded its compute time and no batch size: the batch-size
  // histogram follows from that count, at no cost per call.
  const uint64_t calls = single_calls + s.direct;
  s.batch_size.counts[LogHistogram::index_of(1)] += calls;
  s.batch_size.total += calls;
  s.batch_size.sum += calls;
  if (calls != 0) s.batch_size.max = std::max<uint64_t>(s.batch_size.max, 1);
}

}  // namespace apportion
