// The shared pool's scheduler on its own: capacity, priority classes, weighted shares, work
// conservation, rejoining after idleness, wide waiters. Costs are passed explicitly, so the
// shares are a property of the grant order, not of how fast this machine runs.
#include "apportion/shared_pool.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace {

using apportion::SharedPool;
using apportion::testing::guarded;
using apportion::testing::scaled;
using namespace std::chrono_literals;

TEST(SharedPool, RejectsAWeightThatIsNotPositive) {
  SharedPool pool(2);
  EXPECT_THROW(pool.join("m", 0.0, 0), std::invalid_argument);
  EXPECT_THROW(pool.join("m", -1.0, 0), std::invalid_argument);
  EXPECT_THROW(pool.join("m", std::numeric_limits<double>::infinity(), 0), std::invalid_argument);
  try {
    pool.join("ranker", std::numeric_limits<double>::quiet_NaN(), 0);
    FAIL() << "a NaN weight was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'ranker'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("weight"), std::string::npos) << e.what();
  }
}

TEST(SharedPool, TryAcquireTakesFreeUnitsAndStopsAtCapacity) {
  SharedPool pool(2);
  auto a = pool.join("a", 1.0, 0);
  EXPECT_EQ(pool.try_acquire(*a, 1), 1u);
  EXPECT_EQ(pool.try_acquire(*a, 1), 1u);  // work-conserving: one member may take everything
  EXPECT_EQ(pool.try_acquire(*a, 1), 0u);
  pool.release(*a, 1, 1000);
  EXPECT_EQ(pool.try_acquire(*a, 5), 0u);  // clamped to the capacity (2), only 1 free
  pool.release(*a, 1, 1000);
  EXPECT_EQ(pool.try_acquire(*a, 5), 2u);
  pool.release(*a, 2, 1000);
  const auto s = pool.stats(*a);
  EXPECT_EQ(s.grants, 3u);
  EXPECT_EQ(s.busy_unit_ns, 1000u + 1000u + 2000u);
}

TEST(SharedPool, AnUnusedGrantIsRefunded) {
  SharedPool pool(1);
  auto a = pool.join("a", 1.0, 0);
  ASSERT_EQ(pool.try_acquire(*a, 1), 1u);
  pool.release(*a, 1, 0);
  EXPECT_EQ(pool.stats(*a).grants, 0u);
  EXPECT_EQ(pool.stats(*a).busy_unit_ns, 0u);
}

TEST(SharedPool, ZeroCapacityWaitsUntilCapacityIsSet) {
  guarded(30s, [] {
    SharedPool pool;
    auto a = pool.join("a", 1.0, 0);
    EXPECT_EQ(pool.try_acquire(*a, 1), 0u);
    std::atomic<bool> got{false};
    std::thread t([&] {
      const uint32_t u = pool.acquire(*a, 1);
      got.store(true);
      pool.release(*a, u, 10);
    });
    std::this_thread::sleep_for(20ms);
    EXPECT_FALSE(got.load());
    pool.set_capacity(1);
    t.join();
    EXPECT_TRUE(got.load());
    EXPECT_EQ(pool.capacity(), 1u);
  });
}

// Queues one waiter per entry of `who` (in that order) behind a held unit, runs
// `before_release` (if given) while they all wait, then frees the unit and returns the order in
// which the waiters were granted.
std::vector<std::string> grant_order(SharedPool& pool,
                                     const std::vector<std::shared_ptr<SharedPool::Member>>& who,
                                     const std::function<void()>& before_release = {}) {
  auto holder = pool.join("holder", 1.0, 1000);
  const uint32_t held = pool.acquire(*holder, 1);
  std::mutex mu;
  std::vector<std::string> order;
  std::vector<std::thread> threads;
  for (const auto& m : who) {
    threads.emplace_back([&, m] {
      const uint32_t u = pool.acquire(*m, 1);
      {
        std::lock_guard lock(mu);
        order.push_back(m->name());
      }
      pool.release(*m, u, 1000);
    });
    // One at a time, so arrival order is known: wait until it is parked in acquire().
    while (pool.waiting() < threads.size()) std::this_thread::sleep_for(100us);
  }
  if (before_release) before_release();
  pool.release(*holder, held, 1000);
  for (auto& t : threads) t.join();
  return order;
}

