// Waiting on a busy host: a spin pays only while the thread waited for runs on another CPU. A
// caller waiting for a request that a worker runs on the caller's own CPU parks at once, and a
// worker that served a caller on its own CPU does not spin for the next request (that caller
// wakes on this CPU and needs it). Observed through /proc: a parked thread sleeps in the
// kernel, a spinning one never does.
#include <gtest/gtest.h>

#include "engine_fixture.hpp"

namespace apportion::testing::engine {
namespace {

constexpr int64_t kLongSpin = 20'000'000'000;  // far longer than any of these tests

// Two CPUs this process may use and pin to, or none.
std::vector<int> two_cpus() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return {};
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  if (cpus.size() < 2) return {};
  bool pinnable = false;
  std::thread([&] { pinnable = pin_self(cpus[1]) && sched_getcpu() == cpus[1]; }).join();
  return pinnable ? cpus : std::vector<int>{};
}

// True if thread `tid` is seen asleep in the kernel within `limit`.
bool sleeps_within(int tid, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (is_sleeping(tid)) return true;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

// A waiter pinned to `waiter_cpu` waits (spin budget kLongSpin) on a request whose worker is
// marked as running on `worker_cpu`; returns whether the waiter went to sleep within 300 ms.
bool waiter_parks(int waiter_cpu, int worker_cpu) {
  TestRef r = make(1);
  if (!r->try_claim(RequestState::running)) ADD_FAILURE() << "claim";
  r->worker_cpu.store(worker_cpu);
  std::atomic<int> tid{0};
  std::thread waiter([&] {
    pin_self(waiter_cpu);
    tid.store(this_tid());
    r->wait_done(-1, kLongSpin);
  });
  while (tid.load() == 0) std::this_thread::yield();
  const bool slept = sleeps_within(tid.load(), 300ms);
  r->publish(Outcome::ok);
  waiter.join();
  return slept;
}

TEST(BusyHost, AWaiterOnTheWorkersCpuParksAtOnce) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] {
    EXPECT_TRUE(waiter_parks(cpus[0], cpus[0]));
    // The same wait while the worker runs elsewhere keeps spinning (the spin pays there).
    EXPECT_FALSE(waiter_parks(cpus[0], cpus[1]));
  });
}

TEST(BusyHost, AWaiterWhoseRequestIsQueuedSpinsUntilAWorkerTakesIt) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] {
    TestRef r = make(1);  // queued: no worker CPU yet
    std::atomic<int> tid{0};
    std::thread waiter([&] {
      pin_self(cpus[0]);
      tid.store(this_tid());
      r->wait_done(-1, kLongSpin);
    });
    while (tid.load() == 0) std::this_thread::yield();
    EXPECT_FALSE(sleeps_within(tid.load(), 200ms));
    // A worker takes it on the waiter's CPU: the waiter stops spinning and parks.
    ASSERT_TRUE(r->try_claim(RequestState::running));
    r->worker_cpu.store(cpus[0]);
    EXPECT_TRUE(sleeps_within(tid.load(), 300ms));
    r->publish(Outcome::ok);
    waiter.join();
  });
}

// A worker pinned to cpus[0] serves one request submitted from `submitter_cpu`; returns
// whether it went to sleep within 300 ms afterwards (spin budget kLongSpin).
bool worker_parks_after_serving(int worker_cpu, int submitter_cpu, bool spin_beside_caller) {
  auto h = std::make_shared<TestHandler>();
  std::atomic<int> tid{0};
  h->on_start = [&](Worker&) {
    tid.store(this_tid());
    return true;
  };
  ModelOptions o;
  o.name = "m";
  o.spin_ns = kLongSpin;
  o.spin_beside_caller = spin_beside_caller;
  o.placement = {apportion::InstancePlacement{{worker_cpu}, 1, {}}};
  Model m(o, h);
  EXPECT_EQ(m.start(), 0u);
  TestRef r = make(1);
  std::thread([&] {
    pin_self(submitter_cpu);
    EXPECT_EQ(submit(m, r), Admit::ok);
  }).join();
  EXPECT_TRUE(completes(r));
  const bool slept = sleeps_within(tid.load(), 300ms);
  m.close(true);
  m.join();
  return slept;
}

TEST(BusyHost, AWorkerThatServedACallerOnItsCpuDoesNotSpin) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(60s, [&] {
    EXPECT_TRUE(worker_parks_after_serving(cpus[0], cpus[0], false));
    // A caller elsewhere, or the option on: it spins for the next request as configured.
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[1], false));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], true));
  });
}

}  // namespace
}  // namespace apportion::testing::engine
