// Waiting on a busy host: a spin pays only while the thread waited for runs on another CPU. A
// caller that keeps finding its request's worker on its own CPU (kColocatedStreak hand-offs in
// a row: every other CPU is taken) parks at once, as does one whose request no worker has
// started a few microseconds in while no CPU is idle; a worker that keeps serving callers on
// its own CPU does not spin for the next request (that caller wakes on this CPU and needs it).
// One sighting changes nothing: on an idle machine the scheduler soon moves one of the two.
// Observed through /proc: a parked thread sleeps in the kernel, a spinning one never does.
#include <gtest/gtest.h>

#include <functional>

#include "engine_fixture.hpp"

#include "apportion/cpu_idle.hpp"

namespace apportion::testing::engine {
namespace {

constexpr int64_t kLongSpin = 20'000'000'000;  // far longer than any of these tests

// These tests run on a machine whose other CPUs may be idle: the probe says they are all taken,
// as on a busy host (the probe itself is tested below).
class BusyHost : public ::testing::Test {
 protected:
  void SetUp() override {
    apportion::set_idle_probe_for_tests([](int) { return false; });
  }
  void TearDown() override { apportion::set_idle_probe_for_tests(nullptr); }
};

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

// A thread pinned to `cpu` runs `first`, then waits for `r` (spin budget kLongSpin). Returns
// whether it went to sleep within `limit`; then `r` is answered (claimed first if no worker
// had started it) and the thread joined.
bool waiter_sleeps_within(const TestRef& r, int cpu, std::chrono::milliseconds limit,
                          const std::function<void()>& first = {}) {
  std::atomic<int> tid{0};
  std::thread waiter([&] {
    pin_self(cpu);
    if (first) first();
    tid.store(this_tid());
    r->wait_done(-1, kLongSpin);
  });
  while (tid.load() == 0) std::this_thread::yield();
  const bool slept = sleeps_within(tid.load(), limit);
  if (r->state() == RequestState::queued && !r->try_claim(RequestState::running)) ADD_FAILURE() << "claim";
  r->publish(Outcome::ok);
  waiter.join();
  return slept;
}

// A waiter pinned to `waiter_cpu` makes `earlier` short waits on requests whose worker runs
// on `worker_cpu`, then waits (spin budget kLongSpin) on one more such request; returns
// whether it went to sleep within 300 ms.
bool waiter_parks(int waiter_cpu, int worker_cpu, uint32_t earlier) {
  const auto running_on = [](int cpu) {
    TestRef r = make(1);
    if (!r->try_claim(RequestState::running)) ADD_FAILURE() << "claim";
    r->worker_cpu.store(cpu);
    return r;
  };
  return waiter_sleeps_within(running_on(worker_cpu), waiter_cpu, 300ms, [&] {
    for (uint32_t i = 0; i < earlier; ++i) {
      EXPECT_FALSE(running_on(worker_cpu)->wait_done(2'000'000, kLongSpin));  // times out
    }
  });
}

TEST_F(BusyHost, AWaiterThatKeepsFindingTheWorkerOnItsCpuParksAtOnce) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] {
    EXPECT_TRUE(waiter_parks(cpus[0], cpus[0], apportion::kColocatedStreak - 1));
    // Once is no streak: it spins (the scheduler may yet move one of the two).
    EXPECT_FALSE(waiter_parks(cpus[0], cpus[0], 0));
    // The worker elsewhere: the spin pays, streak or not.
    EXPECT_FALSE(waiter_parks(cpus[0], cpus[1], apportion::kColocatedStreak));
  });
}

// A waiter pinned to `cpu` waits (spin budget kLongSpin) on a request that no worker takes
// for now; returns whether it went to sleep within `limit`. The request is then taken and
// answered.
bool waiter_of_a_queued_request_parks(int cpu, std::chrono::milliseconds limit) {
  return waiter_sleeps_within(make(1), cpu, limit);  // queued: no worker has started it
}

TEST_F(BusyHost, AWaiterWhoseRequestNoWorkerStartedParksWhenNoCpuIsIdle) {
  // The worker woken for it waits for a CPU, and the spin would hold this one: kUnstartedSpinNs
  // into the spin the waiter asks, and parks.
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] { EXPECT_TRUE(waiter_of_a_queued_request_parks(cpus[0], 300ms)); });
}