TEST(SharedPool, HigherPriorityClassIsAlwaysGrantedFirst) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto low1 = pool.join("low1", 100.0, 0);  // a big weight does not beat a class
    auto low2 = pool.join("low2", 1.0, 0);
    auto high = pool.join("high", 1.0, 5);
    auto mid = pool.join("mid", 1.0, 2);
    const auto order = grant_order(pool, {low1, low2, mid, high});
    EXPECT_EQ(order, (std::vector<std::string>{"high", "mid", "low1", "low2"}));
  });
}

TEST(SharedPool, EqualClassesAreGrantedInArrivalOrderWhenEven) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto a = pool.join("a", 1.0, 0);
    auto b = pool.join("b", 1.0, 0);
    auto c = pool.join("c", 1.0, 0);
    EXPECT_EQ(grant_order(pool, {c, a, b}), (std::vector<std::string>{"c", "a", "b"}));
  });
}

// Backlogged members (each with `threads` workers looping acquire -> renew with a fixed
// cost) until `total` grants; returns grants per member. Every worker is waiting before the
// pool opens (capacity 0 until then), so no member runs ahead while the others start.
std::map<std::string, uint64_t> run_backlogged(SharedPool& pool, uint32_t capacity,
                                               const std::vector<std::shared_ptr<SharedPool::Member>>& members,
                                               const std::map<std::string, int64_t>& cost, int threads,
                                               uint64_t total) {
  pool.set_capacity(0);
  std::atomic<uint64_t> grants{0};
  std::mutex mu;
  std::map<std::string, uint64_t> got;
  std::vector<std::thread> ts;
  for (const auto& m : members) {
    for (int i = 0; i < threads; ++i) {
      ts.emplace_back([&, m] {
        // As a worker does: with more work queued it renews its units instead of releasing.
        uint32_t u = 0;
        for (;;) {
          if (u == 0) u = pool.acquire(*m, 1);
          const bool counted = grants.fetch_add(1) < total;
          if (counted) {
            std::lock_guard lock(mu);
            ++got[m->name()];
          }
          if (!counted) {
            pool.release(*m, u, cost.at(m->name()));
            return;
          }
          // Waiting in line within renew(): a preempted thread never makes its member look
          // idle, so the shares are the grant order's alone, however loaded the machine.
          u = pool.renew(*m, u, cost.at(m->name()), /*wait=*/true);
        }
      });
    }
  }
  while (pool.waiting() < ts.size()) std::this_thread::sleep_for(100us);
  pool.set_capacity(capacity);
  for (auto& t : ts) t.join();
  return got;
}

TEST(SharedPool, BackloggedMembersShareInProportionToTheirWeights) {
  guarded(60s, [] {
    for (uint32_t capacity : {1u, 2u}) {
      SharedPool pool;
      auto a = pool.join("a", 3.0, 0);
      auto b = pool.join("b", 1.0, 0);
      // More workers than units per member: both stay backlogged even while one of them
      // holds every unit.
      auto got = run_backlogged(pool, capacity, {a, b}, {{"a", 1000}, {"b", 1000}},
                                static_cast<int>(capacity) + 1, scaled(8000));
      const double ratio = static_cast<double>(got["a"]) / static_cast<double>(got["b"]);
      EXPECT_NEAR(ratio, 3.0, 0.3) << "capacity " << capacity << ": " << got["a"] << " vs " << got["b"];
    }
  });
}

