// Tests of the futex-style parking primitives. Each blocking test runs under a watchdog that
// aborts with a message, so a wake-up that never comes fails the test instead of hanging CI.
#include <gtest/gtest.h>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "apportion/parking.hpp"

namespace {

using apportion::now_ns;
using apportion::park_wait;
using apportion::park_wake;
using namespace std::chrono_literals;

using apportion::testing::kSanitized;

using apportion::testing::Watchdog;

int current_tid() {
#if defined(__linux__)
  return static_cast<int>(::syscall(SYS_gettid));
#else
  return 1;
#endif
}

// Blocks until thread `tid` sleeps in the kernel. The waiters in these tests make no blocking
// call but park_wait, so this is "parked"; waking it then tests park_wake, not the value check.
void wait_until_sleeping(const std::atomic<int>& tid) {
  while (tid.load() == 0) std::this_thread::sleep_for(1ms);
#if defined(__linux__)
  for (;;) {
    std::ifstream stat("/proc/self/task/" + std::to_string(tid.load()) + "/stat");
    std::string line;
    if (std::getline(stat, line)) {
      const auto p = line.rfind(')');
      if (p != std::string::npos && p + 2 < line.size() && line[p + 2] == 'S') return;
    }
    std::this_thread::sleep_for(1ms);
  }
#else
  std::this_thread::sleep_for(200ms);
#endif
}

TEST(Parking, NowNsIsMonotonic) {
  int64_t prev = now_ns();
  for (int i = 0; i < 1000; ++i) {
    const int64_t t = now_ns();
    ASSERT_GE(t, prev);
    prev = t;
  }
}

TEST(Parking, ReturnsAtOnceWhenWordDiffersFromExpected) {
  // No timeout and no wake: if the value check were skipped the waiter would sleep in the
  // kernel. The test watches for that and fails (waking it so that it can end) instead of
  // waiting for the watchdog.
  Watchdog wd(30s);
  std::atomic<uint32_t> word{1};
  std::atomic<int> tid{0};
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    tid = current_tid();
    park_wait(word, 0, -1);
    returned = true;
  });
  while (tid.load() == 0) std::this_thread::yield();
  bool slept = false;
  while (!returned.load()) {
#if defined(__linux__)
    if (!slept && apportion::testing::is_sleeping(tid.load())) {
      slept = true;
      park_wake(word);
    }
#endif
    std::this_thread::yield();
  }
  waiter.join();
  EXPECT_FALSE(slept) << "park_wait slept although the word differed from the expected value";
  EXPECT_EQ(word.load(), 1u);
}

#if defined(__linux__)
TEST(Parking, TimeoutIsHonouredNotEarly) {
  // The futex timeout is relative on CLOCK_MONOTONIC (the clock behind now_ns); Linux never ends
  // it early without a wake or a signal, and this test sends neither.
  Watchdog wd(30s);
  std::atomic<uint32_t> word{0};
  const int64_t timeout = 20'000'000;
  const int64_t t0 = now_ns();
  park_wait(word, 0, timeout);
  EXPECT_GE(now_ns() - t0, timeout);
}
#endif

TEST(Parking, ZeroTimeoutDoesNotBlock) {
  Watchdog wd(30s);
  std::atomic<uint32_t> word{0};
  park_wait(word, 0, 0);
  SUCCEED();
}

TEST(Parking, SpuriousSafeLoopReachesItsDeadline) {
  // The documented use: re-check the condition and the remaining time after every return, since
  // park_wait may return spuriously (and does so every 50 us on non-futex platforms).
  Watchdog wd(30s);
  std::atomic<uint32_t> word{0};
  const int64_t timeout = 15'000'000;
  const int64_t deadline = now_ns() + timeout;
  int calls = 0;
  for (int64_t left = timeout; word.load() == 0 && left > 0; left = deadline - now_ns()) {
    park_wait(word, 0, left);
    ++calls;
  }
  EXPECT_GE(now_ns(), deadline);
  EXPECT_GE(calls, 1);
}

TEST(Parking, WakeReleasesAParkedThread) {
  Watchdog wd(30s);
  std::atomic<uint32_t> word{0};
  std::atomic<int> tid{0};
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    tid = current_tid();
    while (word.load(std::memory_order_acquire) == 0) park_wait(word, 0, -1);
    returned = true;
  });
  wait_until_sleeping(tid);
  EXPECT_FALSE(returned.load());
  // The waiter is already inside the kernel, so the store alone cannot release it: only the
  // wake can. Without it the join below hangs and the watchdog fires.
  word.store(1, std::memory_order_release);
  park_wake(word);
  waiter.join();
  EXPECT_TRUE(returned.load());
}

