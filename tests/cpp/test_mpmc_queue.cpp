// MpmcQueue tests in three tiers: single-threaded semantics (with a live-object counter, so leaks
// and double destructions show up as a wrong count), multi-threaded fuzz with tagged items
// (loss, duplication, per-producer order), and deadlock guards: every test that can block runs
// under a watchdog that aborts the binary with a message, so a lost wake-up is a failure, not a
// CI job that hangs until its global timeout.
#include <gtest/gtest.h>

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "apportion/mpmc_queue.hpp"

namespace {

using apportion::MpmcQueue;
using apportion::PopStatus;
using namespace std::chrono_literals;

// Sanitized builds run 5-20x slower; the fuzz keeps its shape but moves fewer items.
using apportion::testing::kSanitized;

using apportion::testing::scaled;

using apportion::testing::Watchdog;

#if defined(__linux__)
using apportion::testing::is_sleeping;
using apportion::testing::this_tid;
#endif

// Waits (under the caller's watchdog) until every registered thread is parked, so that a test of
// "close()/push wakes a parked consumer" really exercises the wake-up and not the pre-park check.
// A tid of 0 means "not started yet", -1 "finished, ignore".
void wait_until_parked(const std::vector<std::atomic<int>>& tids) {
#if defined(__linux__)
  for (;;) {
    bool all = true;
    for (const auto& t : tids) {
      const int tid = t.load();
      if (tid == 0 || (tid > 0 && !is_sleeping(tid))) all = false;
    }
    if (all) return;
    std::this_thread::sleep_for(1ms);
  }
#else
  (void)tids;
  std::this_thread::sleep_for(200ms);
#endif
}

int current_tid() {
#if defined(__linux__)
  return this_tid();
#else
  return 1;
#endif
}

// Live-object counter: every construction and destruction is counted, so "live() == 0" after a
// scope proves the queue destroyed exactly what it constructed. `id` becomes -1 when moved from,
// which lets tests tell whether a failed push consumed its argument.
struct Tracked {
  static inline std::atomic<int64_t> constructed{0};
  static inline std::atomic<int64_t> destroyed{0};
  static int64_t live() { return constructed.load() - destroyed.load(); }
  static void reset() {
    constructed = 0;
    destroyed = 0;
  }

  int64_t id = -1;