TEST(SharedPool, SharesCountCostNotCalls) {
  guarded(60s, [] {
    SharedPool pool;
    auto a = pool.join("a", 1.0, 0);
    auto b = pool.join("b", 1.0, 0);
    // Equal weights, but b's calls cost 4x: b gets a quarter of a's calls, equal pool time.
    auto got = run_backlogged(pool, 1, {a, b}, {{"a", 1000}, {"b", 4000}}, 2, scaled(8000));
    const double ratio = static_cast<double>(got["a"]) / static_cast<double>(got["b"]);
    EXPECT_NEAR(ratio, 4.0, 0.4) << got["a"] << " vs " << got["b"];
    const double time_ratio = static_cast<double>(pool.stats(*a).busy_unit_ns) /
                              static_cast<double>(pool.stats(*b).busy_unit_ns);
    EXPECT_NEAR(time_ratio, 1.0, 0.1);
  });
}

TEST(SharedPool, AnIdleMemberRejoinsWithoutBankedCredit) {
  guarded(60s, [] {
    SharedPool pool;
    auto a = pool.join("a", 1.0, 0);
    auto b = pool.join("b", 1.0, 0);
    // a runs alone for a long while; b then arrives. Were b's clock still at 0, it would hold
    // the pool alone for the next thousand calls.
    run_backlogged(pool, 1, {a}, {{"a", 1000}}, 1, scaled(2000));
    auto got = run_backlogged(pool, 1, {a, b}, {{"a", 1000}, {"b", 1000}}, 2, scaled(2000));
    const double ratio = static_cast<double>(got["a"]) / static_cast<double>(got["b"]);
    EXPECT_NEAR(ratio, 1.0, 0.15) << got["a"] << " vs " << got["b"];
  });
}

TEST(SharedPool, AWaiterWhoseClassChangesIsGrantedByItsNewClass) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto low = pool.join("low", 1.0, 0);
    auto mid = pool.join("mid", 1.0, 1);
    const auto order = grant_order(pool, {low, mid}, [&] {
      pool.set_class(*low, 2);  // while it waits in line
      EXPECT_EQ(low->priority_class(), 2);
      pool.set_class(*mid, 1);  // the class it has: nothing changes
    });
    EXPECT_EQ(order, (std::vector<std::string>{"low", "mid"}));
  });
}

// x (class 0) waits in line below z (class 3), which keeps the pool's one unit for a thousand
// calls of 1000 ns: the pool's clock and z's run a million ns ahead of x's. Then `move` changes
// one of their classes so that they share one, and both stay backlogged (acquire -> renew)
// until `total` grants; returns the grants per member after the change.
std::map<std::string, uint64_t> after_a_class_change(
    const std::function<void(SharedPool&, SharedPool::Member& z, SharedPool::Member& x)>& move) {
  SharedPool pool(1);
  auto z = pool.join("z", 1.0, 3);
  auto x = pool.join("x", 1.0, 0);
  std::atomic<uint64_t> grants{0};
  const uint64_t total = scaled(2000);
  std::mutex mu;
  std::map<std::string, uint64_t> got;
  auto serve = [&](SharedPool::Member& m, uint32_t u) {
    for (;;) {
      if (u == 0) u = pool.acquire(m, 1);
      if (grants.fetch_add(1) >= total) {
        pool.release(m, u, 1000);
        return;
      }
      {
        std::lock_guard lock(mu);
        ++got[m.name()];
      }
      u = pool.renew(m, u, 1000, /*wait=*/true);
    }
  };
  uint32_t zu = pool.try_acquire(*z, 1);
  EXPECT_EQ(zu, 1u);
  std::thread tx([&] { serve(*x, 0); });
  while (pool.waiting() < 1) std::this_thread::sleep_for(100us);
  for (int i = 0; i < 1000; ++i) zu = pool.renew(*z, zu, 1000);
  EXPECT_EQ(zu, 1u);
  EXPECT_EQ(got["x"], 0u);
  move(pool, *z, *x);
  serve(*z, zu);
  tx.join();
  return got;
}