TEST(WaiterSpin, AWaiterWhoseRequestNoWorkerStartedSpinsWhileACpuIsIdle) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  apportion::set_idle_probe_for_tests([](int) { return true; });
  guarded(30s, [&] { EXPECT_FALSE(waiter_of_a_queued_request_parks(cpus[0], 200ms)); });
  apportion::set_idle_probe_for_tests(nullptr);
}

TEST_F(BusyHost, AWaiterWhoseRequestRunsElsewhereSpinsUntilItIsTakenOnItsCpu) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] {
    TestRef r = make(1);
    ASSERT_TRUE(r->try_claim(RequestState::running));  // started, on no CPU of the waiter's
    std::atomic<int> tid{0};
    std::thread waiter([&] {
      pin_self(cpus[0]);
      for (uint32_t i = 0; i + 1 < apportion::kColocatedStreak; ++i) {  // a streak but one
        TestRef earlier = make(1);
        if (!earlier->try_claim(RequestState::running)) ADD_FAILURE() << "claim";
        earlier->worker_cpu.store(cpus[0]);
        EXPECT_FALSE(earlier->wait_done(2'000'000, kLongSpin));
      }
      tid.store(this_tid());
      r->wait_done(-1, kLongSpin);
    });
    while (tid.load() == 0) std::this_thread::yield();
    EXPECT_FALSE(sleeps_within(tid.load(), 200ms));
    // Its worker turns out to run on the waiter's CPU: the streak is complete, and it parks.
    r->worker_cpu.store(cpus[0]);
    EXPECT_TRUE(sleeps_within(tid.load(), 300ms));
    r->publish(Outcome::ok);
    waiter.join();
  });
}

// A worker started with `o` serves what `feed` submits; returns whether it went to sleep
// within `limit` afterwards.
bool worker_sleeps_after(ModelOptions o, const std::function<void(Model&)>& feed,
                         std::chrono::milliseconds limit) {
  auto h = std::make_shared<TestHandler>();
  std::atomic<int> tid{0};
  h->on_start = [&](Worker&) {
    tid.store(this_tid());
    return true;
  };
  o.name = "m";
  Model m(o, h);
  EXPECT_EQ(m.start(), 0u);
  feed(m);
  const bool slept = sleeps_within(tid.load(), limit);
  m.close(true);
  m.join();
  return slept;
}

// Submits request `tag` to `m` and waits for its answer, parked.
void request_and_wait(Model& m, uint64_t tag) {
  TestRef r = make(tag);
  EXPECT_EQ(submit(m, r), Admit::ok);
  EXPECT_TRUE(r->wait_done(10'000'000'000, 0));
}

// A worker pinned to `worker_cpu` serves `n` requests in turn, each submitted from
// `submitter_cpu`; returns whether it went to sleep within 300 ms afterwards (spin budget
// kLongSpin). `batch_max` > 1: a batching model (max_delay 0: each request is a batch of one).
bool worker_parks_after_serving(int worker_cpu, int submitter_cpu, bool spin_beside_caller,
                                uint32_t n, std::size_t batch_max = 1) {
  ModelOptions o;
  o.spin_ns = kLongSpin;
  o.spin_beside_caller = spin_beside_caller;
  o.placement = {apportion::InstancePlacement{{worker_cpu}, 1, {}}};
  o.batching = apportion::BatchingOptions{batch_max, 0, {}};
  return worker_sleeps_after(o, [&](Model& m) {
    std::thread([&] {
      pin_self(submitter_cpu);
      for (uint32_t i = 0; i < n; ++i) request_and_wait(m, i);
    }).join();
  }, 300ms);
}

TEST_F(BusyHost, AWorkerThatKeepsServingCallersOnItsCpuDoesNotSpin) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  constexpr uint32_t streak = apportion::kColocatedStreak;
  guarded(60s, [&] {
    EXPECT_TRUE(worker_parks_after_serving(cpus[0], cpus[0], false, streak));
    // Fewer in a row, a caller elsewhere, or the option on: it spins as configured.
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], false, streak - 1));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[1], false, streak));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], true, streak));
  });
}

TEST_F(BusyHost, ABatchingWorkerThatKeepsServingCallersOnItsCpuDoesNotSpin) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  constexpr uint32_t streak = apportion::kColocatedStreak;
  guarded(60s, [&] {
    EXPECT_TRUE(worker_parks_after_serving(cpus[0], cpus[0], false, streak, 8));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], false, streak - 1, 8));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[1], false, streak, 8));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], true, streak, 8));
  });
}