  Tracked() noexcept { ++constructed; }
  explicit Tracked(int64_t v) noexcept : id(v) { ++constructed; }
  Tracked(Tracked&& o) noexcept : id(std::exchange(o.id, -1)) { ++constructed; }
  Tracked& operator=(Tracked&& o) noexcept {
    id = std::exchange(o.id, -1);
    return *this;
  }
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
  ~Tracked() { ++destroyed; }
};

class MpmcQueueSemantics : public ::testing::Test {
 protected:
  void SetUp() override { Tracked::reset(); }
  void TearDown() override { EXPECT_EQ(Tracked::live(), 0) << "leaked or double-destroyed items"; }
};

// ---------------------------------------------------------------- tier 1: single-threaded

TEST_F(MpmcQueueSemantics, CapacityRoundsUpToPowerOfTwo) {
  const std::pair<std::size_t, std::size_t> cases[] = {
      {0, 2}, {1, 2}, {2, 2}, {3, 4}, {4, 4}, {5, 8}, {1000, 1024}, {1024, 1024}, {1025, 2048}};
  for (const auto& [requested, expected] : cases) {
    MpmcQueue<int> q(requested);
    EXPECT_EQ(q.capacity(), expected) << "requested " << requested;
    // The rounded capacity is usable in full, and not one more.
    for (std::size_t i = 0; i < expected; ++i) ASSERT_TRUE(q.try_push(static_cast<int>(i)));
    EXPECT_FALSE(q.try_push(-1)) << "requested " << requested;
    EXPECT_EQ(q.size_hint(), expected);
  }
}

TEST_F(MpmcQueueSemantics, AbsurdCapacityThrowsLengthError) {
  EXPECT_THROW(MpmcQueue<int>((std::size_t{1} << 40) + 1), std::length_error);
  EXPECT_THROW(MpmcQueue<int>(SIZE_MAX), std::length_error);
}

TEST_F(MpmcQueueSemantics, EmptyPopFailsAndLeavesOutputAlone) {
  MpmcQueue<Tracked> q(4);
  Tracked out(7);
  EXPECT_FALSE(q.try_pop(out));
  EXPECT_EQ(out.id, 7);
  EXPECT_EQ(q.size_hint(), 0u);
}

TEST_F(MpmcQueueSemantics, FifoOrderAcrossManyLaps) {
  MpmcQueue<Tracked> q(8);
  int64_t next_in = 0;
  int64_t next_out = 0;
  // Uneven push/pop batches make head and tail wrap the ring at different phases.
  for (int round = 0; round < 200; ++round) {
    const int pushes = 1 + round % 8;
    for (int i = 0; i < pushes && q.try_push(Tracked(next_in)); ++i) ++next_in;
    const int pops = 1 + (round * 3) % 7;
    for (int i = 0; i < pops; ++i) {
      Tracked out;
      if (!q.try_pop(out)) break;
      ASSERT_EQ(out.id, next_out++);
    }
  }
  Tracked out;
  while (q.try_pop(out)) ASSERT_EQ(out.id, next_out++);
  EXPECT_EQ(next_out, next_in);
  EXPECT_GT(next_in, 16) << "the ring should have wrapped several times";
}

TEST_F(MpmcQueueSemantics, FullQueueRefusesAndLeavesValueUntouched) {
  MpmcQueue<Tracked> q(2);
  ASSERT_TRUE(q.try_push(Tracked(1)));
  ASSERT_TRUE(q.try_push(Tracked(2)));
  Tracked extra(3);
  EXPECT_FALSE(q.try_push(extra));
  EXPECT_EQ(extra.id, 3) << "a refused push must not move from its argument";
  EXPECT_FALSE(q.try_push(std::move(extra)));
  EXPECT_EQ(extra.id, 3) << "not even when given an rvalue";  // NOLINT(bugprone-use-after-move)

  Tracked out;
  ASSERT_TRUE(q.try_pop(out));
  EXPECT_EQ(out.id, 1);
  EXPECT_TRUE(q.try_push(extra));
  EXPECT_EQ(extra.id, -1) << "a successful push moves the value in";
  ASSERT_TRUE(q.try_pop(out));
  EXPECT_EQ(out.id, 2);
  ASSERT_TRUE(q.try_pop(out));
  EXPECT_EQ(out.id, 3);
  EXPECT_FALSE(q.try_pop(out));
}

TEST_F(MpmcQueueSemantics, PoppedItemsAreDestroyedExactlyOnce) {
  {
    MpmcQueue<Tracked> q(16);
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(q.try_push(Tracked(i)));
    // Each queued item is one live object (plus nothing else: temporaries are gone).
    EXPECT_EQ(Tracked::live(), 10);
    for (int i = 0; i < 10; ++i) {
      Tracked out;
      ASSERT_TRUE(q.try_pop(out));
      EXPECT_EQ(out.id, i);
    }
    EXPECT_EQ(Tracked::live(), 0) << "a popped cell must destroy its moved-from item";
  }
  EXPECT_EQ(Tracked::live(), 0);
}

TEST_F(MpmcQueueSemantics, DestructorDestroysItemsStillQueued) {
  {
    MpmcQueue<Tracked> q(8);
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(q.try_push(Tracked(i)));
    EXPECT_EQ(Tracked::live(), 5);
  }
  EXPECT_EQ(Tracked::live(), 0);
}

TEST_F(MpmcQueueSemantics, MoveOnlyOwningItemsDoNotLeak) {
  // ASan's leak checker is the real assertion here: a cell that forgot to destroy its
  // unique_ptr would leak the int.
  MpmcQueue<std::unique_ptr<int>> q(4);
  ASSERT_TRUE(q.try_push(std::make_unique<int>(1)));
  ASSERT_TRUE(q.try_push(std::make_unique<int>(2)));
  std::unique_ptr<int> out;
  ASSERT_TRUE(q.try_pop(out));
  ASSERT_NE(out, nullptr);
  EXPECT_EQ(*out, 1);
}

TEST_F(MpmcQueueSemantics, CloseRefusesPushesButQueuedItemsStayPoppable) {
  Watchdog wd(30s);
  MpmcQueue<Tracked> q(8);
  ASSERT_TRUE(q.try_push(Tracked(1)));
  ASSERT_TRUE(q.try_push(Tracked(2)));
  EXPECT_FALSE(q.closed());
  q.close();
  q.close();  // idempotent
  EXPECT_TRUE(q.closed());

  Tracked late(3);
  EXPECT_FALSE(q.try_push(late));
  EXPECT_EQ(late.id, 3) << "a push refused because of close() must not consume its value";

  Tracked out;
  ASSERT_EQ(q.pop_wait(out, -1), PopStatus::ok) << "closed but not empty: drain first";
  EXPECT_EQ(out.id, 1);
  ASSERT_TRUE(q.try_pop(out));
  EXPECT_EQ(out.id, 2);
  // Closed and empty: reported as closed at once, even with an infinite timeout.
  EXPECT_EQ(q.pop_wait(out, -1), PopStatus::closed);
  EXPECT_EQ(q.pop_wait(out, 0), PopStatus::closed);
  EXPECT_EQ(out.id, 2) << "closed pop_wait must not touch the output";
}

TEST_F(MpmcQueueSemantics, PopWaitReturnsQueuedItemWithoutWaiting) {
  Watchdog wd(30s);
  MpmcQueue<Tracked> q(4);
  ASSERT_TRUE(q.try_push(Tracked(5)));
  Tracked out;
  // Infinite timeout: if pop_wait ignored the queued item it would hang and trip the watchdog.
  EXPECT_EQ(q.pop_wait(out, -1), PopStatus::ok);
  EXPECT_EQ(out.id, 5);
}

TEST_F(MpmcQueueSemantics, PopWaitTimesOutOnOpenEmptyQueue) {
  Watchdog wd(30s);
  MpmcQueue<Tracked> q(4);
  Tracked out(9);
  EXPECT_EQ(q.pop_wait(out, 0), PopStatus::timeout);
  EXPECT_EQ(q.pop_wait(out, 0, 0), PopStatus::timeout);

  const auto timeout = 30ms;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(q.pop_wait(out, std::chrono::nanoseconds(timeout).count()), PopStatus::timeout);
  // Lower bound only: returning early would break deadlines; how late it returns is a matter of
  // scheduling on a shared machine, and the watchdog already bounds it.
  EXPECT_GE(std::chrono::steady_clock::now() - t0, timeout);
  EXPECT_EQ(out.id, 9);
  EXPECT_FALSE(q.closed());
}

// ---------------------------------------------------------------- tier 2: multi-threaded fuzz

// An item names its producer and its position in that producer's stream.
constexpr uint64_t tag(uint64_t producer, uint64_t seq) { return (producer << 40) | seq; }
constexpr uint64_t producer_of(uint64_t t) { return t >> 40; }
constexpr uint64_t seq_of(uint64_t t) { return t & ((uint64_t{1} << 40) - 1); }

enum class ConsumeMode { spin, wait, park };

struct FuzzConfig {
  int producers;
  int consumers;
  std::size_t capacity;
  uint64_t per_producer;
  ConsumeMode mode;
  bool bursts = false;  // producers sleep between bursts, so parked consumers must be woken
};

std::string describe(const FuzzConfig& c) {
  const char* mode = c.mode == ConsumeMode::spin ? "spin" : c.mode == ConsumeMode::wait ? "wait" : "park";
  return std::to_string(c.producers) + "P" + std::to_string(c.consumers) + "C cap " +
         std::to_string(c.capacity) + " " + mode + (c.bursts ? " bursts" : "");
}

// Runs producers and consumers over one queue and checks that every tagged item arrives exactly
// once and that each consumer sees each producer's items in increasing order (the queue is FIFO,
// and a consumer's successive pops claim increasing positions).
void run_fuzz(const FuzzConfig& c) {
  SCOPED_TRACE(describe(c));
  Watchdog wd(60s);
  MpmcQueue<uint64_t> q(c.capacity);
  const uint64_t total = static_cast<uint64_t>(c.producers) * c.per_producer;
  std::atomic<uint64_t> popped{0};
  std::atomic<bool> go{false};
  std::vector<std::vector<uint64_t>> received(static_cast<std::size_t>(c.consumers));
  std::vector<int> order_violations(static_cast<std::size_t>(c.consumers), 0);

  std::vector<std::thread> consumers;
  for (int ci = 0; ci < c.consumers; ++ci) {
    consumers.emplace_back([&, ci] {
      auto& mine = received[static_cast<std::size_t>(ci)];
      std::vector<int64_t> last(static_cast<std::size_t>(c.producers), -1);
      auto record = [&](uint64_t item) {
        const auto p = static_cast<std::size_t>(producer_of(item));
        const auto s = static_cast<int64_t>(seq_of(item));
        if (p >= last.size() || s <= last[p]) {
          ++order_violations[static_cast<std::size_t>(ci)];
        } else {
          last[p] = s;
        }
        mine.push_back(item);
      };
      while (!go.load()) std::this_thread::yield();
      uint64_t item = 0;
      if (c.mode == ConsumeMode::spin) {
        while (popped.load(std::memory_order_relaxed) < total) {
          if (q.try_pop(item)) {
            popped.fetch_add(1, std::memory_order_relaxed);
            record(item);
          } else {
            std::this_thread::yield();  // 2 cores, up to 10 threads: let producers run
          }
        }
      } else {
        // Consumers stop only on `closed`, which the queue reports once closed *and* empty.
        const uint32_t spin = c.mode == ConsumeMode::park ? 0 : 64;
        for (;;) {
          const PopStatus st = q.pop_wait(item, -1, spin);
          if (st == PopStatus::closed) break;
          if (st == PopStatus::ok) {
            popped.fetch_add(1, std::memory_order_relaxed);
            record(item);
          }
        }
      }
    });
  }

  std::vector<std::thread> producers;
  for (int pi = 0; pi < c.producers; ++pi) {
    producers.emplace_back([&, pi] {
      while (!go.load()) std::this_thread::yield();
      for (uint64_t s = 0; s < c.per_producer; ++s) {
        while (!q.try_push(tag(static_cast<uint64_t>(pi), s))) std::this_thread::yield();
        if (c.bursts && s % 64 == 63) std::this_thread::sleep_for(200us);
      }
    });
  }

  go.store(true);
  for (auto& t : producers) t.join();
  // Producers are done: every push happened before close(), so none can be refused or lost.
  if (c.mode != ConsumeMode::spin) q.close();
  for (auto& t : consumers) t.join();

  EXPECT_EQ(popped.load(), total);
  for (int ci = 0; ci < c.consumers; ++ci) {
    EXPECT_EQ(order_violations[static_cast<std::size_t>(ci)], 0)
        << "consumer " << ci << " saw a producer's items out of order";
  }
  std::vector<std::vector<uint8_t>> seen(static_cast<std::size_t>(c.producers),
                                         std::vector<uint8_t>(c.per_producer, 0));
  uint64_t duplicates = 0;
  uint64_t foreign = 0;
  for (const auto& v : received) {
    for (uint64_t item : v) {
      const auto p = producer_of(item);
      const auto s = seq_of(item);
      if (p >= static_cast<uint64_t>(c.producers) || s >= c.per_producer) {
        ++foreign;
        continue;
      }
      if (seen[p][s]++ != 0) ++duplicates;
    }
  }
  uint64_t lost = 0;
  for (const auto& v : seen) lost += static_cast<uint64_t>(std::count(v.begin(), v.end(), 0));
  EXPECT_EQ(duplicates, 0u);
  EXPECT_EQ(lost, 0u);
  EXPECT_EQ(foreign, 0u);
  EXPECT_EQ(q.size_hint(), 0u);
}

TEST(MpmcQueueFuzz, SpinningProducersAndConsumers) {
  // Small capacities keep the queue alternately full and empty, which is where the sequence
  // arithmetic is most likely to go wrong; 8P2C oversubscribes this 2-core machine.
  const FuzzConfig configs[] = {
      {1, 1, 4, scaled(200'000), ConsumeMode::spin},
      {2, 2, 8, scaled(100'000), ConsumeMode::spin},
      {4, 4, 16, scaled(50'000), ConsumeMode::spin},
      {8, 2, 4, scaled(25'000), ConsumeMode::spin},
      {2, 8, 64, scaled(100'000), ConsumeMode::spin},
  };
  for (const auto& c : configs) run_fuzz(c);
}

TEST(MpmcQueueFuzz, PopWaitConsumersDrainThenSeeClosed) {
  const FuzzConfig configs[] = {
      {1, 1, 8, scaled(100'000), ConsumeMode::wait},
      {2, 2, 8, scaled(50'000), ConsumeMode::wait},
      {4, 4, 32, scaled(25'000), ConsumeMode::wait},
      {8, 2, 4, scaled(10'000), ConsumeMode::wait},
  };
  for (const auto& c : configs) run_fuzz(c);
}

TEST(MpmcQueueFuzz, ParkingConsumersAreWokenByBursts) {
  // spin = 0 and sleeps between bursts: consumers park on nearly every empty queue, so a lost
  // wake-up leaves items stranded and the watchdog fires.
  const FuzzConfig configs[] = {
      {1, 1, 64, scaled(10'000), ConsumeMode::park, true},
      {2, 2, 64, scaled(5'000), ConsumeMode::park, true},
      {1, 4, 16, scaled(10'000), ConsumeMode::park, true},
      {4, 4, 16, scaled(2'500), ConsumeMode::park, false},
  };
  for (const auto& c : configs) run_fuzz(c);
}

TEST(MpmcQueueFuzz, OwningItemsSurviveContention) {
  // Heap-owning items: a cell read before it was published, or destroyed twice, shows up under
  // ASan as use-after-free/double-free, and a dropped one as a leak.
  Watchdog wd(60s);
  MpmcQueue<std::unique_ptr<uint64_t>> q(8);
  const uint64_t per_producer = scaled(50'000);
  constexpr int kProducers = 2;
  constexpr int kConsumers = 2;
  std::atomic<uint64_t> sum{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kConsumers; ++c) {
    threads.emplace_back([&] {
      std::unique_ptr<uint64_t> item;
      while (q.pop_wait(item, -1, 16) != PopStatus::closed) {
        sum.fetch_add(*item, std::memory_order_relaxed);
        item.reset();
      }
    });
  }
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&] {
      for (uint64_t i = 1; i <= per_producer; ++i) {
        auto item = std::make_unique<uint64_t>(i);
        while (!q.try_push(item)) std::this_thread::yield();
      }
    });
  }
  for (auto& t : producers) t.join();
  q.close();
  for (auto& t : threads) t.join();
  EXPECT_EQ(sum.load(), kProducers * per_producer * (per_producer + 1) / 2);
}

// ---------------------------------------------------------------- tier 3: wake-ups and deadlock

TEST(MpmcQueueWake, CloseWakesEveryParkedWaiter) {
  Watchdog wd(30s);
  constexpr int kWaiters = 6;
  MpmcQueue<int> q(4);
  std::vector<std::atomic<int>> tids(kWaiters);
  std::vector<PopStatus> results(kWaiters, PopStatus::ok);
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      tids[static_cast<std::size_t>(i)] = current_tid();
      int out = 0;
      results[static_cast<std::size_t>(i)] = q.pop_wait(out, -1, 0);
    });
  }
  wait_until_parked(tids);
  q.close();
  for (auto& t : threads) t.join();
  for (int i = 0; i < kWaiters; ++i) {
    EXPECT_EQ(results[static_cast<std::size_t>(i)], PopStatus::closed) << "waiter " << i;
  }
}

TEST(MpmcQueueWake, EachPushWakesAParkedConsumer) {
  // Every consumer takes exactly one item and leaves. Items are pushed one at a time, only once
  // all remaining consumers are parked, so each push must wake one (a push that woke nobody, or
  // woke a thread that went back to sleep while the item stayed queued, hangs this test).
  Watchdog wd(60s);
  const int rounds = static_cast<int>(scaled(20));
  for (int round = 0; round < rounds; ++round) {
    constexpr int kConsumers = 4;
    MpmcQueue<int> q(8);
    std::vector<std::atomic<int>> tids(kConsumers);
    std::atomic<int> done{0};
    std::vector<int> got(kConsumers, -1);
    std::vector<std::thread> threads;
    for (int i = 0; i < kConsumers; ++i) {
      threads.emplace_back([&, i] {
        tids[static_cast<std::size_t>(i)] = current_tid();
        int out = -1;
        const PopStatus st = q.pop_wait(out, -1, 0);
        got[static_cast<std::size_t>(i)] = st == PopStatus::ok ? out : -2;
        // Marks this thread as not parked any more for wait_until_parked's purposes.
        tids[static_cast<std::size_t>(i)] = -1;
        done.fetch_add(1);
      });
    }
    for (int k = 0; k < kConsumers; ++k) {
      wait_until_parked(tids);
      ASSERT_TRUE(q.try_push(100 + k));
      while (done.load() < k + 1) std::this_thread::yield();
    }
    for (auto& t : threads) t.join();
    std::vector<int> sorted = got;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, (std::vector<int>{100, 101, 102, 103}));
  }
}

TEST(MpmcQueueWake, PingPongThroughTwoParkingQueues) {
  // Two threads hand a token back and forth through two queues, parking every time (spin = 0).
  // Both sides sleep on nearly every hand-off, so this is many thousands of park/wake cycles;
  // a single lost wake-up stops the exchange and trips the watchdog.
  Watchdog wd(60s);
  MpmcQueue<uint64_t> ping(2);
  MpmcQueue<uint64_t> pong(2);
  const uint64_t rounds = scaled(20'000);
  std::thread echo([&] {
    uint64_t v = 0;
    while (ping.pop_wait(v, -1, 0) == PopStatus::ok) {
      while (!pong.try_push(v + 1)) std::this_thread::yield();
    }
  });
  uint64_t v = 0;
  for (uint64_t i = 0; i < rounds; ++i) {
    ASSERT_TRUE(ping.try_push(v));
    ASSERT_EQ(pong.pop_wait(v, -1, 0), PopStatus::ok);
  }
  ping.close();
  echo.join();
  EXPECT_EQ(v, rounds);
}

TEST(MpmcQueueWake, TimedWaitersAllTimeOutWhenNothingArrives) {
  Watchdog wd(30s);
  constexpr int kWaiters = 4;
  MpmcQueue<int> q(4);
  std::vector<PopStatus> results(kWaiters, PopStatus::ok);
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      int out = 0;
      results[static_cast<std::size_t>(i)] = q.pop_wait(out, 20'000'000, 0);
    });
  }
  for (auto& t : threads) t.join();
  for (auto r : results) EXPECT_EQ(r, PopStatus::timeout);
}

TEST(MpmcQueueWake, CloseDuringTrafficEndsEveryConsumer) {
  // close() races with pushes that are still running: refused pushes are fine (documented), but
  // every consumer must return `closed`, and nothing may be popped twice or invented.
  Watchdog wd(60s);
  const int rounds = static_cast<int>(scaled(50));
  for (int round = 0; round < rounds; ++round) {
    MpmcQueue<uint64_t> q(16);
    std::atomic<uint64_t> pushed{0};
    std::atomic<uint64_t> popped{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < 3; ++c) {
      threads.emplace_back([&, c] {
        uint64_t out = 0;
        while (q.pop_wait(out, -1, c == 0 ? 0u : 32u) == PopStatus::ok) popped.fetch_add(1);
      });
    }
    std::thread producer([&] {
      uint64_t i = 0;
      while (!stop.load()) {
        if (q.try_push(i)) {
          ++i;
          pushed.fetch_add(1);
        } else if (q.closed()) {
          break;
        } else {
          std::this_thread::yield();
        }
      }
    });
    std::this_thread::sleep_for(std::chrono::microseconds(200 + 37 * round));
    q.close();
    stop.store(true);
    producer.join();
    for (auto& t : threads) t.join();
    // A push that raced past close() may land after the consumers left; drain it to account.
    uint64_t out = 0;
    while (q.try_pop(out)) popped.fetch_add(1);
    EXPECT_EQ(popped.load(), pushed.load());
  }
}

}  // namespace