TEST(SharedPool, AMemberMovedIntoAClassBanksNoCredit) {
  guarded(60s, [] {
    // Moved up into z's class with its clock where it was, x would hold the pool alone for the
    // next thousand calls.
    auto got = after_a_class_change([](SharedPool& pool, SharedPool::Member&, SharedPool::Member& x) {
      pool.set_class(x, 3);
      EXPECT_EQ(x.priority_class(), 3);
    });
    const double ratio = static_cast<double>(got["x"]) / static_cast<double>(got["z"]);
    EXPECT_NEAR(ratio, 1.0, 0.15) << got["x"] << " vs " << got["z"];
  });
}

TEST(SharedPool, AMemberMovedDownSharesWithTheClassItJoinsAtOnce) {
  guarded(60s, [] {
    // Moved down into x's class at the pool's clock, z would wait a thousand calls for x to
    // catch up: it starts level with x.
    auto got = after_a_class_change([](SharedPool& pool, SharedPool::Member& z, SharedPool::Member&) {
      pool.set_class(z, 0);
      EXPECT_EQ(z.priority_class(), 0);
    });
    const double ratio = static_cast<double>(got["x"]) / static_cast<double>(got["z"]);
    EXPECT_NEAR(ratio, 1.0, 0.15) << got["x"] << " vs " << got["z"];
  });
}

TEST(SharedPool, AClassCannotChangeWhileThePoolHasReservations) {
  SharedPool pool(2);
  auto m = pool.join("ranker", 1.0, 0);
  pool.set_reserve({{1, 1}}, 10);
  try {
    pool.set_class(*m, 2);
    FAIL() << "a class change under reservations was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'ranker'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("reservations"), std::string::npos) << e.what();
  }
  EXPECT_EQ(m->priority_class(), 0);  // a refused change changes nothing
  pool.set_reserve({}, 0);
  pool.set_class(*m, 2);
  EXPECT_EQ(m->priority_class(), 2);
}

TEST(SharedPool, AWideWaiterIsNotBypassedByNarrowOnes) {
  guarded(30s, [] {
    SharedPool pool(2);
    auto wide = pool.join("wide", 1.0, 1);
    auto narrow = pool.join("narrow", 1.0, 0);
    const uint32_t held = pool.acquire(*narrow, 1);  // one of two units busy
    std::atomic<bool> wide_got{false};
    std::thread t([&] {
      const uint32_t u = pool.acquire(*wide, 2);
      EXPECT_EQ(u, 2u);
      wide_got.store(true);
      pool.release(*wide, u, 1000);
    });
    std::this_thread::sleep_for(20ms);
    // One unit is free, but the better waiter needs two: nobody lower may take it.
    EXPECT_EQ(pool.try_acquire(*narrow, 1), 0u);
    EXPECT_FALSE(wide_got.load());
    pool.release(*narrow, held, 1000);
    t.join();
    EXPECT_TRUE(wide_got.load());
    EXPECT_EQ(pool.try_acquire(*narrow, 1), 1u);
    pool.release(*narrow, 1, 1000);
  });
}

TEST(SharedPool, AWithdrawnMemberLeavesTheLineAtOnceAndWaitsNoMore) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto high = pool.join("high", 1.0, 1);
    auto low = pool.join("low", 1.0, 0);
    auto other = pool.join("other", 1.0, 0);
    const uint32_t held = pool.acquire(*high, 1);  // a higher class holds the only unit
    std::atomic<int> low_got{-1};
    std::thread waiting([&] { low_got.store(static_cast<int>(pool.acquire(*low, 1))); });
    while (pool.waiting() < 1) std::this_thread::sleep_for(100us);
    pool.withdraw(*low);
    waiting.join();
    EXPECT_EQ(low_got.load(), 0) << "left the line with nothing held";
    EXPECT_EQ(pool.waiting(), 0u);
    EXPECT_EQ(pool.acquire(*low, 1), 0u) << "later waits return at once";
    pool.release(*high, held, 1000);
    EXPECT_EQ(pool.try_acquire(*other, 1), 1u) << "the withdrawn member holds nothing";
    pool.release(*other, 1, 1000);
    // A holder that is withdrawn keeps its units until it gives them back; a waiting renew
    // gives them back and returns 0 rather than queueing again.
    ASSERT_EQ(pool.try_acquire(*other, 1), 1u);
    pool.withdraw(*other);
    EXPECT_EQ(pool.try_acquire(*high, 1), 0u);
    EXPECT_EQ(pool.renew(*other, 1, 1000, /*wait=*/true), 0u);
    EXPECT_EQ(pool.try_acquire(*high, 1), 1u);
    pool.release(*high, 1, 1000);
  });
}