TEST(Parking, WakeAllReleasesEveryParkedThread) {
  Watchdog wd(30s);
  constexpr int kWaiters = 5;
  std::atomic<uint32_t> word{0};
  std::vector<std::atomic<int>> tids(kWaiters);
  std::atomic<int> released{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      tids[static_cast<std::size_t>(i)] = current_tid();
      while (word.load(std::memory_order_acquire) == 0) park_wait(word, 0, -1);
      released.fetch_add(1);
    });
  }
  for (const auto& t : tids) wait_until_sleeping(t);
  word.store(1, std::memory_order_release);
  park_wake(word);
  for (auto& t : threads) t.join();
  EXPECT_EQ(released.load(), kWaiters);
}

#if defined(__linux__)
TEST(Parking, WakeOneReleasesOnlyOne) {
  // Each waiter parks once, whatever it wakes to (the word never changes), so the number of
  // threads that returned counts the wake-ups delivered.
  Watchdog wd(30s);
  constexpr int kWaiters = 3;
  std::atomic<uint32_t> word{0};
  std::vector<std::atomic<int>> tids(kWaiters);
  std::atomic<int> returned{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      tids[static_cast<std::size_t>(i)] = current_tid();
      park_wait(word, 0, -1);
      returned.fetch_add(1);
    });
  }
  for (const auto& t : tids) wait_until_sleeping(t);
  park_wake(word, 1);
  while (returned.load() < 1) std::this_thread::sleep_for(1ms);
  // Give a wrongly woken second thread time to show up.
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(returned.load(), 1);
  park_wake(word);
  for (auto& t : threads) t.join();
  EXPECT_EQ(returned.load(), kWaiters);
}
#endif

TEST(Parking, WakeWithNoWaitersIsHarmless) {
  std::atomic<uint32_t> word{0};
  park_wake(word);
  park_wake(word, 1);
  EXPECT_EQ(word.load(), 0u);
}

TEST(ArrivalSpin, TwoLateRequestsInARowMakeItLateAndOneInTimeEndsIt) {
  apportion::ArrivalSpin a;
  constexpr int64_t spin = 50'000;
  EXPECT_FALSE(a.late());  // spins until told otherwise
  a.arrived(0, spin + 1, spin);
  EXPECT_FALSE(a.late());  // one late request is not a pattern
  a.arrived(0, spin, spin);  // exactly at the spin's end: caught
  a.arrived(0, spin + 1, spin);
  EXPECT_FALSE(a.late());  // the one in time broke the run
  a.arrived(0, spin + 1, spin);
  EXPECT_TRUE(a.late());
  a.arrived(0, 10 * spin, spin);
  EXPECT_TRUE(a.late());
  a.arrived(1'000, 1'000 + spin / 2, spin);  // measured from when the worker went idle
  EXPECT_FALSE(a.late());
  a.arrived(0, -5, spin);  // submitted before the worker went idle: in time
  EXPECT_FALSE(a.late());
  a.arrived(0, 2 * spin, spin);
  a.arrived(0, 2 * spin, spin);
  ASSERT_TRUE(a.late());
  a.in_time();  // found queued: the worker did not wait for it
  EXPECT_FALSE(a.late());
}

TEST(ArrivalSpin, WhileLateEverySixteenthWaitProbesAndARequestInTimeRestartsTheCount) {
  apportion::ArrivalSpin a;
  constexpr int64_t spin = 50'000;
  const auto make_late = [&] {
    a.arrived(0, 2 * spin, spin);
    a.arrived(0, 2 * spin, spin);
    ASSERT_TRUE(a.late());
  };
  make_late();
  for (int round = 0; round < 2; ++round) {
    for (uint32_t i = 1; i < apportion::ArrivalSpin::kProbeEvery; ++i) EXPECT_FALSE(a.probe()) << i;
    EXPECT_TRUE(a.probe());
  }
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(a.probe());
  a.arrived(0, 1, spin);  // in time: no longer late, and the count starts over
  EXPECT_FALSE(a.late());
  make_late();
  for (uint32_t i = 1; i < apportion::ArrivalSpin::kProbeEvery; ++i) EXPECT_FALSE(a.probe()) << i;
  EXPECT_TRUE(a.probe());
}

}  // namespace