TEST_F(BusyHost, WithAnotherCpuIdleTheStreakChangesNothing) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  apportion::set_idle_probe_for_tests([](int) { return true; });
  guarded(30s, [&] {
    EXPECT_FALSE(waiter_parks(cpus[0], cpus[0], apportion::kColocatedStreak + 2));
    EXPECT_FALSE(worker_parks_after_serving(cpus[0], cpus[0], false, apportion::kColocatedStreak + 2));
  });
}

TEST(IdleProbe, ACpuKeptBusyIsNotIdleAndItsFirstAnswerIsIdle) {
  const auto cpus = two_cpus();
  if (cpus.empty()) GTEST_SKIP() << "needs two CPUs this process may pin to";
  guarded(30s, [&] {
    std::atomic<bool> stop{false}, running{false};
    std::thread hog([&] {
      pin_self(cpus[1]);
      running = true;
      while (!stop.load(std::memory_order_relaxed)) {
      }
    });
    while (!running.load()) std::this_thread::yield();
    std::this_thread::sleep_for(20ms);  // cpus[1] busy well before the first sample
    bool first = false, later = true;
    std::thread probe([&] {
      pin_self(cpus[0]);
      first = apportion::other_cpu_idle(cpus[0]);  // nothing to compare with yet
      std::this_thread::sleep_for(50ms);           // the hog has cpus[1] to itself meanwhile
      later = apportion::other_cpu_idle(cpus[0]);
    });
    probe.join();
    stop = true;
    hog.join();
    EXPECT_TRUE(first);
    // Only cpus[1] besides this one counts when the set holds just the two; with more CPUs in
    // the set an idle third one would (rightly) answer true.
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    ASSERT_EQ(sched_getaffinity(0, sizeof allowed, &allowed), 0);
    if (CPU_COUNT(&allowed) == 2) {
      EXPECT_FALSE(later);
    }
  });
}

// A worker (spin budget `spin`, so long that a spin is seen as running) serves one request per
// entry of `gaps`: the submitter waits for each answer (parked), sleeps the gap, submits the
// next. Returns whether the worker went to sleep within 50 ms of the last answer: it parks at
// once, or it spins.
bool worker_parks_after_gaps(const std::vector<std::chrono::milliseconds>& gaps,
                             std::chrono::milliseconds spin, std::size_t batch_max = 1) {
  ModelOptions o;
  o.spin_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(spin).count();
  o.batching = apportion::BatchingOptions{batch_max, 0, {}};
  return worker_sleeps_after(o, [&](Model& m) {
    uint64_t tag = 0;
    for (const auto gap : gaps) {
      std::this_thread::sleep_for(gap);
      request_and_wait(m, tag++);
    }
  }, 50ms);
}

// The probe says another CPU is idle (as on a quiet host).
class QuietHost : public ::testing::Test {
 protected:
  void SetUp() override {
    apportion::set_idle_probe_for_tests([](int) { return true; });
  }
  void TearDown() override { apportion::set_idle_probe_for_tests(nullptr); }
};

TEST_F(QuietHost, AWorkerWhoseRequestsKeepComingAfterItsSpinParksAtOnce) {
  constexpr auto spin = 150ms, late = 300ms;
  guarded(60s, [&] {
    for (const std::size_t batch_max : {std::size_t{1}, std::size_t{8}}) {
      SCOPED_TRACE(batch_max);
      // Two requests in a row after the spin ended: the next wait parks at once.
      EXPECT_TRUE(worker_parks_after_gaps({0ms, late, late}, spin, batch_max));
      // One is no pattern; and one that comes in time (submitted at once, while the worker
      // parked) makes it spin again.
      EXPECT_FALSE(worker_parks_after_gaps({0ms, late}, spin, batch_max));
      EXPECT_FALSE(worker_parks_after_gaps({0ms, late, late, 0ms}, spin, batch_max));
    }
  });
}

TEST_F(BusyHost, OnABusyHostLateRequestsDoNotStopTheSpin) {
  // No CPU idle: the gaps may be the host's doing (each side waits for a CPU to wake on), and
  // the colocated streak decides instead (three requests are no streak: it spins).
  guarded(60s, [&] { EXPECT_FALSE(worker_parks_after_gaps({0ms, 300ms, 300ms}, 150ms)); });
}

}  // namespace
}  // namespace apportion::testing::engine