TEST(SharedPool, RenewKeepsUnitsOnlyForTheBestCandidate) {
  SharedPool pool(1);
  auto a = pool.join("a", 1.0, 0);
  ASSERT_EQ(pool.try_acquire(*a, 1), 1u);
  EXPECT_EQ(pool.renew(*a, 1, 1000), 1u);  // nobody waits: kept
  EXPECT_EQ(pool.stats(*a).grants, 2u);
  pool.release(*a, 1, 1000);
  EXPECT_EQ(pool.stats(*a).busy_unit_ns, 2000u);
}

TEST(SharedPool, RenewGivesWayToAHigherClassWaiter) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto low = pool.join("low", 1.0, 0);
    auto high = pool.join("high", 1.0, 1);
    ASSERT_EQ(pool.try_acquire(*low, 1), 1u);
    std::atomic<bool> got{false};
    std::thread t([&] {
      const uint32_t u = pool.acquire(*high, 1);
      got.store(true);
      pool.release(*high, u, 1000);
    });
    while (pool.waiting() < 1) std::this_thread::sleep_for(100us);
    EXPECT_EQ(pool.renew(*low, 1, 1000), 0u);
    t.join();
    EXPECT_TRUE(got.load());
  });
}

TEST(SharedPool, ShrinkingKeepsHeldUnitsUntilReleased) {
  guarded(30s, [] {
    SharedPool pool(2);
    auto a = pool.join("a", 1.0, 0);
    ASSERT_EQ(pool.try_acquire(*a, 1), 1u);
    ASSERT_EQ(pool.try_acquire(*a, 1), 1u);
    pool.set_capacity(1);
    pool.release(*a, 1, 100);
    EXPECT_EQ(pool.try_acquire(*a, 1), 0u);  // the other unit is still held: 1 of 1 in use
    pool.release(*a, 1, 100);
    EXPECT_EQ(pool.try_acquire(*a, 1), 1u);
    pool.release(*a, 1, 100);
  });
}

// A thread that waits for one unit for `m`, sets `got` once granted and gives it back; returns
// once that thread is in line.
std::thread acquire_in_line(SharedPool& pool, SharedPool::Member& m, std::atomic<bool>& got) {
  const std::size_t before = pool.waiting();
  std::thread t([&pool, &m, &got] {
    const uint32_t u = pool.acquire(m, 1);
    got.store(true);
    pool.release(m, u, 1000);
  });
  while (pool.waiting() <= before && !got.load()) std::this_thread::sleep_for(100us);
  return t;
}

TEST(SharedPool, AReservedClassRunsBeyondTheCapacityLowerClassesDoNot) {
  SharedPool pool(2);
  pool.set_reserve({{1, 1}}, 10);
  auto low = pool.join("low", 1.0, 0);
  auto high = pool.join("high", 1.0, 1);
  auto top = pool.join("top", 1.0, 7);  // a higher class shares the reservation of class 1
  ASSERT_EQ(pool.try_acquire(*low, 1), 1u);
  ASSERT_EQ(pool.try_acquire(*low, 1), 1u);
  EXPECT_EQ(pool.try_acquire(*low, 1), 0u);   // the lower class stops at the capacity
  EXPECT_EQ(pool.try_acquire(*high, 1), 1u);  // the reserved unit: no wait for a low call
  EXPECT_EQ(pool.try_acquire(*top, 1), 0u);   // one unit reserved, and it is held
  pool.release(*high, 1, 1000);
  EXPECT_EQ(pool.try_acquire(*top, 1), 1u);
  pool.release(*top, 1, 1000);
  // Renewing a lower-class call never reaches into the reservation: with the reserved class
  // holding a unit beyond the capacity, a low call that ends gives its unit back for good.
  ASSERT_EQ(pool.try_acquire(*high, 1), 1u);  // 3 held: 2 low + 1 reserved
  EXPECT_EQ(pool.renew(*low, 1, 1000), 0u);   // 2 held without it: the capacity is full
  EXPECT_EQ(pool.try_acquire(*low, 1), 0u);
  pool.release(*high, 1, 1000);
  EXPECT_EQ(pool.try_acquire(*low, 1), 1u);
  pool.release(*low, 1, 1000);
  pool.release(*low, 1, 1000);
}

