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
#include <limits>
#include <stdexcept>
#include <string>

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
    uint64_t sum = 0;  // of every value recorded, modulo 2^64 (see subtract())
    uint64_t max = 0;
    /// Which histogram this is a snapshot of (see new_origins()): subtract() refuses snapshots
    /// of two different non-zero origins. 0: not said (merged or hand-made snapshots).
    uint64_t origin = 0;

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

    /// What the histogram recorded between `earlier` and this snapshot: bucket by bucket
    /// this minus `earlier`, so quantiles of the result are those of that window alone. The
    /// window's max is exact when the maximum grew in it (then it was recorded in the window);
    /// otherwise it is the top of the window's highest non-empty bucket, capped at this max.
    /// Throws std::invalid_argument when the snapshots are of different histograms or
    /// `earlier` has more in some bucket (it is not earlier, or the arguments are swapped).
    Snapshot subtract(const Snapshot& earlier) const {
      if (origin != 0 && earlier.origin != 0 && origin != earlier.origin) {
        throw std::invalid_argument("histogram snapshots of different histograms (origins " +
                                    std::to_string(origin) + " and " + std::to_string(earlier.origin) +
                                    "): a window needs two snapshots of the same one");
      }
      Snapshot out;
      out.origin = origin;
      std::size_t top = kBuckets;
      for (std::size_t i = 0; i < kBuckets; ++i) {
        if (counts[i] < earlier.counts[i]) {
          throw std::invalid_argument(
              "histogram snapshot: bucket " + std::to_string(i) + " (values " + std::to_string(bucket_low(i)) +
              ".." + std::to_string(bucket_high(i)) + ") holds " + std::to_string(counts[i]) +
              " but the earlier snapshot holds " + std::to_string(earlier.counts[i]) +
              ": subtract the earlier snapshot from the later one");
        }
        out.counts[i] = counts[i] - earlier.counts[i];
        out.total += out.counts[i];
        if (out.counts[i] != 0) top = i;
      }
      if (max < earlier.max) {
        throw std::invalid_argument(
            "histogram snapshot: the max is smaller than the earlier snapshot's: subtract the "
            "earlier snapshot from the later one");
      }
      // Modulo 2^64: exact across a wrap of the running sum (at 1e13 ns of latency a second,
      // a backlogged model's queue wait, the sum wraps every 21 days), for any window whose
      // own sum stays under 2^64 ns (584 years).
      out.sum = sum - earlier.sum;
      if (top != kBuckets) out.max = max > earlier.max ? max : std::min(bucket_high(top), max);
      return out;
    }
  };

  /// `n` consecutive origin ids, unique in the process (never 0). Safe from any thread.
  static uint64_t new_origins(uint64_t n) noexcept {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(n, std::memory_order_relaxed);
  }

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

  /// The largest value bucket `i` holds (values are integers): bucket i holds
  /// bucket_low(i)..bucket_high(i); the top bucket also holds everything clamped into it.
  static uint64_t bucket_high(std::size_t i) noexcept {
    return i + 1 < kBuckets ? bucket_low(i + 1) - 1 : std::numeric_limits<uint64_t>::max();
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
