// Log-bucket latency histogram (HDR style): 32 linear sub-buckets per power of two, so any
// recorded value is reported within ~3% (half a sub-bucket), from 1 ns to ~4.9 hours.
//
// Each worker owns its own histograms (one writer); readers merge snapshots. Buckets are relaxed
// atomics only so that a concurrent read is not a data race: no ordering is needed because a
// snapshot taken while a worker records is allowed to miss that in-flight sample.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdint>

namespace apportion {

class LogHistogram {
 public:
  static constexpr int kSubBits = 5;
  static constexpr uint64_t kSub = uint64_t{1} << kSubBits;
  static constexpr int kMaxExp = 43;  // values >= 2^44 ns are clamped into the top bucket
  static constexpr std::size_t kBuckets = (kMaxExp - kSubBits + 2) * kSub;

  struct Snapshot {
    std::array<uint64_t, kBuckets> counts{};
    uint64_t total = 0;
    uint64_t sum = 0;
    uint64_t max = 0;

    void merge(const Snapshot& o) noexcept {
      for (std::size_t i = 0; i < kBuckets; ++i) counts[i] += o.counts[i];
      total += o.total;
      sum += o.sum;
      max = std::max(max, o.max);
    }

    /// Value at quantile q in [0, 1]: the midpoint of the bucket holding it, never above max.
    uint64_t quantile(double q) const noexcept {
      if (total == 0) return 0;
      q = std::clamp(q, 0.0, 1.0);
      auto rank = static_cast<uint64_t>(q * static_cast<double>(total) + 0.5);
      rank = std::clamp<uint64_t>(rank, 1, total);
      uint64_t seen = 0;
      for (std::size_t i = 0; i < kBuckets; ++i) {
        seen += counts[i];
        if (seen >= rank) return std::min(bucket_mid(i), max);
      }
      return max;
    }

    double mean() const noexcept {
      return total ? static_cast<double>(sum) / static_cast<double>(total) : 0.0;
    }
  };

  /// Records one value. Single writer per histogram; safe to read concurrently.
  void record(uint64_t v) noexcept {
    counts_[index_of(v)].fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(v, std::memory_order_relaxed);
    if (v > max_.load(std::memory_order_relaxed)) max_.store(v, std::memory_order_relaxed);
  }

  /// Adds this histogram's counts into `out`. Safe from any thread; best effort while recording.
  void snapshot_into(Snapshot& out) const noexcept {
    uint64_t total = 0;
    for (std::size_t i = 0; i < kBuckets; ++i) {
      const uint64_t c = counts_[i].load(std::memory_order_relaxed);
      out.counts[i] += c;
      total += c;
    }
    // Totals come from the buckets themselves so quantile ranks always match the counts.
    out.total += total;
    out.sum += sum_.load(std::memory_order_relaxed);
    out.max = std::max(out.max, max_.load(std::memory_order_relaxed));
  }

  static std::size_t index_of(uint64_t v) noexcept {
    if (v < kSub) return static_cast<std::size_t>(v);
    const int e = std::min(63 - std::countl_zero(v), kMaxExp);
    if (63 - std::countl_zero(v) > kMaxExp) return kBuckets - 1;
    const uint64_t sub = (v >> (e - kSubBits)) & (kSub - 1);
    return static_cast<std::size_t>(e - kSubBits + 1) * kSub + sub;
  }

  static uint64_t bucket_low(std::size_t i) noexcept {
    if (i < kSub) return i;
    const int e = static_cast<int>(i / kSub) + kSubBits - 1;
    return (kSub + i % kSub) << (e - kSubBits);
  }

  static uint64_t bucket_mid(std::size_t i) noexcept {
    if (i < kSub) return i;
    const int e = static_cast<int>(i / kSub) + kSubBits - 1;
    return bucket_low(i) + ((uint64_t{1} << (e - kSubBits)) >> 1);
  }

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> sum_{0};
  std::atomic<uint64_t> max_{0};
};

}  // namespace apportion
