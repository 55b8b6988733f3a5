// The event count alone: the announce / re-check / park handshake, wake-ups that skip sleepers
// already woken, spin-then-park with its timeout and stop, and no lost wake-up under racing
// producers. Every blocking test runs under a deadlock guard.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "apportion/event_count.hpp"
#include "test_support.hpp"

namespace {

using apportion::EventCount;
using apportion::now_ns;
using apportion::testing::guarded;
using apportion::testing::kSanitized;
using namespace std::chrono_literals;

using Wait = EventCount::Wait;

// Takes one item from `items` if there is one (seq_cst: the condition side of the handshake).
bool take_one(std::atomic<uint64_t>& items) {
  uint64_t n = items.load(std::memory_order_seq_cst);
  while (n != 0) {
    if (items.compare_exchange_weak(n, n - 1, std::memory_order_seq_cst)) return true;
  }
  return false;
}

TEST(EventCount, NotifyWithoutSleepersIssuesNothing) {
  EventCount ec;
  EXPECT_EQ(ec.notify(4), 0u);
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, NotifySkipsSleepersThatAlreadyHaveAWakeUp) {
  EventCount ec;
  (void)ec.prepare_wait();
  (void)ec.prepare_wait();
  EXPECT_EQ(ec.sleepers(), 2u);
  EXPECT_EQ(ec.notify(5), 2u) << "no more wake-ups than sleepers";
  EXPECT_EQ(ec.wakeups_in_flight(), 2u);
  EXPECT_EQ(ec.notify(1), 0u) << "both sleepers have a wake-up on its way: no syscall";
  ec.cancel_wait();
  EXPECT_EQ(ec.sleepers(), 1u);
  EXPECT_EQ(ec.wakeups_in_flight(), 1u) << "a leaving sleeper takes one wake-up with it";
  ec.cancel_wait();
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, NotifyWakesOnlyAsManyAsAsked) {
  EventCount ec;
  for (int i = 0; i < 3; ++i) (void)ec.prepare_wait();
  EXPECT_EQ(ec.notify(1), 1u);
  EXPECT_EQ(ec.notify(1), 1u);
  EXPECT_EQ(ec.wakeups_in_flight(), 2u);
  for (int i = 0; i < 3; ++i) ec.cancel_wait();
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, AWaitAfterANotifyReturnsAtOnce) {
  // The ticket is the epoch read before announcing: a notify between prepare_wait and wait
  // changes it, so the wait does not sleep (it would hang here otherwise: no one wakes it).
  guarded(30s, [] {
    EventCount ec;
    const uint32_t ticket = ec.prepare_wait();
    EXPECT_EQ(ec.notify(1), 1u);
    ec.wait(ticket, -1);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}

#if defined(__linux__)
TEST(EventCount, AParkedWaiterIsWokenByNotify) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    std::atomic<int> tid{0};
    std::atomic<bool> done{false};
    std::thread waiter([&] {
      tid = apportion::testing::this_tid();
      const Wait w = ec.await(0, -1, [&] { return take_one(items); }, [&] { return take_one(items); },
                              [] { return false; }, [] { return false; });
      EXPECT_EQ(w, Wait::ready);
      done = true;
    });
    // Announced and asleep in the kernel: only a notify can release it now.
    while (tid.load() == 0 || ec.sleepers() != 1 || !apportion::testing::is_sleeping(tid.load())) {
      std::this_thread::sleep_for(1ms);
    }
    EXPECT_FALSE(done.load());
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u);
    waiter.join();
    EXPECT_TRUE(done.load());
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}
#endif

TEST(EventCount, AwaitTimesOutAndLeaves) {
  guarded(30s, [] {
    EventCount ec;
    int spin_checks = 0, checks = 0;
    const Wait w = ec.await(
        1'000'000, now_ns() + 2'000'000, [&] { return ++spin_checks, false; },
        [&] { return ++checks, false; }, [] { return false; }, [] { return false; });
    EXPECT_EQ(w, Wait::timeout);
    EXPECT_GE(spin_checks, 1);
    EXPECT_GE(checks, 1) << "it announced itself and looked again before giving up";
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, AwaitThatIsStoppedTakesWhatIsLeftFirst) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{1};
    std::atomic<bool> stop{true};
    const auto check = [&] { return take_one(items); };
    const auto stopping = [&] { return stop.load(std::memory_order_acquire); };
    // Stopped with an item left: the last check takes it.
    EXPECT_EQ(ec.await(0, -1, [] { return false; }, check, [] { return false; }, stopping),
              Wait::ready);
    EXPECT_EQ(ec.await(0, -1, [] { return false; }, check, [] { return false; }, stopping),
              Wait::stopped);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, NotifyAllReleasesAParkedWaiterThatThenSeesTheStop) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<bool> stop{false};
    std::atomic<int> result{-1};
    std::thread waiter([&] {
      const Wait w = ec.await(0, -1, [] { return false; }, [] { return false; },
                              [] { return false; }, [&] { return stop.load(std::memory_order_acquire); });
      result = static_cast<int>(w);
    });
    while (ec.sleepers() != 1) std::this_thread::yield();
    stop.store(true, std::memory_order_release);
    ec.notify_all();
    waiter.join();
    EXPECT_EQ(result.load(), static_cast<int>(Wait::stopped));
  });
}

TEST(EventCount, PendingWorkIsWaitedForWithoutParking) {
  // `pending` says the work is on its way: the waiter yields and looks again instead of
  // parking. Nobody notifies here, so a park would hang (the guard turns that into a failure).
  guarded(30s, [] {
    EventCount ec;
    int checks = 0, pendings = 0;
    const Wait w = ec.await(
        0, -1, [] { return false; }, [&] { return ++checks >= 4; },
        [&] { return ++pendings, true; }, [] { return false; });
    EXPECT_EQ(w, Wait::ready);
    EXPECT_EQ(checks, 4);
    EXPECT_EQ(pendings, 3);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, NoLostWakeUpUnderRacingProducers) {
  // Producers publish an item (seq_cst) and notify one sleeper; consumers never spin, so every
  // item they get after the first park goes through the handshake. A lost wake-up leaves a
  // consumer asleep with items queued: the count below is never reached and the guard fires.
  guarded(60s, [] {
    const uint64_t per_producer = kSanitized ? 2'000 : 20'000;
    constexpr int kProducers = 2, kConsumers = 2;
    EventCount ec;
    std::atomic<uint64_t> items{0}, consumed{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < kConsumers; ++c) {
      threads.emplace_back([&] {
        const auto check = [&] { return take_one(items); };
        while (ec.await(0, -1, check, check, [] { return false; },
                        [&] { return stop.load(std::memory_order_acquire); }) == Wait::ready) {
          consumed.fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
    for (int p = 0; p < kProducers; ++p) {
      threads.emplace_back([&] {
        for (uint64_t i = 0; i < per_producer; ++i) {
          items.fetch_add(1, std::memory_order_seq_cst);
          ec.notify(1);
          if (i % 64 == 0) std::this_thread::yield();  // let consumers park now and then
        }
      });
    }
    const uint64_t total = per_producer * kProducers;
    // Every item is consumed without any stop: the wake-ups alone must get them there.
    while (consumed.load(std::memory_order_relaxed) != total) std::this_thread::sleep_for(1ms);
    stop.store(true, std::memory_order_release);
    ec.notify_all();
    for (auto& t : threads) t.join();
    EXPECT_EQ(consumed.load(), total);
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

}  // namespace
