// Tests of the log-bucket latency histogram: bucket arithmetic, quantiles on known
// distributions, merging, and a concurrent record/snapshot race (meaningful under TSan).
#include <gtest/gtest.h>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "apportion/histogram.hpp"

namespace {

using apportion::LogHistogram;
using Snapshot = LogHistogram::Snapshot;
using namespace std::chrono_literals;

using apportion::testing::kSanitized;

// Values at or above 2^(kMaxExp+1) are clamped into the top bucket; everything below has a
// bucket of its own range.
constexpr uint64_t kClampFrom = uint64_t{1} << (LogHistogram::kMaxExp + 1);

uint64_t bucket_width(std::size_t i) {
  if (i + 1 < LogHistogram::kBuckets) return LogHistogram::bucket_low(i + 1) - LogHistogram::bucket_low(i);
  // The top bucket: same width as its neighbour (same power of two).
  return LogHistogram::bucket_low(i) - LogHistogram::bucket_low(i - 1);
}

// The histogram is large (tens of KiB of atomics): keep it off the test thread's stack.
std::unique_ptr<LogHistogram> make_hist() { return std::make_unique<LogHistogram>(); }

Snapshot snap(const LogHistogram& h) {
  Snapshot s;
  h.snapshot_into(s);
  return s;
}

void expect_within(uint64_t got, double want, double rel, const char* what) {
  EXPECT_LE(std::fabs(static_cast<double>(got) - want), rel * want)
      << what << ": got " << got << ", want " << want << " within " << rel * 100 << "%";
}

TEST(LogHistogram, SmallValuesHaveExactBuckets) {
  for (uint64_t v = 0; v < LogHistogram::kSub; ++v) {
    const std::size_t i = LogHistogram::index_of(v);
    EXPECT_EQ(i, v);
    EXPECT_EQ(LogHistogram::bucket_low(i), v);
    EXPECT_EQ(LogHistogram::bucket_mid(i), v);
  }
}

TEST(LogHistogram, BucketsTileTheRangeWithoutGapsOrOverlap) {
  // Consecutive buckets are adjacent and strictly increasing, and each bucket's low maps back to
  // that bucket: together this says every value below the clamp has exactly one bucket.
  for (std::size_t i = 0; i + 1 < LogHistogram::kBuckets; ++i) {
    const uint64_t lo = LogHistogram::bucket_low(i);
    const uint64_t next = LogHistogram::bucket_low(i + 1);
    ASSERT_LT(lo, next) << "bucket " << i;
    ASSERT_EQ(LogHistogram::index_of(lo), i) << "low of bucket " << i;
    ASSERT_EQ(LogHistogram::index_of(next - 1), i) << "last value of bucket " << i;
  }
  const std::size_t top = LogHistogram::kBuckets - 1;
  EXPECT_EQ(LogHistogram::index_of(LogHistogram::bucket_low(top)), top);
  EXPECT_EQ(LogHistogram::bucket_low(top) + bucket_width(top), kClampFrom);
}

TEST(LogHistogram, EveryValueLandsInABucketContainingIt) {
  std::vector<uint64_t> values;
  // Every value up to 2^14 exhaustively, then both edges of every power of two, then random.
  for (uint64_t v = 0; v < (1u << 14); ++v) values.push_back(v);
  for (int e = 1; e <= LogHistogram::kMaxExp; ++e) {
    const uint64_t p = uint64_t{1} << e;
    values.push_back(p - 1);
    values.push_back(p);
    values.push_back(p + 1);
  }
  values.push_back(kClampFrom - 1);
  std::mt19937_64 rng(12345);
  for (int k = 0; k < 100000; ++k) {
    const int bits = static_cast<int>(rng() % (LogHistogram::kMaxExp + 1)) + 1;
    values.push_back(rng() >> (64 - bits));
  }
  double worst = 0.0;
  for (const uint64_t v : values) {
    const std::size_t i = LogHistogram::index_of(v);
    ASSERT_LT(i, LogHistogram::kBuckets) << v;
    const uint64_t lo = LogHistogram::bucket_low(i);
    const uint64_t mid = LogHistogram::bucket_mid(i);
    ASSERT_LE(lo, v) << "value " << v << " bucket " << i;
    ASSERT_LT(v, lo + bucket_width(i)) << "value " << v << " bucket " << i;
    ASSERT_LE(lo, mid);
    ASSERT_LT(mid, lo + bucket_width(i));
    if (v >= LogHistogram::kSub) {
      const double err = std::fabs(static_cast<double>(mid) - static_cast<double>(v)) /
                         static_cast<double>(v);
      worst = std::max(worst, err);
      ASSERT_LE(err, 0.032) << "value " << v << " reported as " << mid;
    }
  }
  // Half a sub-bucket (1/64) is the design bound; the brief allows up to ~3.2%.
  EXPECT_LE(worst, 1.0 / 64 + 1e-9);
}

TEST(LogHistogram, HugeValuesAreClampedIntoTheTopBucket) {
  const std::size_t top = LogHistogram::kBuckets - 1;
  EXPECT_EQ(LogHistogram::index_of(kClampFrom), top);
  EXPECT_EQ(LogHistogram::index_of(UINT64_MAX), top);
  auto h = make_hist();
  h->record(UINT64_MAX / 4);
  const Snapshot s = snap(*h);
  EXPECT_EQ(s.total, 1u);
  EXPECT_EQ(s.counts[top], 1u);
  // The maximum is kept exactly even though the bucket cannot represent it.
  EXPECT_EQ(s.max, UINT64_MAX / 4);
  EXPECT_EQ(s.quantile(1.0), LogHistogram::bucket_mid(top));
}

TEST(LogHistogram, EmptySnapshotReportsZeros) {
  auto h = make_hist();
  const Snapshot s = snap(*h);
  EXPECT_EQ(s.total, 0u);
  EXPECT_EQ(s.quantile(0.5), 0u);
  EXPECT_EQ(s.quantile(0.99), 0u);
  EXPECT_EQ(s.max, 0u);
  EXPECT_EQ(s.mean(), 0.0);
}

TEST(LogHistogram, UniformDistributionQuantiles) {
  auto h = make_hist();
  for (uint64_t v = 1; v <= 10000; ++v) h->record(v);
  const Snapshot s = snap(*h);
  EXPECT_EQ(s.total, 10000u);
  EXPECT_EQ(s.sum, 10000u * 10001u / 2);
  EXPECT_DOUBLE_EQ(s.mean(), 5000.5);
  EXPECT_EQ(s.max, 10000u);
  expect_within(s.quantile(0.5), 5000, 0.032, "p50");
  expect_within(s.quantile(0.9), 9000, 0.032, "p90");
  expect_within(s.quantile(0.99), 9900, 0.032, "p99");
  expect_within(s.quantile(0.999), 9990, 0.032, "p99.9");
  // Never above the exact maximum, even though 10000's bucket midpoint is larger.
  EXPECT_LE(s.quantile(1.0), 10000u);
  expect_within(s.quantile(1.0), 10000, 0.032, "p100");
  EXPECT_EQ(s.quantile(0.0), 1u);
  // Quantiles are monotone in q.
  uint64_t prev = 0;
  for (int k = 0; k <= 1000; ++k) {
    const uint64_t q = s.quantile(k / 1000.0);
    ASSERT_GE(q, prev) << "q=" << k / 1000.0;
    prev = q;
  }
  // Out-of-range q is clamped, not undefined.
  EXPECT_EQ(s.quantile(-1.0), s.quantile(0.0));
  EXPECT_EQ(s.quantile(2.0), s.quantile(1.0));
}

TEST(LogHistogram, BimodalDistributionQuantiles) {
  // 90% fast (1 us), 10% slow (5 ms): p50 and p90 are fast, p99 is slow.
  auto h = make_hist();
  for (int i = 0; i < 9000; ++i) h->record(1'000);
  for (int i = 0; i < 1000; ++i) h->record(5'000'000);
  const Snapshot s = snap(*h);
  expect_within(s.quantile(0.5), 1'000, 0.016, "p50");
  expect_within(s.quantile(0.9), 1'000, 0.016, "p90");
  expect_within(s.quantile(0.99), 5'000'000, 0.016, "p99");
  EXPECT_EQ(s.max, 5'000'000u);
}

TEST(LogHistogram, MaxIsExact) {
  auto h = make_hist();
  std::mt19937_64 rng(7);
  uint64_t want = 0;
  for (int i = 0; i < 5000; ++i) {
    const uint64_t v = rng() % 123'456'789;
    want = std::max(want, v);
    h->record(v);
  }
  EXPECT_EQ(snap(*h).max, want);
  h->record(want - 1);  // a smaller value never lowers the maximum
  EXPECT_EQ(snap(*h).max, want);
}

TEST(LogHistogram, MergeOfSnapshotsEqualsOneHistogramOfAllValues) {
  auto a = make_hist();
  auto b = make_hist();
  auto all = make_hist();
  std::mt19937_64 rng(99);
  for (int i = 0; i < 20000; ++i) {
    const uint64_t v = rng() % 50'000'000;
    (i % 3 == 0 ? *a : *b).record(v);
    all->record(v);
  }
  Snapshot merged = snap(*a);
  merged.merge(snap(*b));
  const Snapshot want = snap(*all);
  EXPECT_EQ(merged.counts, want.counts);
  EXPECT_EQ(merged.total, want.total);
  EXPECT_EQ(merged.sum, want.sum);
  EXPECT_EQ(merged.max, want.max);
  for (double q : {0.5, 0.9, 0.99, 0.999}) EXPECT_EQ(merged.quantile(q), want.quantile(q)) << q;

  // snapshot_into adds, as the engine uses it to merge worker shards.
  Snapshot summed;
  a->snapshot_into(summed);
  b->snapshot_into(summed);
  EXPECT_EQ(summed.counts, want.counts);
  EXPECT_EQ(summed.total, want.total);
  EXPECT_EQ(summed.max, want.max);

  // Merging an empty snapshot changes nothing.
  Snapshot copy = want;
  copy.merge(Snapshot{});
  EXPECT_EQ(copy.counts, want.counts);
  EXPECT_EQ(copy.total, want.total);
  EXPECT_EQ(copy.max, want.max);
}

TEST(LogHistogram, ConcurrentRecordAndSnapshotAreRaceFree) {
  // One writer per histogram (the engine's rule), several readers merging while it writes.
  // Snapshots may miss in-flight samples, but they never go backwards and never exceed the
  // final counts; the final snapshot is exact. TSan checks the absence of data races.
  const int per_writer = kSanitized ? 20'000 : 200'000;
  constexpr int kWriters = 2;
  std::vector<std::unique_ptr<LogHistogram>> hists;
  for (int i = 0; i < kWriters; ++i) hists.push_back(make_hist());
  std::atomic<int> writers_done{0};

  auto body = [&] {
    std::vector<std::thread> writers;
    for (int w = 0; w < kWriters; ++w) {
      writers.emplace_back([&, w] {
        for (int i = 0; i < per_writer; ++i) hists[static_cast<std::size_t>(w)]->record(static_cast<uint64_t>(i % 5000 + 1));
        writers_done.fetch_add(1);
      });
    }
    uint64_t last_total = 0;
    uint64_t last_max = 0;
    int reads = 0;
    bool monotone = true;
    while (writers_done.load() < kWriters || reads < 10) {
      Snapshot s;
      for (auto& h : hists) h->snapshot_into(s);
      if (s.total < last_total || s.max < last_max) monotone = false;
      if (s.total > static_cast<uint64_t>(per_writer) * kWriters) monotone = false;
      last_total = s.total;
      last_max = s.max;
      (void)s.quantile(0.99);
      ++reads;
    }
    for (auto& t : writers) t.join();
    EXPECT_TRUE(monotone);
    Snapshot final_snap;
    for (auto& h : hists) h->snapshot_into(final_snap);
    EXPECT_EQ(final_snap.total, static_cast<uint64_t>(per_writer) * kWriters);
    EXPECT_EQ(final_snap.max, 5000u);
  };
  auto fut = std::async(std::launch::async, body);
  const auto limit = kSanitized ? 240s : 60s;
  if (fut.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "WATCHDOG: concurrent record/snapshot did not finish in time\n");
    std::fflush(stderr);
    std::abort();  // the future's destructor would wait forever for the hung thread
  }
  fut.get();
}

TEST(LogHistogram, BucketHighIsTheLastValueOfEachBucket) {
  for (std::size_t i = 0; i + 1 < LogHistogram::kBuckets; ++i) {
    const uint64_t hi = LogHistogram::bucket_high(i);
    EXPECT_EQ(LogHistogram::index_of(hi), i) << "bucket " << i;
    EXPECT_EQ(LogHistogram::index_of(hi + 1), i + 1) << "bucket " << i;
  }
  EXPECT_EQ(LogHistogram::bucket_high(LogHistogram::kBuckets - 1), UINT64_MAX);
}

TEST(LogHistogram, WindowHoldsOnlyWhatWasRecordedBetweenTheSnapshots) {
  auto h = make_hist();
  for (int i = 0; i < 99; ++i) h->record(2'000'000);  // window 1: 2 ms each
  const Snapshot s1 = snap(*h);
  for (int i = 0; i < 100; ++i) h->record(20'000'000);  // window 2: 20 ms each
  const Snapshot s2 = snap(*h);

  const Snapshot w = s2.subtract(s1);
  EXPECT_EQ(w.total, 100u);
  EXPECT_EQ(w.sum, 100u * 20'000'000u);
  EXPECT_EQ(w.max, 20'000'000u);  // the maximum grew in the window: exact
  EXPECT_EQ(w.counts[LogHistogram::index_of(2'000'000)], 0u);
  expect_within(w.quantile(0.5), 20e6, 0.03, "window p50");
  expect_within(w.quantile(0.01), 20e6, 0.03, "window p1");
  // The cumulative snapshot mixes both windows: its low quantiles are window 1's.
  expect_within(s2.quantile(0.25), 2e6, 0.03, "cumulative p25");

  // A window in which the maximum did not grow: the top of its highest bucket, within the max.
  h->record(3'000'000);
  const Snapshot s3 = snap(*h);
  const Snapshot w3 = s3.subtract(s2);
  EXPECT_EQ(w3.total, 1u);
  EXPECT_EQ(w3.max, LogHistogram::bucket_high(LogHistogram::index_of(3'000'000)));
  EXPECT_LE(w3.max - 3'000'000, bucket_width(LogHistogram::index_of(3'000'000)));
  expect_within(w3.quantile(0.99), 3e6, 0.03, "single-sample window");

  const Snapshot empty = s3.subtract(s3);
  EXPECT_EQ(empty.total, 0u);
  EXPECT_EQ(empty.max, 0u);
  EXPECT_EQ(empty.quantile(0.5), 0u);
}

TEST(LogHistogram, SubtractRefusesSwappedSnapshotsAndOtherHistograms) {
  auto h = make_hist();
  const Snapshot before = snap(*h);
  h->record(5'000);
  const Snapshot after = snap(*h);
  try {
    (void)before.subtract(after);
    ADD_FAILURE() << "a later snapshot subtracted from an earlier one was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("subtract the earlier snapshot from the later one"), std::string::npos)
        << e.what();
  }

  Snapshot a = after, b = before;
  a.origin = 7;
  b.origin = 8;
  EXPECT_THROW((void)a.subtract(b), std::invalid_argument);
  b.origin = 7;
  EXPECT_EQ(a.subtract(b).origin, 7u);
  b.origin = 0;  // not said: accepted
  EXPECT_EQ(a.subtract(b).total, 1u);

  Snapshot smaller_max = after;
  smaller_max.max = 0;
  EXPECT_THROW((void)smaller_max.subtract(after), std::invalid_argument);
}

// The running sum is kept modulo 2^64 ns: a window across its wrap still has its own sum.
TEST(LogHistogram, WindowAcrossTheSumsWrapKeepsItsSum) {
  auto h = make_hist();
  constexpr uint64_t kHalf = uint64_t{1} << 63;
  h->record(kHalf - 1);
  h->record(kHalf - 1);
  const Snapshot before = snap(*h);
  ASSERT_EQ(before.sum, ~uint64_t{0} - 1);
  h->record(10'000'000);
  h->record(30'000'000);
  const Snapshot after = snap(*h);
  ASSERT_LT(after.sum, before.sum);  // wrapped
  const Snapshot window = after.subtract(before);
  EXPECT_EQ(window.total, 2u);
  EXPECT_EQ(window.sum, 40'000'000u);
}

TEST(LogHistogram, OriginsAreUniqueAndNeverZero) {
  const uint64_t a = LogHistogram::new_origins(4);
  const uint64_t b = LogHistogram::new_origins(1);
  EXPECT_NE(a, 0u);
  EXPECT_GE(b, a + 4);
}

}  // namespace