TEST(SharedPool, AWaitingReservedClassIsGrantedTheHeadroomAtOnce) {
  guarded(30s, [] {
    SharedPool pool(1);
    auto low = pool.join("low", 1.0, 0);
    auto high = pool.join("high", 1.0, 1);
    ASSERT_EQ(pool.try_acquire(*low, 1), 1u);
    std::atomic<bool> got{false};
    std::thread t = acquire_in_line(pool, *high, got);  // queues: no headroom yet
    EXPECT_FALSE(got.load());
    pool.set_reserve({{1, 1}}, 5);  // the low call still holds the only unit
    t.join();
    EXPECT_TRUE(got.load());
    pool.release(*low, 1, 1000);
  });
}

TEST(SharedPool, ALowerClassWaiterIsNotGrantedFromTheReservation) {
  guarded(30s, [] {
    SharedPool pool(1);
    pool.set_reserve({{1, 2}}, 10);
    auto low = pool.join("low", 1.0, 0);
    auto low2 = pool.join("low2", 1.0, 0);
    ASSERT_EQ(pool.try_acquire(*low, 1), 1u);
    std::atomic<bool> got{false};
    std::thread t = acquire_in_line(pool, *low2, got);
    std::this_thread::sleep_for(5ms);
    EXPECT_FALSE(got.load());  // two reserved units free, none of them for class 0
    pool.release(*low, 1, 1000);
    t.join();
    EXPECT_TRUE(got.load());
  });
}

TEST(SharedPool, ReservationsNameTheirHeadroomAndTheNiceOfLowerClasses) {
  SharedPool pool(4);
  EXPECT_EQ(pool.headroom(5), 0u);
  EXPECT_EQ(pool.nice_for(0), 0);
  pool.set_reserve({{1, 1}, {3, 2}}, 7);
  EXPECT_EQ(pool.headroom(0), 0u);
  EXPECT_EQ(pool.headroom(1), 1u);
  EXPECT_EQ(pool.headroom(2), 1u);
  EXPECT_EQ(pool.headroom(3), 2u);
  EXPECT_EQ(pool.headroom(100), 2u);
  EXPECT_EQ(pool.nice_for(0), 7);   // below class 1
  EXPECT_EQ(pool.nice_for(2), 7);   // below class 3
  EXPECT_EQ(pool.nice_for(3), 0);   // the top reserved class keeps its priority
  pool.set_reserve({}, 0);          // cleared: no nice needed
  EXPECT_EQ(pool.headroom(3), 0u);
  EXPECT_EQ(pool.nice_for(0), 0);
}

TEST(SharedPool, RejectsBadReservations) {
  SharedPool pool(2);
  EXPECT_THROW(pool.set_reserve({{1, 0}}, 10), std::invalid_argument);
  EXPECT_THROW(pool.set_reserve({{1, 1}, {1, 2}}, 10), std::invalid_argument);
  EXPECT_THROW(pool.set_reserve({{1, 1}}, 0), std::invalid_argument);
  EXPECT_THROW(pool.set_reserve({{1, 1}}, 20), std::invalid_argument);
  try {
    pool.set_reserve({{4, 1}, {4, 1}}, 10);
    FAIL() << "a class given twice was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("class 4"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.headroom(4), 0u);  // a refused call changes nothing
}

}  // namespace
