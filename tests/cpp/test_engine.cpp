// Tests of the engine's core (apportion::Model) with a plain C++ handler, in three tiers:
//  1. single-threaded semantics, with a live-object counter proving every request is destroyed
//     exactly once after its owners release it;
//  2. a multi-threaded fuzz with tagged requests (cancellations, deadlines, errors and a close in
//     the middle) checked for loss and duplicate completion;
//  3. every test that could block runs under a deadlock guard, so a hang becomes a failure.
#include <gtest/gtest.h>

#if defined(__linux__)
#include <sched.h>
#endif

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "apportion/affinity.hpp"
#include "apportion/engine.hpp"

namespace {

using apportion::Admit;
using apportion::BatchingOptions;
using apportion::Model;
using apportion::ModelHandler;
using apportion::ModelOptions;
using apportion::ModelSnapshot;
using apportion::now_ns;
using apportion::OnTimeout;
using apportion::Outcome;
using apportion::Ref;
using apportion::Request;
using apportion::RequestState;
using apportion::Worker;
using namespace std::chrono_literals;

using apportion::testing::kSanitized;

// ---------------------------------------------------------------------------------------------
// A tagged request with a live-object counter and a per-request completion counter.

using apportion::testing::g_constructed;
using apportion::testing::g_destroyed;
using apportion::testing::live;

enum class Behaviour : uint8_t { ok, error, throws };

class TestRequest : public Request {
 public:
  explicit TestRequest(uint64_t t = 0, Behaviour b = Behaviour::ok) : tag(t), behaviour(b) {
    g_constructed.fetch_add(1);
  }
  ~TestRequest() override { g_destroyed.fetch_add(1); }

  const uint64_t tag;
  const Behaviour behaviour;
  std::atomic<int> completions{0};  // incremented on every completion path; must end at <= 1
  std::atomic<int> runs{0};         // times the handler's run() saw it
};

using TestRef = Ref<TestRequest>;

TestRef make(uint64_t tag = 0, Behaviour b = Behaviour::ok) {
  return TestRef(new TestRequest(tag, b));
}

// ---------------------------------------------------------------------------------------------
// A handler that calls a std::function, then completes and releases, as the Python one does.

class TestHandler : public ModelHandler {
 public:
  // Set before Model::start(); read by the workers (thread creation orders the two).
  std::function<Outcome(Worker&, TestRequest&)> on_run;
  std::function<bool(Worker&)> on_start;

  std::atomic<int> starts{0}, stops{0}, runs{0}, abandons{0};
  std::atomic<int> abandons_without_worker{0};
  // Contract violations seen in worker threads, checked by the test thread.
  std::atomic<int> bad_state{0};

  bool start_worker(Worker& w) override {
    starts.fetch_add(1);
    return on_start ? on_start(w) : true;
  }

  // Called once per model call with the whole batch, before any request is completed.
  std::function<void(Worker&, Request* const*, std::size_t)> on_batch;
  std::atomic<int> calls{0};

  void run(Worker& w, Request* const* batch, std::size_t n) override {
    calls.fetch_add(1);
    if (n == 0) bad_state.fetch_add(1);
    if (on_batch) on_batch(w, batch, n);
    for (std::size_t i = 0; i < n; ++i) run_one(w, batch[i]);
  }

  void run_one(Worker& w, Request* r) {
    auto* t = static_cast<TestRequest*>(r);
    runs.fetch_add(1);
    t->runs.fetch_add(1);
    if (r->state() != RequestState::running || r->start_ns < r->submit_ns) bad_state.fetch_add(1);
    Outcome o = Outcome::ok;
    try {
      if (on_run) o = on_run(w, *t);
      if (t->behaviour == Behaviour::error) o = Outcome::error;
      if (t->behaviour == Behaviour::throws) throw std::runtime_error("model failed");
    } catch (const std::exception&) {
      o = Outcome::error;
    }
    t->completions.fetch_add(1);
    Model::complete(*r, o, &w.shard);
    Request::release(r);
  }

  void abandon(Worker* w, Request* r, Outcome why) override {
    auto* t = static_cast<TestRequest*>(r);
    abandons.fetch_add(1);
    if (w == nullptr) abandons_without_worker.fetch_add(1);
    if (r->state() != RequestState::claimed) bad_state.fetch_add(1);
    if (why != Outcome::expired && why != Outcome::cancelled) bad_state.fetch_add(1);
    t->completions.fetch_add(1);
    Model::complete(*r, why, w ? &w->shard : nullptr);
    Request::release(r);
  }

  void stop_worker(Worker&) override { stops.fetch_add(1); }

  // What a handler that keeps something between calls (the GIL) sees: it may keep it after a
  // call only when may_linger is set, and must be told (idle) before the worker waits.
  std::atomic<int> idles{0};
  void idle(Worker& w) override {
    idles.fetch_add(1);
    if (!w.may_linger) bad_state.fetch_add(1);
  }
};

// A one-shot gate a handler can block on, so a test can hold a worker inside run().
class Gate {
 public:
  void open() {
    open_.store(1);
    open_.notify_all();
  }
  void wait() { open_.wait(0); }
  // The handler announces it has entered run().
  void arrive() {
    arrived_.fetch_add(1);
    arrived_.notify_all();
  }
  void wait_arrivals(int n) {
    for (int a = arrived_.load(); a < n; a = arrived_.load()) arrived_.wait(a);
  }

 private:
  std::atomic<int> open_{0};
  std::atomic<int> arrived_{0};
};

// A model call that holds request 0 at `gate` (a running request the test releases when it
// wants) and serves every other request at once.
std::function<Outcome(Worker&, TestRequest&)> hold_tag0(Gate& gate) {
  return [&gate](Worker&, TestRequest& r) {
    if (r.tag == 0) {
      gate.arrive();
      gate.wait();
    }
    return Outcome::ok;
  };
}

// The queue's reference is added before submit and dropped again when admission says no.
Admit submit(Model& m, const TestRef& r) {
  r->add_ref();
  const Admit a = m.submit(r.get());
  if (a != Admit::ok) Request::release(r.get());
  return a;
}

Admit submit_all(Model& m, const std::vector<TestRef>& rs) {
  std::vector<Request*> raw;
  for (const auto& r : rs) {
    r->add_ref();
    raw.push_back(r.get());
  }
  const Admit a = m.submit_n(raw.data(), raw.size());
  if (a != Admit::ok) {
    for (Request* r : raw) Request::release(r);
  }
  return a;
}

using apportion::testing::guarded;

// Waits for a completion, failing instead of hanging.
::testing::AssertionResult completes(const TestRef& r) {
  if (r->wait_done(10'000'000'000LL * (kSanitized ? 4 : 1))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "request " << r->tag << " never completed";
}

uint64_t accounted(const ModelSnapshot& s) {
  return s.completed + s.failed + s.rejected + s.expired + s.cancelled;
}

ModelOptions opts(uint32_t instances, std::size_t max_queue = 1024) {
  ModelOptions o;
  o.name = "m";
  o.instances = instances;
  o.max_queue = max_queue;
  return o;
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override { live_before_ = live(); }
  void TearDown() override {
    EXPECT_EQ(live(), live_before_) << "requests leaked (or destroyed twice)";
  }

 private:
  int64_t live_before_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Tier 1: single-threaded semantics.

TEST_F(EngineTest, IdleIsCalledBeforeAWorkerWaitsAndOnlyWhenItMayLinger) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<bool> lingering{false};
    h->on_run = [&](Worker& w, TestRequest&) {
      if (w.may_linger) lingering.store(true);
      return Outcome::ok;
    };
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    auto r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    ASSERT_TRUE(completes(r));
    // The queue is empty now: the worker tells the handler before it spins or parks.
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (h->idles.load() == 0 && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(1ms);
    }
    EXPECT_GE(h->idles.load(), 1);
    EXPECT_TRUE(lingering.load());
    m.close(true);
    m.join();
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, BatchingWorkersNeverLinger) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> lingered{0};
    h->on_run = [&](Worker& w, TestRequest&) {
      if (w.may_linger) lingered.fetch_add(1);
      return Outcome::ok;
    };
    ModelOptions o = opts(1);
    o.batching.max_size = 4;
    o.batching.max_delay_ns = 1'000'000;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 8; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(lingered.load(), 0);
    EXPECT_EQ(h->idles.load(), 0);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, SubmitRunsAndCompletes) {
  const int64_t live_before = live();
  guarded(30s, [live_before] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<uint64_t> tag_sum{0};
    h->on_run = [&](Worker& w, TestRequest& r) {
      EXPECT_EQ(w.index, 0u);
      tag_sum.fetch_add(r.tag);
      return Outcome::ok;
    };
    Model m(opts(1), h);
    EXPECT_EQ(m.name(), "m");
    EXPECT_FALSE(m.started());
    EXPECT_EQ(m.start(), 0u);
    EXPECT_TRUE(m.started());
    EXPECT_EQ(h->starts.load(), 1);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 10; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) {
      ASSERT_TRUE(completes(r));
      EXPECT_EQ(r->outcome(), Outcome::ok);
      EXPECT_EQ(r->completions.load(), 1);
      EXPECT_EQ(r->runs.load(), 1);
      EXPECT_LE(r->submit_ns, r->start_ns);
      EXPECT_LE(r->start_ns, r->end_ns);
      EXPECT_EQ(r->counters, m.counters());
    }
    EXPECT_EQ(tag_sum.load(), 55u);
    m.close(true);
    EXPECT_TRUE(m.closed());
    m.join();
    EXPECT_EQ(h->stops.load(), 1);
    EXPECT_EQ(h->abandons.load(), 0);
    EXPECT_EQ(h->bad_state.load(), 0);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, 10u);
    EXPECT_EQ(s.completed, 10u);
    EXPECT_EQ(s.queued, 0u);
    // Only the test's references remain; dropping them destroys every request.
    EXPECT_EQ(live() - live_before, 10);
  });
}

TEST_F(EngineTest, ErrorsAndExceptionsAreFailures) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef ok = make(1, Behaviour::ok);
    TestRef err = make(2, Behaviour::error);
    TestRef thr = make(3, Behaviour::throws);
    for (auto* r : {&ok, &err, &thr}) ASSERT_EQ(submit(m, *r), Admit::ok);
    for (auto* r : {&ok, &err, &thr}) ASSERT_TRUE(completes(*r));
    EXPECT_EQ(ok->outcome(), Outcome::ok);
    EXPECT_EQ(err->outcome(), Outcome::error);
    EXPECT_EQ(thr->outcome(), Outcome::error);
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 1u);
    EXPECT_EQ(s.failed, 2u);
    // Failed calls ran, so they have latencies too.
    EXPECT_EQ(s.compute.total, 3u);
  });
}

TEST_F(EngineTest, AdmissionBoundRejectsWithFull) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    // Not started: nothing leaves the queue, so the bound is exact.
    Model m(opts(1, 4), h);
    std::vector<TestRef> rs;
    for (int i = 0; i < 4; ++i) {
      rs.push_back(make(static_cast<uint64_t>(i)));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok) << i;
    }
    EXPECT_EQ(m.queued(), 4u);
    TestRef extra = make(99);
    EXPECT_EQ(submit(m, extra), Admit::full);
    EXPECT_EQ(submit(m, extra), Admit::full);
    EXPECT_EQ(m.queued(), 4u);
    ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, 6u);
    EXPECT_EQ(s.rejected, 2u);
    EXPECT_EQ(s.queued, 4u);
    // A rejected request is the caller's: untouched, never completed.
    EXPECT_EQ(extra->state(), RequestState::queued);
    EXPECT_EQ(extra->completions.load(), 0);

    m.close(true);
    m.join();  // no worker ever started: join cancels the queued four
    for (auto& r : rs) {
      ASSERT_TRUE(r->done());
      EXPECT_EQ(r->outcome(), Outcome::cancelled);
      EXPECT_EQ(r->completions.load(), 1);
    }
    EXPECT_EQ(extra->completions.load(), 0);
    s = m.snapshot();
    EXPECT_EQ(s.cancelled, 4u);
    EXPECT_EQ(s.queued, 0u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(h->abandons_without_worker.load(), 4);
  });
}

TEST_F(EngineTest, FreedSlotsAreAdmittedAgain) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1, 2), h);
    ASSERT_EQ(m.start(), 0u);
    // Sequential submit-then-wait never has more than one queued: the bound never refuses.
    for (int i = 0; i < 50; ++i) {
      TestRef r = make(static_cast<uint64_t>(i));
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().rejected, 0u);
    EXPECT_EQ(m.snapshot().completed, 50u);
  });
}

TEST_F(EngineTest, SubmitNIsAllOrNothing) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1, 8), h);  // not started: the queue only fills
    auto batch = [](int n, uint64_t base) {
      std::vector<TestRef> v;
      for (int i = 0; i < n; ++i) v.push_back(make(base + static_cast<uint64_t>(i)));
      return v;
    };
    const auto first = batch(5, 0);
    ASSERT_EQ(submit_all(m, first), Admit::ok);
    EXPECT_EQ(m.queued(), 5u);
    const auto too_many = batch(4, 100);
    EXPECT_EQ(submit_all(m, too_many), Admit::full);
    EXPECT_EQ(m.queued(), 5u) << "a refused batch must not leave part of itself queued";
    const auto fits = batch(3, 200);
    EXPECT_EQ(submit_all(m, fits), Admit::ok);
    EXPECT_EQ(m.queued(), 8u);
    EXPECT_EQ(m.submit_n(nullptr, 0), Admit::ok);
    ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, 12u);
    EXPECT_EQ(s.rejected, 4u);

    m.close(true);
    m.join();
    for (const auto* v : {&first, &fits}) {
      for (const auto& r : *v) {
        EXPECT_EQ(r->completions.load(), 1);
        EXPECT_EQ(r->outcome(), Outcome::cancelled);
      }
    }
    for (const auto& r : too_many) {
      EXPECT_EQ(r->completions.load(), 0);
      EXPECT_EQ(r->state(), RequestState::queued);
    }
    s = m.snapshot();
    EXPECT_EQ(s.cancelled, 8u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, ClosedModelRefusesWithClosed) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(2), h);
    ASSERT_EQ(m.start(), 0u);
    m.close(true);
    m.close(true);  // idempotent
    m.close(false);
    TestRef r = make(1);
    EXPECT_EQ(submit(m, r), Admit::closed);
    std::vector<TestRef> batch{make(2), make(3)};
    EXPECT_EQ(submit_all(m, batch), Admit::closed);
    m.join();
    m.join();  // a second join finds nothing to do
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, 3u);
    EXPECT_EQ(s.rejected, 3u);
    EXPECT_EQ(r->completions.load(), 0);
    EXPECT_EQ(h->starts.load(), 2);
    EXPECT_EQ(h->stops.load(), 2);
  });
}

TEST_F(EngineTest, DirectCallsOnlyWithNothingQueuedAndAreCountedLikeRequests) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1, 4), h);  // not started: what is submitted stays queued
    EXPECT_TRUE(m.direct_allowed());
    TestRef r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    EXPECT_FALSE(m.direct_allowed()) << "a direct call would overtake the queued request";

    const int64_t start = now_ns() - 2'000'000;  // a 2 ms call
    m.count_direct(Outcome::ok, start);
    m.count_direct(Outcome::error, now_ns());
    ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.direct, 2u);
    EXPECT_EQ(s.submitted, 3u);
    EXPECT_EQ(s.completed, 1u);
    EXPECT_EQ(s.failed, 1u);
    EXPECT_EQ(s.queue_wait.total, 2u);
    EXPECT_EQ(s.queue_wait.max, 0u);
    EXPECT_EQ(s.end_to_end.total, 2u);
    EXPECT_GE(s.end_to_end.max, 2'000'000u);
    EXPECT_EQ(s.compute.total, 2u);
    EXPECT_EQ(s.batch_size.total, 2u) << "each direct call is one model call";

    m.close(true);
    EXPECT_FALSE(m.direct_allowed());
    m.join();  // cancels the queued one
    s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_FALSE(m.direct_allowed()) << "closed";
  });
}

TEST_F(EngineTest, DirectCallsFromManyThreadsAddUp) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t) {
      ts.emplace_back([&m, t] {
        for (int i = 0; i < 500; ++i) {
          if (m.direct_allowed()) m.count_direct((i + t) % 3 == 0 ? Outcome::error : Outcome::ok, now_ns());
        }
      });
    }
    for (int i = 0; i < 200; ++i) {
      TestRef r = make(static_cast<uint64_t>(i));
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    for (auto& t : ts) t.join();
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(s.submitted, s.direct + 200u);
    EXPECT_EQ(s.end_to_end.total, s.submitted);
    EXPECT_LE(s.direct, 2000u);
  });
}

TEST_F(EngineTest, RequestPastItsDeadlineIsExpiredAndNeverRun) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef late = make(1);
    late->deadline_ns = now_ns() - 1;
    TestRef fine = make(2);
    fine->deadline_ns = now_ns() + 3'600'000'000'000LL;
    ASSERT_EQ(submit(m, late), Admit::ok);
    ASSERT_EQ(submit(m, fine), Admit::ok);
    ASSERT_TRUE(completes(late));
    ASSERT_TRUE(completes(fine));
    EXPECT_EQ(late->outcome(), Outcome::expired);
    EXPECT_EQ(late->runs.load(), 0);
    EXPECT_EQ(late->completions.load(), 1);
    EXPECT_EQ(fine->outcome(), Outcome::ok);
    EXPECT_EQ(h->runs.load(), 1);
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.completed, 1u);
    // Latency histograms describe calls that ran; the expired request is not among them.
    EXPECT_EQ(s.queue_wait.total, 1u);
    EXPECT_EQ(s.compute.total, 1u);
    EXPECT_EQ(s.end_to_end.total, 1u);
  });
}

TEST_F(EngineTest, DeadlinePassingWhileQueuedExpiresTheRequest) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    TestRef r = make(1);
    r->deadline_ns = now_ns() + 2'000'000;
    ASSERT_EQ(submit(m, r), Admit::ok);
    // Hold the only worker until the deadline has certainly passed (a condition, not a timing
    // assumption), then let it go: it must find the request expired.
    while (now_ns() <= r->deadline_ns) std::this_thread::sleep_for(1ms);
    gate.open();
    ASSERT_TRUE(completes(r));
    EXPECT_EQ(r->outcome(), Outcome::expired);
    EXPECT_EQ(r->runs.load(), 0);
    EXPECT_GT(r->start_ns, r->deadline_ns);  // stamped when the worker found it expired
    m.close(true);
    m.join();
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, CancelOfQueuedRequestLeavesATombstone) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef running = make(0);
    ASSERT_EQ(submit(m, running), Admit::ok);
    gate.wait_arrivals(1);
    TestRef victim = make(1);
    TestRef after = make(2);
    ASSERT_EQ(submit(m, victim), Admit::ok);
    ASSERT_EQ(submit(m, after), Admit::ok);

    EXPECT_FALSE(m.cancel(running.get())) << "a running request cannot be cancelled";
    EXPECT_TRUE(m.cancel(victim.get()));
    // Completed at once, in this thread, before any worker sees it.
    EXPECT_TRUE(victim->done());
    EXPECT_EQ(victim->outcome(), Outcome::cancelled);
    EXPECT_EQ(victim->completions.load(), 1);
    EXPECT_EQ(h->abandons_without_worker.load(), 1);
    EXPECT_FALSE(m.cancel(victim.get())) << "cancel succeeds once";
    EXPECT_EQ(m.counters()->cancelled.load(), 1u);
    // The tombstone still holds its queue slot until a worker pops it.
    EXPECT_EQ(m.queued(), 2u);

    gate.open();
    ASSERT_TRUE(completes(running));
    ASSERT_TRUE(completes(after));
    m.close(true);
    m.join();
    EXPECT_EQ(victim->runs.load(), 0);
    EXPECT_EQ(victim->completions.load(), 1) << "the worker must discard the tombstone";
    EXPECT_EQ(h->runs.load(), 2);
    EXPECT_EQ(h->abandons.load(), 1);
    EXPECT_FALSE(m.cancel(after.get())) << "a completed request cannot be cancelled";
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.queued, 0u);
    EXPECT_EQ(s.cancelled, 1u);
    EXPECT_EQ(s.completed, 2u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, CloseWithDrainFinishesQueuedWork) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs{make(0)};
    ASSERT_EQ(submit(m, rs[0]), Admit::ok);
    gate.wait_arrivals(1);
    for (uint64_t i = 1; i <= 5; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    m.close(true);
    TestRef refused = make(9);
    EXPECT_EQ(submit(m, refused), Admit::closed);
    gate.open();
    m.join();
    for (auto& r : rs) {
      ASSERT_TRUE(r->done()) << r->tag;
      EXPECT_EQ(r->outcome(), Outcome::ok) << r->tag;
      EXPECT_EQ(r->completions.load(), 1);
    }
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 6u);
    EXPECT_EQ(s.rejected, 1u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, CloseWithoutDrainCancelsQueuedAndFinishesRunning) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef running = make(0);
    ASSERT_EQ(submit(m, running), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> queued;
    for (uint64_t i = 1; i <= 5; ++i) {
      queued.push_back(make(i));
      ASSERT_EQ(submit(m, queued.back()), Admit::ok);
    }
    m.close(false);
    gate.open();
    m.join();
    ASSERT_TRUE(running->done());
    EXPECT_EQ(running->outcome(), Outcome::ok) << "a running call finishes";
    for (auto& r : queued) {
      ASSERT_TRUE(r->done()) << r->tag;
      EXPECT_EQ(r->outcome(), Outcome::cancelled) << r->tag;
      EXPECT_EQ(r->runs.load(), 0);
      EXPECT_EQ(r->completions.load(), 1);
    }
    EXPECT_EQ(h->runs.load(), 1);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 1u);
    EXPECT_EQ(s.cancelled, 5u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, StartFailuresAreCountedAndJoinCancelsLeftovers) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    h->on_start = [](Worker&) { return false; };
    Model m(opts(3), h);
    EXPECT_EQ(m.start(), 3u);
    EXPECT_EQ(m.start(), 0u) << "start() runs once";
    EXPECT_EQ(h->starts.load(), 3);
    // Admission does not know that nobody serves: requests queue up...
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 4; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    m.close(true);
    m.join();  // ...and join, finding no worker to drain them, cancels them.
    for (auto& r : rs) {
      ASSERT_TRUE(r->done());
      EXPECT_EQ(r->outcome(), Outcome::cancelled);
      EXPECT_EQ(r->completions.load(), 1);
    }
    EXPECT_EQ(h->runs.load(), 0);
    EXPECT_EQ(h->stops.load(), 0) << "a worker that failed to start never stops";
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.cancelled, 4u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, PartialStartFailureStillServes) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    h->on_start = [](Worker& w) { return w.index != 0; };
    h->on_run = [](Worker& w, TestRequest&) {
      EXPECT_EQ(w.index, 1u);
      return Outcome::ok;
    };
    Model m(opts(2), h);
    EXPECT_EQ(m.start(), 1u);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 20; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().completed, 20u);
    EXPECT_EQ(h->stops.load(), 1);
  });
}

TEST_F(EngineTest, DestructorCancelsWhatItWasNeverAskedToRun) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    std::vector<TestRef> rs;
    std::shared_ptr<apportion::ModelCounters> counters;
    {
      Model m(opts(2), h);  // never started, closed or joined
      counters = m.counters();
      for (uint64_t i = 0; i < 3; ++i) {
        rs.push_back(make(i));
        ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      }
    }
    for (auto& r : rs) {
      ASSERT_TRUE(r->done());
      EXPECT_EQ(r->outcome(), Outcome::cancelled);
      EXPECT_EQ(r->completions.load(), 1);
    }
    // Counters outlive their model (requests share them).
    EXPECT_EQ(counters->cancelled.load(), 3u);
  });
}

TEST_F(EngineTest, DestructorOfStartedModelStopsWorkers) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    TestRef r = make(1);
    {
      Model m(opts(2), h);
      ASSERT_EQ(m.start(), 0u);
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    EXPECT_EQ(h->stops.load(), 2);
  });
}

TEST_F(EngineTest, SnapshotCountsAddUpWhileWorkIsInFlight) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1, 8), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> keep;
    auto add = [&](uint64_t tag, Behaviour b = Behaviour::ok) {
      keep.push_back(make(tag, b));
      return submit(m, keep.back());
    };
    // Finished work of every kind first.
    ASSERT_EQ(add(1), Admit::ok);
    ASSERT_EQ(add(2, Behaviour::error), Admit::ok);
    keep.push_back(make(3));
    keep.back()->deadline_ns = now_ns() - 1;
    ASSERT_EQ(submit(m, keep.back()), Admit::ok);
    for (auto& r : keep) ASSERT_TRUE(completes(r));
    // Then hold one running and queue more, cancel one, and overflow the bound.
    ASSERT_EQ(add(0), Admit::ok);
    gate.wait_arrivals(1);
    for (uint64_t i = 10; i < 18; ++i) ASSERT_EQ(add(i), Admit::ok);  // fills max_queue = 8
    ASSERT_EQ(add(99), Admit::full);
    ASSERT_TRUE(m.cancel(keep[4].get()));

    ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, 13u);
    EXPECT_EQ(s.completed, 1u);
    EXPECT_EQ(s.failed, 1u);
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.rejected, 1u);
    EXPECT_EQ(s.cancelled, 1u);
    EXPECT_EQ(s.queued, 8u);  // seven live and one tombstone
    const uint64_t in_flight = 1 /*running*/ + 7 /*queued, live*/;
    EXPECT_EQ(s.submitted, accounted(s) + in_flight);
    EXPECT_EQ(s.queue_wait.total, 2u);
    EXPECT_EQ(s.compute.total, 2u);
    EXPECT_EQ(s.end_to_end.total, 2u);

    gate.open();
    m.close(true);
    m.join();
    s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(s.completed, 9u);
    EXPECT_EQ(s.queue_wait.total, s.completed + s.failed);
    EXPECT_EQ(s.compute.total, s.completed + s.failed);
    EXPECT_EQ(s.end_to_end.total, s.completed + s.failed);
    // End-to-end covers queue wait plus compute, so its maximum is at least each of theirs.
    EXPECT_GE(s.end_to_end.max, s.compute.max);
    EXPECT_GE(s.end_to_end.max, s.queue_wait.max);
    EXPECT_GT(s.end_to_end.max, 0u);
  });
}

TEST_F(EngineTest, ShardsOfEveryWorkerAreMerged) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> per_worker[2] = {0, 0};
    Gate gate;
    // Both workers must each take one request: the first two block until both have arrived.
    h->on_run = [&](Worker& w, TestRequest& r) {
      per_worker[w.index].fetch_add(1);
      if (r.tag < 2) {
        gate.arrive();
        gate.wait_arrivals(2);
      }
      return Outcome::ok;
    };
    Model m(opts(2), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 10; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_GE(per_worker[0].load(), 1);
    EXPECT_GE(per_worker[1].load(), 1);
    EXPECT_EQ(m.snapshot().end_to_end.total, 10u);
  });
}

TEST_F(EngineTest, CompleteWithoutShardCountsButRecordsNoLatency) {
  auto counters = std::make_shared<apportion::ModelCounters>("direct");
  TestRef r = make(1);
  r->counters = counters;
  ASSERT_TRUE(r->try_claim(RequestState::running));
  Model::complete(*r, Outcome::ok, nullptr);
  EXPECT_TRUE(r->done());
  EXPECT_EQ(r->outcome(), Outcome::ok);
  EXPECT_GT(r->end_ns, 0);
  EXPECT_EQ(counters->completed.load(), 1u);

  // A request with no model counters can still be completed.
  TestRef orphan = make(2);
  ASSERT_TRUE(orphan->try_claim(RequestState::claimed));
  Model::complete(*orphan, Outcome::cancelled, nullptr);
  EXPECT_TRUE(orphan->done());
}

TEST_F(EngineTest, WaitDoneTimesOutThenSeesACompletion) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = [&](Worker&, TestRequest&) {
      gate.arrive();
      gate.wait();
      return Outcome::ok;
    };
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    gate.wait_arrivals(1);
    EXPECT_FALSE(r->wait_done(1'000'000)) << "still running: the wait must time out";
    EXPECT_EQ(r->state(), RequestState::running);
    std::thread opener([&] {
      std::this_thread::sleep_for(5ms);
      gate.open();
    });
    EXPECT_TRUE(r->wait_done(-1, 0));
    EXPECT_EQ(r->outcome(), Outcome::ok);
    opener.join();
    m.close(true);
    m.join();
  });
}

// ---------------------------------------------------------------------------------------------
// Priority lanes, the delay policy and dynamic batching.

// A handler whose first call (tag 0) blocks on a gate, recording every call's tags in order.
struct Recorder {
  std::mutex mu;
  std::vector<std::vector<uint64_t>> calls;  // tags of each model call, in call order
  std::vector<uint64_t> order() {
    std::lock_guard lock(mu);
    std::vector<uint64_t> out;
    for (auto& c : calls) out.insert(out.end(), c.begin(), c.end());
    return out;
  }
  std::vector<std::size_t> sizes() {
    std::lock_guard lock(mu);
    std::vector<std::size_t> out;
    for (auto& c : calls) out.push_back(c.size());
    return out;
  }
};

std::shared_ptr<TestHandler> recording_handler(Recorder& rec, Gate* gate,
                                               std::chrono::milliseconds per_call = 0ms) {
  auto h = std::make_shared<TestHandler>();
  h->on_batch = [&rec, gate, per_call](Worker&, Request* const* b, std::size_t n) {
    std::vector<uint64_t> tags;
    for (std::size_t i = 0; i < n; ++i) tags.push_back(static_cast<TestRequest*>(b[i])->tag);
    {
      std::lock_guard lock(rec.mu);
      rec.calls.push_back(tags);
    }
    if (gate != nullptr && tags.front() == 0) {
      gate->arrive();
      gate->wait();
    }
    if (per_call > 0ms) std::this_thread::sleep_for(per_call);
  };
  return h;
}

TEST_F(EngineTest, HighestPriorityLaneIsServedFirst) {
  guarded(30s, [] {
    Recorder rec;
    Gate gate;
    auto h = recording_handler(rec, &gate);
    ModelOptions o = opts(1);
    o.priority_levels = 3;
    Model m(o, h);
    EXPECT_EQ(m.lanes(), 3u);
    ASSERT_EQ(m.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    // Queued behind the blocker: priorities 2,1,0,2,1,0,... and one out of range (clamped to
    // the lowest level).
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 9; ++i) {
      rs.push_back(make(i));
      rs.back()->priority = static_cast<uint32_t>(2 - (i - 1) % 3);
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    rs.push_back(make(10));
    rs.back()->priority = 77;
    ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    gate.open();
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    // Level 0 first, then 1, then 2 (FIFO within a level), the clamped one last.
    EXPECT_EQ(rec.order(), (std::vector<uint64_t>{0, 3, 6, 9, 2, 5, 8, 1, 4, 7, 10}));
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, MaxQueueBoundsAllLanesTogether) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(1, 4);
    o.priority_levels = 4;
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);  // not started: the bound is exact
    EXPECT_EQ(m.lanes(), 5u) << "four levels and the delayed lane";
    std::vector<TestRef> rs;
    for (uint32_t i = 0; i < 4; ++i) {
      rs.push_back(make(i));
      rs.back()->priority = i;
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    TestRef extra = make(9);
    extra->priority = 0;
    EXPECT_EQ(submit(m, extra), Admit::full);
    EXPECT_EQ(m.queued(), 4u);
    m.close(true);
    m.join();
    for (auto& r : rs) EXPECT_EQ(r->outcome(), Outcome::cancelled);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, DelayPolicyRunsExpiredRequestsAfterEverythingElse) {
  guarded(30s, [] {
    Recorder rec;
    Gate gate;
    auto h = recording_handler(rec, &gate);
    ModelOptions o = opts(1);
    o.priority_levels = 2;
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    TestRef late = make(1);  // top priority, but expires while queued
    late->deadline_ns = now_ns() + 2'000'000;
    TestRef low = make(2);
    low->priority = 1;
    TestRef high = make(3);
    TestRef gone = make(4);  // expires, then is cancelled while delayed or queued
    gone->deadline_ns = now_ns() + 2'000'000;
    for (auto* r : {&late, &low, &high, &gone}) ASSERT_EQ(submit(m, *r), Admit::ok);
    while (now_ns() <= gone->deadline_ns || now_ns() <= late->deadline_ns) std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(m.cancel(gone.get()));
    gate.open();
    for (auto* r : {&late, &low, &high, &gone}) ASSERT_TRUE(completes(*r));
    m.close(true);
    m.join();
    EXPECT_EQ(late->outcome(), Outcome::ok) << "a delayed request still runs";
    EXPECT_EQ(late->runs.load(), 1);
    EXPECT_EQ(late->completions.load(), 1);
    EXPECT_EQ(gone->outcome(), Outcome::cancelled);
    EXPECT_EQ(gone->completions.load(), 1);
    EXPECT_EQ(gone->runs.load(), 0);
    EXPECT_EQ(rec.order(), (std::vector<uint64_t>{0, 3, 2, 1}));
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 0u);
    EXPECT_EQ(s.completed, 4u);
    EXPECT_EQ(s.cancelled, 1u);
    EXPECT_GE(s.delayed, 1u);
    EXPECT_EQ(s.queued, 0u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, DelayedRequestsAreCancelledByACloseWithoutDrain) {
  guarded(30s, [] {
    Recorder rec;
    Gate gate;
    auto h = recording_handler(rec, &gate);
    ModelOptions o = opts(1);
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 4; ++i) {
      rs.push_back(make(i));
      rs.back()->deadline_ns = now_ns() + 1'000'000;
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    while (now_ns() <= rs.back()->deadline_ns) std::this_thread::sleep_for(1ms);
    m.close(false);
    gate.open();
    m.join();
    for (auto& r : rs) {
      EXPECT_EQ(r->outcome(), Outcome::cancelled);
      EXPECT_EQ(r->completions.load(), 1);
    }
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(s.queued, 0u);
  });
}

ModelOptions batching_opts(std::size_t max_size, int64_t max_delay_ns,
                           std::vector<std::size_t> preferred = {}) {
  ModelOptions o = opts(1);
  o.batching = BatchingOptions{max_size, max_delay_ns, std::move(preferred)};
  return o;
}

TEST_F(EngineTest, BatchesAreFormedUpToMaxSizeInPriorityOrder) {
  guarded(30s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr);
    ModelOptions o = batching_opts(4, 20'000'000);
    o.priority_levels = 2;
    Model m(o, h);
    // Queued before start: the worker finds all ten at once.
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 10; ++i) {
      rs.push_back(make(i));
      rs.back()->priority = i % 2 == 0 ? 0 : 1;
    }
    ASSERT_EQ(submit_all(m, rs), Admit::ok);
    ASSERT_EQ(m.start(), 0u);
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{4, 4, 2}));
    EXPECT_EQ(rec.order(), (std::vector<uint64_t>{2, 4, 6, 8, 10, 1, 3, 5, 7, 9}));
    for (auto& r : rs) {
      EXPECT_EQ(r->outcome(), Outcome::ok);
      EXPECT_EQ(r->completions.load(), 1);
    }
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.batch_size.total, 3u);
    EXPECT_EQ(s.batch_size.sum, 10u);
    EXPECT_EQ(s.batch_size.max, 4u);
    EXPECT_EQ(s.end_to_end.total, 10u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, PartialBatchWaitsForMaxDelayThenRuns) {
  guarded(30s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr);
    constexpr int64_t kDelay = 30'000'000;
    Model m(batching_opts(8, kDelay), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef lone = make(1);
    ASSERT_EQ(submit(m, lone), Admit::ok);
    ASSERT_TRUE(completes(lone)) << "a lone request is served after max_delay, not never";
    EXPECT_EQ(lone->outcome(), Outcome::ok);
    // It waited for company: the worker dispatched it no earlier than max_delay after taking it.
    EXPECT_GE(lone->start_ns - lone->submit_ns, kDelay);
    // A request arriving while the batch waits joins it.
    TestRef a = make(2);
    ASSERT_EQ(submit(m, a), Admit::ok);
    std::this_thread::sleep_for(2ms);
    TestRef b = make(3);
    ASSERT_EQ(submit(m, b), Admit::ok);
    ASSERT_TRUE(completes(a));
    ASSERT_TRUE(completes(b));
    m.close(true);
    m.join();
    const auto sizes = rec.sizes();
    ASSERT_EQ(sizes.size(), 2u);
    EXPECT_EQ(sizes[1], 2u) << "a request that arrives within max_delay joins the batch";
  });
}

TEST_F(EngineTest, PreferredSizeDispatchesWithoutWaiting) {
  guarded(30s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr);
    // max_delay of an hour: only the preferred size can let these batches go.
    Model m(batching_opts(8, 3'600'000'000'000LL, {2, 5}), h);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 7; ++i) rs.push_back(make(i));
    ASSERT_EQ(submit_all(m, rs), Admit::ok);
    ASSERT_EQ(m.start(), 0u);
    // Seven queued: the batch grows past 2 and 5 while more is queued, stops at 7 (not
    // preferred) and would wait, so close() must end that wait: with the queue empty and the
    // model closed, the worker dispatches what it holds.
    std::vector<TestRef> two{make(10), make(11)};
    while (rec.sizes().empty() && m.queued() != 0) std::this_thread::sleep_for(1ms);
    m.close(true);
    m.join();
    for (auto& r : rs) EXPECT_EQ(r->outcome(), Outcome::ok);
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{7}));

    Recorder rec2;
    auto h2 = recording_handler(rec2, nullptr);
    Model m2(batching_opts(8, 3'600'000'000'000LL, {2, 5}), h2);
    ASSERT_EQ(submit_all(m2, two), Admit::ok);
    ASSERT_EQ(m2.start(), 0u);
    for (auto& r : two) ASSERT_TRUE(completes(r)) << "a preferred size goes without max_delay";
    EXPECT_EQ(rec2.sizes(), (std::vector<std::size_t>{2}));
    m2.close(true);
    m2.join();
  });
}

TEST_F(EngineTest, BatchingKeepsRequestsOutOfBatchesThatFinishTooLate) {
  guarded(60s, [] {
    Recorder rec;
    // Every call takes at least 100 ms: after one, the worker estimates a call of one request
    // at >= 100 ms and (scaled, never having seen one) a call of two at >= 200 ms.
    auto h = recording_handler(rec, nullptr, 100ms);
    Model m(batching_opts(4, 0), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef warm = make(1);
    ASSERT_EQ(submit(m, warm), Admit::ok);
    ASSERT_TRUE(completes(warm));

    // 50 ms left: not expired yet, but no call can finish in time: expired, never run.
    TestRef hopeless = make(2);
    hopeless->deadline_ns = now_ns() + 50'000'000;
    ASSERT_EQ(submit(m, hopeless), Admit::ok);
    ASSERT_TRUE(completes(hopeless));
    EXPECT_EQ(hopeless->outcome(), Outcome::expired);
    EXPECT_EQ(hopeless->runs.load(), 0);
    EXPECT_LE(hopeless->start_ns, hopeless->deadline_ns) << "expired before its deadline passed";

    // 170 ms left: a call of one fits, a call of two does not. The second request must not
    // share its batch; it opens the next one.
    TestRef tight = make(3);
    TestRef loose = make(4);
    tight->deadline_ns = now_ns() + 170'000'000;
    ASSERT_EQ(submit_all(m, {tight, loose}), Admit::ok);
    ASSERT_TRUE(completes(tight));
    ASSERT_TRUE(completes(loose));
    EXPECT_EQ(tight->outcome(), Outcome::ok);
    EXPECT_EQ(loose->outcome(), Outcome::ok);
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{1, 1, 1}));
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.completed, 3u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, BatchingWithDelayRunsHopelessRequestsLast) {
  guarded(60s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr, 50ms);
    ModelOptions o = batching_opts(4, 0);
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef warm = make(1);
    ASSERT_EQ(submit(m, warm), Admit::ok);
    ASSERT_TRUE(completes(warm));
    TestRef hopeless = make(2);
    hopeless->deadline_ns = now_ns() + 10'000'000;
    ASSERT_EQ(submit(m, hopeless), Admit::ok);
    ASSERT_TRUE(completes(hopeless));
    EXPECT_EQ(hopeless->outcome(), Outcome::ok) << "delayed, then run";
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.delayed, 1u);
    EXPECT_EQ(s.expired, 0u);
    EXPECT_EQ(s.completed, 2u);
  });
}

TEST_F(EngineTest, RequestCancelledWhileItsBatchFormsCompletesOnce) {
  guarded(30s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr);
    Model m(batching_opts(8, 200'000'000), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef a = make(1);
    TestRef b = make(2);
    ASSERT_EQ(submit_all(m, {a, b}), Admit::ok);
    // Both wait in the forming batch (max_delay 200 ms), still cancellable.
    while (m.queued() != 0) std::this_thread::yield();
    EXPECT_TRUE(m.cancel(b.get()));
    ASSERT_TRUE(completes(a));
    m.close(true);
    m.join();
    EXPECT_EQ(a->outcome(), Outcome::ok);
    EXPECT_EQ(b->outcome(), Outcome::cancelled);
    EXPECT_EQ(b->completions.load(), 1);
    EXPECT_EQ(b->runs.load(), 0);
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{1}));
  });
}

TEST_F(EngineTest, CloseWithoutDrainCancelsAFormingBatch) {
  guarded(30s, [] {
    Recorder rec;
    auto h = recording_handler(rec, nullptr);
    Model m(batching_opts(8, 3'600'000'000'000LL), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs{make(1), make(2), make(3)};
    ASSERT_EQ(submit_all(m, rs), Admit::ok);
    while (m.queued() != 0) std::this_thread::yield();
    m.close(false);
    m.join();
    for (auto& r : rs) {
      EXPECT_EQ(r->outcome(), Outcome::cancelled);
      EXPECT_EQ(r->completions.load(), 1);
    }
    EXPECT_TRUE(rec.sizes().empty());
  });
}

TEST(WorkerEstimate, UsesObservedSizesAndScalesUnknownOnes) {
  Worker w;
  w.batch_cost_ns.assign(9, 0);
  EXPECT_EQ(w.estimate_ns(3), 0) << "nothing observed";
  w.observe(2, 1000);
  EXPECT_EQ(w.estimate_ns(2), 1000);
  EXPECT_EQ(w.estimate_ns(4), 2000) << "scaled up from the nearest smaller size";
  EXPECT_EQ(w.estimate_ns(1), 1000) << "a smaller size borrows the nearest larger one";
  w.observe(2, 2000);
  EXPECT_EQ(w.estimate_ns(2), 1250) << "EWMA, weight 1/4";
  EXPECT_EQ(w.estimate_ns(100), 62500) << "beyond the table: scaled";
}

// ---------------------------------------------------------------------------------------------
// Tier 2: multi-threaded fuzz. Tagged requests from four producers, a canceller, short
// deadlines, failing calls, and a close() part-way through; then every request is checked.

struct FuzzParams {
  bool drain;
  uint32_t instances;
  bool batches;  // also submit with submit_n (all-or-nothing batches racing the close)
  uint32_t levels = 1;         // priority lanes (requests also carry out-of-range priorities)
  std::size_t batch_size = 1;  // dynamic batching when > 1
  bool delay = false;          // on_timeout=delay
};

class EngineFuzz : public EngineTest, public ::testing::WithParamInterface<FuzzParams> {};

TEST_P(EngineFuzz, EveryRequestCompletesExactlyOnce) {
  const FuzzParams p = GetParam();
  constexpr int kProducers = 4;
  const int per_producer = kSanitized ? 600 : 4000;
  const std::size_t total = static_cast<std::size_t>(kProducers) * per_producer;

  const int64_t live_before = live();
  guarded(120s, [&] {
    auto h = std::make_shared<TestHandler>();
    h->on_run = [](Worker&, TestRequest& r) {
      // A little work so queues build up and closes/cancels meet queued requests.
      volatile uint64_t x = r.tag;
      for (int i = 0; i < 50; ++i) x = x * 31 + 7;
      return Outcome::ok;
    };
    ModelOptions o = opts(p.instances, 256);
    o.priority_levels = p.levels;
    o.on_timeout = p.delay ? OnTimeout::delay : OnTimeout::reject;
    o.batching.max_size = p.batch_size;
    o.batching.max_delay_ns = 50'000;
    if (p.batch_size > 2) o.batching.preferred_sizes = {2};
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);

    // Everything is created up front so the canceller can index it without locks.
    std::vector<TestRef> reqs;
    std::vector<uint8_t> has_deadline(total, 0);
    reqs.reserve(total);
    std::mt19937_64 setup_rng(static_cast<uint64_t>(p.instances) * 2 + p.drain);
    for (std::size_t i = 0; i < total; ++i) {
      const auto roll = setup_rng() % 100;
      const Behaviour b = roll < 5 ? Behaviour::throws : roll < 10 ? Behaviour::error : Behaviour::ok;
      reqs.push_back(make(i, b));
      reqs.back()->priority = static_cast<uint32_t>(setup_rng() % (p.levels + 1));
      has_deadline[i] = setup_rng() % 10 == 0;
    }
    std::unique_ptr<std::atomic<uint8_t>[]> admitted(new std::atomic<uint8_t>[total]);
    for (std::size_t i = 0; i < total; ++i) admitted[i].store(0);

    std::atomic<std::size_t> attempts{0};
    std::atomic<bool> close_done{false};
    std::atomic<int> producers_done{0};
    std::atomic<uint64_t> cancelled_by_caller{0};
    std::atomic<uint64_t> rejected_full{0}, rejected_closed{0};

    std::vector<std::thread> threads;
    for (int t = 0; t < kProducers; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<uint64_t>(t) + 1000);
        const std::size_t begin = static_cast<std::size_t>(t) * per_producer;
        const std::size_t end = begin + per_producer;
        std::size_t i = begin;
        while (i < end) {
          // Past 60% of its share, a producer waits for the close: it then surely lands while
          // every producer is still submitting (however the threads are scheduled).
          if (i >= begin + static_cast<std::size_t>(per_producer) * 3 / 5) {
            while (!close_done.load()) std::this_thread::yield();
          }
          // Mostly single submits, sometimes a batch (all-or-nothing) of up to 8.
          const std::size_t n = p.batches && rng() % 4 == 0 ? std::min<std::size_t>(1 + rng() % 8, end - i) : 1;
          std::vector<Request*> raw;
          for (std::size_t k = i; k < i + n; ++k) {
            if (has_deadline[k]) reqs[k]->deadline_ns = now_ns() + static_cast<int64_t>(rng() % 200'000);
            reqs[k]->add_ref();
            raw.push_back(reqs[k].get());
          }
          const Admit a = n == 1 ? m.submit(raw[0]) : m.submit_n(raw.data(), n);
          if (a == Admit::ok) {
            for (std::size_t k = i; k < i + n; ++k) admitted[k].store(1, std::memory_order_release);
          } else {
            for (Request* r : raw) Request::release(r);
            (a == Admit::full ? rejected_full : rejected_closed).fetch_add(n);
            for (std::size_t k = i; k < i + n; ++k) admitted[k].store(2, std::memory_order_release);
          }
          attempts.fetch_add(n);
          i += n;
          if (rng() % 64 == 0) std::this_thread::yield();
        }
        producers_done.fetch_add(1);
      });
    }
    threads.emplace_back([&] {
      std::mt19937_64 rng(77);
      while (producers_done.load() < kProducers) {
        const std::size_t i = rng() % total;
        if (admitted[i].load(std::memory_order_acquire) == 1 && m.cancel(reqs[i].get())) {
          cancelled_by_caller.fetch_add(1);
        }
        if (rng() % 16 == 0) std::this_thread::yield();
      }
    });
    // Snapshot reader: counts never show more outcomes than submissions.
    std::atomic<int> snapshot_violations{0};
    threads.emplace_back([&] {
      while (producers_done.load() < kProducers) {
        const ModelSnapshot s = m.snapshot();
        if (accounted(s) > s.submitted) snapshot_violations.fetch_add(1);
        std::this_thread::sleep_for(200us);
      }
    });

    while (attempts.load() < total * 2 / 5) std::this_thread::yield();
    m.close(p.drain);
    close_done.store(true);
    for (auto& th : threads) th.join();
    m.join();

    // Every request, by tag.
    uint64_t n_ok = 0, n_error = 0, n_expired = 0, n_cancelled = 0, n_admitted = 0, n_rejected = 0;
    for (std::size_t i = 0; i < total; ++i) {
      const TestRequest& r = *reqs[i];
      ASSERT_EQ(r.tag, i);
      const uint8_t adm = admitted[i].load();
      ASSERT_NE(adm, 0) << "request " << i << " was never submitted";
      if (adm == 2) {
        ++n_rejected;
        ASSERT_EQ(r.completions.load(), 0) << "rejected request " << i << " was completed";
        ASSERT_EQ(r.runs.load(), 0) << "rejected request " << i << " ran";
        ASSERT_FALSE(r.done());
        continue;
      }
      ++n_admitted;
      ASSERT_EQ(r.completions.load(), 1) << "request " << i << " completed "
                                         << r.completions.load() << " times";
      ASSERT_TRUE(r.done()) << "request " << i << " lost";
      ASSERT_LE(r.runs.load(), 1) << "request " << i << " ran twice";
      switch (r.outcome()) {
        case Outcome::ok:
          ++n_ok;
          ASSERT_EQ(r.runs.load(), 1);
          ASSERT_EQ(r.behaviour, Behaviour::ok) << i;
          break;
        case Outcome::error:
          ++n_error;
          ASSERT_EQ(r.runs.load(), 1);
          ASSERT_NE(r.behaviour, Behaviour::ok) << i;
          break;
        case Outcome::expired:
          ++n_expired;
          ASSERT_EQ(r.runs.load(), 0);
          ASSERT_TRUE(has_deadline[i]) << "request " << i << " expired without a deadline";
          ASSERT_FALSE(p.delay) << "request " << i << " expired under on_timeout=delay";
          break;
        case Outcome::cancelled:
          ++n_cancelled;
          ASSERT_EQ(r.runs.load(), 0);
          break;
        default:
          FAIL() << "request " << i << " has outcome " << static_cast<int>(r.outcome());
      }
    }
    EXPECT_EQ(n_ok + n_error + n_expired + n_cancelled, n_admitted);
    EXPECT_EQ(n_admitted + n_rejected, total);
    EXPECT_EQ(n_rejected, rejected_full.load() + rejected_closed.load());
    EXPECT_GT(rejected_closed.load(), 0u) << "the close lands before the producers finish";
    if (p.drain) {
      EXPECT_EQ(n_cancelled, cancelled_by_caller.load()) << "drain cancels nothing itself";
    } else {
      EXPECT_GE(n_cancelled, cancelled_by_caller.load());
    }

    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, total);
    EXPECT_EQ(s.completed, n_ok);
    EXPECT_EQ(s.failed, n_error);
    EXPECT_EQ(s.expired, n_expired);
    EXPECT_EQ(s.cancelled, n_cancelled);
    EXPECT_EQ(s.rejected, n_rejected);
    EXPECT_EQ(s.queued, 0u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(s.end_to_end.total, n_ok + n_error);
    EXPECT_EQ(snapshot_violations.load(), 0);
    EXPECT_EQ(h->bad_state.load(), 0);
    EXPECT_EQ(h->runs.load(), static_cast<int>(n_ok + n_error));
    EXPECT_EQ(h->stops.load(), static_cast<int>(p.instances));
    // One batch-size sample per model call, adding up to the requests that ran.
    EXPECT_EQ(s.batch_size.total, static_cast<uint64_t>(h->calls.load()));
    EXPECT_EQ(s.batch_size.sum, n_ok + n_error);
    EXPECT_LE(s.batch_size.max, p.batch_size);

    // Only the test's references remain.
    EXPECT_EQ(live() - live_before, static_cast<int64_t>(total));
    reqs.clear();
    EXPECT_EQ(live(), live_before);
  });
}

INSTANTIATE_TEST_SUITE_P(CloseModes, EngineFuzz,
                         ::testing::Values(FuzzParams{true, 2, false}, FuzzParams{false, 2, false},
                                           FuzzParams{true, 4, false}, FuzzParams{false, 4, false},
                                           FuzzParams{true, 2, true}, FuzzParams{false, 2, true},
                                           FuzzParams{true, 4, true}, FuzzParams{false, 4, true},
                                           FuzzParams{true, 2, true, 3, 1, false},
                                           FuzzParams{false, 2, true, 3, 1, true},
                                           FuzzParams{true, 2, true, 3, 1, true},
                                           FuzzParams{true, 3, true, 3, 8, false},
                                           FuzzParams{false, 3, true, 3, 8, false},
                                           FuzzParams{true, 3, true, 3, 8, true},
                                           FuzzParams{false, 3, true, 3, 8, true},
                                           FuzzParams{true, 1, false, 1, 4, true}),
                         [](const ::testing::TestParamInfo<FuzzParams>& param_info) {
                           const FuzzParams& q = param_info.param;
                           std::string name = std::string(q.drain ? "Drain" : "Cancel") +
                                              std::to_string(q.instances) + "Instances" +
                                              (q.batches ? "Batches" : "");
                           if (q.levels > 1) name += std::to_string(q.levels) + "Levels";
                           if (q.batch_size > 1) name += "Batch" + std::to_string(q.batch_size);
                           if (q.delay) name += "Delay";
                           return name;
                         });

TEST_F(EngineTest, SubmitNRacingCloseIsAllOrNothing) {
  // A batch admitted with `ok` must be queued whole, even when close() lands between two of its
  // pushes: its requests are then completed (here by join, as no worker runs), never dropped.
  // A refused batch is left entirely to its caller.
  const int rounds = kSanitized ? 100 : 1000;
  constexpr std::size_t kBatch = 64;
  guarded(60s, [&] {
    int partial = 0;
    for (int round = 0; round < rounds; ++round) {
      auto h = std::make_shared<TestHandler>();
      Model m(opts(1, 16 * kBatch), h);  // never started: join completes what was queued
      std::vector<std::vector<TestRef>> batches(16);
      std::vector<Admit> results(batches.size(), Admit::full);
      std::atomic<bool> go{false};
      std::thread submitter([&] {
        while (!go.load()) std::this_thread::yield();
        for (std::size_t b = 0; b < batches.size(); ++b) {
          for (std::size_t i = 0; i < kBatch; ++i) batches[b].push_back(make(b * kBatch + i));
          results[b] = submit_all(m, batches[b]);
        }
      });
      go.store(true);
      if (round % 2) std::this_thread::yield();
      m.close(true);
      submitter.join();
      m.join();
      for (std::size_t b = 0; b < batches.size(); ++b) {
        int completed = 0;
        for (const auto& r : batches[b]) completed += r->completions.load();
        if (completed != 0 && completed != static_cast<int>(kBatch)) ++partial;
        const int want = results[b] == Admit::ok ? static_cast<int>(kBatch) : 0;
        ASSERT_EQ(completed, want) << "round " << round << " batch " << b << " admitted as "
                                   << static_cast<int>(results[b]) << " but " << completed
                                   << " of " << kBatch << " requests completed";
      }
      const ModelSnapshot s = m.snapshot();
      ASSERT_EQ(s.submitted, accounted(s));
    }
    EXPECT_EQ(partial, 0);
  });
}

// ---------------------------------------------------------------------------------------------
// Tier 3: deadlock guards for the shutdown paths most likely to hang.

TEST_F(EngineTest, CloseWakesIdleParkedWorkers) {
  guarded(30s, [] {
    for (int round = 0; round < (kSanitized ? 5 : 20); ++round) {
      auto h = std::make_shared<TestHandler>();
      ModelOptions o = opts(4);
      o.spin_ns = 0;  // park at once: the close must wake sleepers, not spinners
      Model m(o, h);
      ASSERT_EQ(m.start(), 0u);
      if (round % 2) std::this_thread::sleep_for(1ms);
      m.close(round % 4 < 2);
      m.join();
      EXPECT_EQ(h->stops.load(), 4);
    }
  });
}

TEST_F(EngineTest, ParkedWorkersWakeForEachSubmission) {
  // With no spinning, every request is a sleep/wake hand-off; a lost wake-up hangs here.
  guarded(60s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(2);
    o.spin_ns = 0;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    const int n = kSanitized ? 300 : 3000;
    for (int i = 0; i < n; ++i) {
      TestRef r = make(static_cast<uint64_t>(i));
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().completed, static_cast<uint64_t>(n));
  });
}

TEST_F(EngineTest, ParkedWorkersWakeForAPushToAnyLane) {
  // One event count per model: a submission to any priority lane (and a batching worker's
  // timed wait) must wake a parked worker. A lost wake-up hangs here.
  guarded(60s, [] {
    for (const std::size_t batch : {std::size_t{1}, std::size_t{4}}) {
      auto h = std::make_shared<TestHandler>();
      ModelOptions o = opts(2);
      o.spin_ns = 0;
      o.priority_levels = 4;
      o.batching.max_size = batch;
      o.batching.max_delay_ns = 100'000;
      Model m(o, h);
      ASSERT_EQ(m.start(), 0u);
      const int n = kSanitized ? 300 : 2000;
      for (int i = 0; i < n; ++i) {
        TestRef r = make(static_cast<uint64_t>(i));
        r->priority = static_cast<uint32_t>(i % 4);
        ASSERT_EQ(submit(m, r), Admit::ok);
        ASSERT_TRUE(completes(r));
      }
      m.close(true);
      m.join();
      EXPECT_EQ(m.snapshot().completed, static_cast<uint64_t>(n));
    }
  });
}

TEST_F(EngineTest, ConcurrentClosesAndCancelsDoNotHang) {
  guarded(60s, [] {
    for (int round = 0; round < (kSanitized ? 10 : 50); ++round) {
      auto h = std::make_shared<TestHandler>();
      Model m(opts(2, 64), h);
      ASSERT_EQ(m.start(), 0u);
      std::vector<TestRef> rs;
      for (uint64_t i = 0; i < 64; ++i) {
        rs.push_back(make(i));
        if (submit(m, rs.back()) != Admit::ok) rs.pop_back();
      }
      std::thread canceller([&] {
        for (auto& r : rs) m.cancel(r.get());
      });
      std::thread closer1([&] { m.close(false); });
      std::thread closer2([&] { m.close(true); });
      canceller.join();
      closer1.join();
      closer2.join();
      m.join();
      for (auto& r : rs) ASSERT_EQ(r->completions.load(), 1) << r->tag;
      const ModelSnapshot s = m.snapshot();
      ASSERT_EQ(s.submitted, accounted(s));
      ASSERT_EQ(h->bad_state.load(), 0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The shared pool: models whose calls draw on one pool's capacity, and burst workers.

using apportion::SharedPool;

ModelOptions pooled(const char* name, uint32_t instances, std::shared_ptr<SharedPool> pool,
                    double weight = 1.0, int32_t priority_class = 0) {
  ModelOptions o = opts(instances);
  o.name = name;
  o.pool = std::move(pool);
  o.weight = weight;
  o.priority_class = priority_class;
  return o;
}

TEST_F(EngineTest, PooledModelsNeverRunMoreCallsThanThePoolHasUnits) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(2);
    std::atomic<int> running{0}, peak{0};
    auto on_run = [&](Worker&, TestRequest&) {
      const int now = running.fetch_add(1) + 1;
      for (int p = peak.load(); now > p && !peak.compare_exchange_weak(p, now);) {
      }
      std::this_thread::sleep_for(200us);
      running.fetch_sub(1);
      return Outcome::ok;
    };
    auto ha = std::make_shared<TestHandler>();
    auto hb = std::make_shared<TestHandler>();
    ha->on_run = on_run;
    hb->on_run = on_run;
    Model a(pooled("a", 3, pool), ha);
    Model b(pooled("b", 3, pool), hb);
    ASSERT_EQ(a.start(), 0u);
    ASSERT_EQ(b.start(), 0u);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 200; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(i % 2 ? a : b, rs.back()), Admit::ok);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    a.close(true);
    b.close(true);
    a.join();
    b.join();
    EXPECT_LE(peak.load(), 2);
    EXPECT_EQ(peak.load(), 2);  // work-conserving: both units were used
    EXPECT_EQ(a.snapshot().pool_grants + b.snapshot().pool_grants, 200u);
    EXPECT_GT(a.snapshot().pool_busy_unit_ns, 0u);
  });
}

TEST_F(EngineTest, AHigherPriorityClassModelGoesBeforeABackloggedLowerOne) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    std::mutex mu;
    std::vector<std::string> order;
    Gate gate;
    auto record = [&](const char* who) {
      return [&, who](Worker&, TestRequest& r) {
        {
          std::lock_guard lock(mu);
          order.push_back(who);
        }
        if (r.tag == 0) {
          gate.arrive();
          gate.wait();
        }
        return Outcome::ok;
      };
    };
    auto hl = std::make_shared<TestHandler>();
    auto hh = std::make_shared<TestHandler>();
    hl->on_run = record("low");
    hh->on_run = record("high");
    Model low(pooled("low", 2, pool, 50.0, 0), hl);
    Model high(pooled("high", 2, pool, 1.0, 1), hh);
    ASSERT_EQ(low.start(), 0u);
    ASSERT_EQ(high.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(low, blocker), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> lows, highs;
    for (uint64_t i = 1; i <= 6; ++i) {
      lows.push_back(make(i));
      ASSERT_EQ(submit(low, lows.back()), Admit::ok);
    }
    // Let low's second worker reach the pool first: it waits there, ahead in arrival order.
    while (pool->waiting() < 1) std::this_thread::sleep_for(100us);
    for (uint64_t i = 11; i <= 14; ++i) {
      highs.push_back(make(i));
      ASSERT_EQ(submit(high, highs.back()), Admit::ok);
    }
    while (pool->waiting() < 3) std::this_thread::sleep_for(100us);
    gate.open();
    for (auto& r : lows) ASSERT_TRUE(completes(r));
    for (auto& r : highs) ASSERT_TRUE(completes(r));
    low.close(true);
    high.close(true);
    low.join();
    high.join();
    // After the blocker: every high call before any further low one (the high model's two
    // workers are waiting whenever the unit comes free).
    ASSERT_EQ(order.size(), 11u);
    EXPECT_EQ(std::vector<std::string>(order.begin() + 1, order.begin() + 5),
              std::vector<std::string>(4, "high"));
    EXPECT_EQ(std::vector<std::string>(order.begin() + 5, order.end()),
              std::vector<std::string>(6, "low"));
  });
}

TEST_F(EngineTest, BackloggedPooledModelsSplitCallsByWeight) {
  guarded(120s, [] {
    auto pool = std::make_shared<SharedPool>(0);  // closed until both models are backlogged
    auto work = [](Worker&, TestRequest&) {
      // The same work per call: shares are counted in calls. The pool shares out call time,
      // so a call must be long against scheduling noise (a preempted call costs its model
      // pool time): 1 ms, not 100 us, which under a sanitizer on a loaded machine skewed the
      // split to 3.9:1.
      std::this_thread::sleep_for(1ms);
      return Outcome::ok;
    };
    auto ha = std::make_shared<TestHandler>();
    auto hb = std::make_shared<TestHandler>();
    ha->on_run = work;
    hb->on_run = work;
    const uint64_t n = 400;
    ModelOptions oa = pooled("a", 2, pool, 3.0);
    ModelOptions ob = pooled("b", 2, pool, 1.0);
    oa.max_queue = ob.max_queue = n;
    Model a(oa, ha);
    Model b(ob, hb);
    std::vector<TestRef> ra, rb;
    for (uint64_t i = 0; i < n; ++i) {
      ra.push_back(make(i));
      rb.push_back(make(i));
      ASSERT_EQ(submit(a, ra.back()), Admit::ok);
      ASSERT_EQ(submit(b, rb.back()), Admit::ok);
    }
    // Both backlogged from the first call: start them, open the pool, then count what each
    // served by the time `n` calls were made in all.
    ASSERT_EQ(a.start(), 0u);
    ASSERT_EQ(b.start(), 0u);
    while (pool->waiting() < 4) std::this_thread::sleep_for(100us);  // every worker
    pool->set_capacity(1);
    while (ha->runs.load() + hb->runs.load() < static_cast<int>(n)) std::this_thread::sleep_for(1ms);
    const double ratio = static_cast<double>(ha->runs.load()) / static_cast<double>(hb->runs.load());
    a.close(false);
    b.close(false);
    a.join();
    b.join();
    EXPECT_NEAR(ratio, 3.0, 0.3) << ha->runs.load() << " vs " << hb->runs.load();
    for (auto& r : ra) ASSERT_EQ(r->completions.load(), 1);
    for (auto& r : rb) ASSERT_EQ(r->completions.load(), 1);
  });
}

TEST_F(EngineTest, BurstWorkersServeOnThePoolOnlyWhileOwnWorkersAreBusy) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    Gate gate;
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> burst_runs{0};
    h->on_run = [&](Worker& w, TestRequest& r) {
      if (w.burst) burst_runs.fetch_add(1);
      if (r.tag == 0) {
        gate.arrive();
        gate.wait();
      }
      return Outcome::ok;
    };
    ModelOptions o = opts(1);
    o.pool = pool;
    o.burst_instances = 1;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    EXPECT_EQ(h->starts.load(), 2);  // the own worker and the burst one
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    // The own worker is held: these are served by the burst worker meanwhile.
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 5; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    EXPECT_FALSE(blocker->done());
    EXPECT_EQ(burst_runs.load(), 5);
    EXPECT_EQ(m.snapshot().burst_served, 5u);
    EXPECT_EQ(m.snapshot().pool_grants, 5u);
    gate.open();
    ASSERT_TRUE(completes(blocker));
    m.close(true);
    m.join();
    EXPECT_EQ(h->stops.load(), 2);
  });
}

TEST_F(EngineTest, BurstWorkersWaitForPoolCapacity) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    auto other = pool->join("other", 1.0, 0);
    const uint32_t held = pool->acquire(*other, 1);  // the pool is busy with another model
    Gate gate;
    auto h = std::make_shared<TestHandler>();
    h->on_run = hold_tag0(gate);
    ModelOptions o = opts(1);
    o.pool = pool;
    o.burst_instances = 1;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    TestRef r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    std::this_thread::sleep_for(kSanitized ? 80ms : 20ms);
    EXPECT_FALSE(r->done());  // no pool capacity: it waits for the own worker or the pool
    pool->release(*other, held, 1000);
    ASSERT_TRUE(completes(r));
    EXPECT_EQ(m.snapshot().burst_served, 1u);
    gate.open();
    m.close(true);
    m.join();
  });
}

TEST_F(EngineTest, PooledAndBurstPathsCompleteEveryRequestExactlyOnce) {
  // Tagged fuzz: pooled models with batching, priorities and a burst model, submitters,
  // cancels and a close without drain in the middle. Nothing lost, nothing twice.
  guarded(120s, [] {
    for (int round = 0; round < (kSanitized ? 2 : 6); ++round) {
      auto pool = std::make_shared<SharedPool>(2);
      auto h1 = std::make_shared<TestHandler>();
      auto h2 = std::make_shared<TestHandler>();
      auto h3 = std::make_shared<TestHandler>();
      ModelOptions o1 = pooled("a", 2, pool, 3.0, 0);
      o1.priority_levels = 2;
      ModelOptions o2 = pooled("b", 2, pool, 1.0, 1);
      o2.batching.max_size = 4;
      o2.batching.max_delay_ns = 50'000;
      ModelOptions o3 = opts(1);
      o3.name = "c";
      o3.pool = pool;
      o3.burst_instances = 2;
      std::vector<std::unique_ptr<Model>> ms;
      ms.push_back(std::make_unique<Model>(o1, h1));
      ms.push_back(std::make_unique<Model>(o2, h2));
      ms.push_back(std::make_unique<Model>(o3, h3));
      for (auto& m : ms) ASSERT_EQ(m->start(), 0u);
      std::mutex mu;
      std::vector<TestRef> all;
      std::vector<std::thread> submitters;
      for (int t = 0; t < 3; ++t) {
        submitters.emplace_back([&, t] {
          for (uint64_t i = 0; i < (kSanitized ? 150u : 600u); ++i) {
            TestRef r = make(i);
            r->priority = static_cast<uint32_t>(i % 2);
            Model& m = *ms[(i + static_cast<uint64_t>(t)) % 3];
            if (submit(m, r) == Admit::ok) {
              if (i % 7 == 0) m.cancel(r.get());
              std::lock_guard lock(mu);
              all.push_back(r);
            }
          }
        });
      }
      std::this_thread::sleep_for(2ms);
      for (auto& m : ms) m->close(round % 2 == 0);
      for (auto& t : submitters) t.join();
      for (auto& m : ms) m->join();
      for (auto& r : all) ASSERT_EQ(r->completions.load(), 1) << r->tag;
      for (auto& m : ms) {
        const ModelSnapshot s = m->snapshot();
        ASSERT_EQ(s.submitted, accounted(s));
      }
      ASSERT_EQ(h1->bad_state.load() + h2->bad_state.load() + h3->bad_state.load(), 0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Lane groups (instance_group): node-local queues, with stealing when a group's own are busy.

// Long enough that an idle worker never stops spinning during a test (close() ends it): such a
// worker watches only its own group's lanes, which makes "who serves what" deterministic.
constexpr int64_t kSpinForever = 600'000'000'000;

// Counts each worker's idle() calls: a test waits until every worker found nothing and went to
// wait, so no worker is still at a request boundary (where it would look at every group).
class GroupHandler : public TestHandler {
 public:
  static constexpr uint32_t kMaxWorkers = 8;
  std::atomic<int> idle_by[kMaxWorkers]{};
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint32_t>> served;  // (tag, group of the worker), call order

  void idle(Worker& w) override {
    TestHandler::idle(w);
    if (w.index < kMaxWorkers) {
      idle_by[w.index].fetch_add(1);
      idle_by[w.index].notify_all();
    }
  }
  void wait_idle(uint32_t workers) {
    for (uint32_t i = 0; i < workers; ++i) idle_by[i].wait(0);
  }
  // Every request a call serves is recorded with the serving worker's group, before the call.
  void run(Worker& w, Request* const* batch, std::size_t n) override {
    {
      std::lock_guard lock(mu);
      for (std::size_t i = 0; i < n; ++i) {
        served.emplace_back(static_cast<TestRequest*>(batch[i])->tag, w.group);
      }
    }
    TestHandler::run(w, batch, n);
  }
  uint32_t group_of(uint64_t tag) {
    std::lock_guard lock(mu);
    for (auto& [t, g] : served) {
      if (t == tag) return g;
    }
    return Worker::kNoGroup;
  }
  std::vector<uint64_t> order_in(uint32_t group) {
    std::lock_guard lock(mu);
    std::vector<uint64_t> out;
    for (auto& [t, g] : served) {
      if (g == group) out.push_back(t);
    }
    return out;
  }
};

ModelOptions grouped(std::vector<uint32_t> groups, int64_t spin_ns, std::size_t max_queue = 1024) {
  ModelOptions o = opts(static_cast<uint32_t>(groups.size()), max_queue);
  o.instance_group = std::move(groups);
  o.spin_ns = spin_ns;
  return o;
}

TestRef make_in(uint64_t tag, uint32_t group, uint32_t priority = 0) {
  TestRef r = make(tag);
  r->group = group;
  r->priority = priority;
  return r;
}

TEST_F(EngineTest, GroupsSplitTheLanesAndWorkers) {
  auto h = std::make_shared<TestHandler>();
  ModelOptions o = grouped({0, 1, 1}, 0);
  o.priority_levels = 2;
  o.on_timeout = OnTimeout::delay;
  Model m(o, h);
  EXPECT_EQ(m.groups(), 2u);
  EXPECT_EQ(m.lanes(), 5u) << "two levels per group and one shared delayed lane";
  Model plain(opts(3), h);
  EXPECT_EQ(plain.groups(), 1u);
  Model one(grouped({0, 0}, 0), h);
  EXPECT_EQ(one.groups(), 1u) << "a single group is no groups";
  EXPECT_THROW(Model(grouped({0, 3, 1}, 0), h), std::invalid_argument);
  ModelOptions short_list = opts(3);
  short_list.instance_group = {0, 1};
  EXPECT_THROW(Model(short_list, h), std::invalid_argument);
  try {
    m.set_placement({}, apportion::MemoryPolicy::none, std::vector<uint32_t>{0});
    ADD_FAILURE() << "a group list of the wrong length was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("model 'm'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("instance_group"), std::string::npos) << e.what();
  }
  EXPECT_EQ(m.groups(), 2u) << "a refused regrouping changes nothing";
}

TEST_F(EngineTest, RequestsStayInTheirGroupWhileItsWorkersAreFree) {
  guarded(30s, [] {
    auto h = std::make_shared<GroupHandler>();
    Model m(grouped({0, 0, 1, 1}, kSpinForever), h);
    ASSERT_EQ(m.start(), 0u);
    h->wait_idle(4);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 40; ++i) rs.push_back(make_in(i, 0));
    ASSERT_EQ(submit_all(m, rs), Admit::ok);
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    // Group 1's workers, idle the whole time, left group 0's requests to group 0's workers.
    for (auto& r : rs) EXPECT_EQ(h->group_of(r->tag), 0u) << r->tag;
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.stolen, 0u);
    EXPECT_EQ(s.completed, 40u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, AWorkerStealsFromAGroupWhoseWorkersAreBusyHighestPriorityFirst) {
  guarded(30s, [] {
    auto h = std::make_shared<GroupHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    ModelOptions o = grouped({0, 1}, kSpinForever);
    o.priority_levels = 2;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    h->wait_idle(2);
    TestRef blocker = make_in(0, 0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    EXPECT_EQ(h->group_of(0), 0u) << "group 1's worker took group 0's request while both were free";
    // Group 0's only worker is held; these wait in group 0's lanes, and group 1's worker,
    // spinning on its own lanes, leaves them there ...
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 4; ++i) {
      rs.push_back(make_in(i, 0, static_cast<uint32_t>(i % 2)));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    // ... until it serves one of its own: then it finds its lanes empty and steals them all.
    TestRef own = make_in(5, 1);
    ASSERT_EQ(submit(m, own), Admit::ok);
    ASSERT_TRUE(completes(own));
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    EXPECT_EQ(h->order_in(1), (std::vector<uint64_t>{5, 2, 4, 1, 3}));
    EXPECT_EQ(m.snapshot().stolen, 4u);
    EXPECT_FALSE(blocker->done());
    gate.open();
    ASSERT_TRUE(completes(blocker));
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 6u);
    EXPECT_EQ(s.stolen, 4u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, APushToABusyGroupWakesAParkedWorkerOfAnother) {
  guarded(60s, [] {
    auto h = std::make_shared<GroupHandler>();
    Gate gate;
    std::atomic<int> held{0};
    h->on_run = [&gate, &held](Worker& w, TestRequest& r) {
      if (w.group == 0 && r.tag < 1000) {
        held.store(1);
        gate.wait();
      }
      return Outcome::ok;
    };
    // No spinning: idle workers park at once, so only the wake-up of a push brings them back.
    Model m(grouped({0, 1}, 0), h);
    ASSERT_EQ(m.start(), 0u);
    // Submit into group 0 until group 0's worker holds one (group 1's may steal some first:
    // a wake-up goes to either sleeper).
    std::vector<TestRef> early;
    for (uint64_t i = 0; i < 500 && held.load() == 0; ++i) {
      early.push_back(make_in(i, 0));
      ASSERT_EQ(submit(m, early.back()), Admit::ok);
      while (!early.back()->done() && held.load() == 0) std::this_thread::sleep_for(100us);
    }
    ASSERT_EQ(held.load(), 1) << "group 0's worker never took a request of its own group";
    const uint64_t stolen_before = m.snapshot().stolen;
    // Group 1's worker is parked (or about to): each push into group 0 must reach it.
    std::vector<TestRef> rs;
    for (uint64_t i = 1000; i < 1010; ++i) {
      rs.push_back(make_in(i, 0));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      ASSERT_TRUE(completes(rs.back()));
    }
    for (auto& r : rs) EXPECT_EQ(h->group_of(r->tag), 1u) << r->tag;
    EXPECT_EQ(m.snapshot().stolen - stolen_before, 10u);
    gate.open();
    for (auto& r : early) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, PriorityOrderHoldsWithinAGroup) {
  guarded(30s, [] {
    auto h = std::make_shared<GroupHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    ModelOptions o = grouped({0, 1}, kSpinForever);
    o.priority_levels = 3;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    h->wait_idle(2);
    TestRef blocker = make_in(0, 0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 9; ++i) {
      rs.push_back(make_in(i, 0, static_cast<uint32_t>(2 - (i - 1) % 3)));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    gate.open();
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(h->order_in(0), (std::vector<uint64_t>{0, 3, 6, 9, 2, 5, 8, 1, 4, 7}));
    EXPECT_EQ(m.snapshot().stolen, 0u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, MaxQueueBoundsAllGroupsTogether) {
  guarded(30s, [] {
    auto h = std::make_shared<GroupHandler>();
    ModelOptions o = grouped({0, 1}, 0, 4);
    o.priority_levels = 2;
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);  // not started: the bound is exact
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 4; ++i) {
      rs.push_back(make_in(i, static_cast<uint32_t>(i % 2), static_cast<uint32_t>(i / 2)));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    TestRef extra0 = make_in(10, 0), extra1 = make_in(11, 1), routed = make(12);
    EXPECT_EQ(submit(m, extra0), Admit::full);
    EXPECT_EQ(submit(m, extra1), Admit::full);
    EXPECT_EQ(submit(m, routed), Admit::full);
    EXPECT_EQ(m.queued(), 4u);
    ASSERT_EQ(m.start(), 0u);
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    // The slots are free again, in any group.
    TestRef again = make(13);
    ASSERT_EQ(submit(m, again), Admit::ok);
    ASSERT_TRUE(completes(again));
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 5u);
    EXPECT_EQ(s.rejected, 3u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, RegroupingBeforeStartKeepsQueuedRequests) {
  guarded(30s, [] {
    auto h = std::make_shared<GroupHandler>();
    ModelOptions o = opts(2);
    o.priority_levels = 2;
    Model m(o, h);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < 6; ++i) {
      rs.push_back(make(i));
      rs.back()->priority = static_cast<uint32_t>(i % 2);
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    m.set_placement({}, apportion::MemoryPolicy::none, std::vector<uint32_t>{0, 1});
    EXPECT_EQ(m.groups(), 2u);
    for (uint64_t i = 6; i < 10; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);  // routed round-robin
    }
    m.set_placement({}, apportion::MemoryPolicy::none, std::vector<uint32_t>{0, 0});
    EXPECT_EQ(m.groups(), 1u);
    EXPECT_EQ(m.queued(), 10u);
    ASSERT_EQ(m.start(), 0u);
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().completed, 10u);
  });
}

#if defined(__linux__)
// Pins the calling thread to `cpu`; false when the OS refuses.
bool pin_self(int cpu) { return apportion::pin_current_thread({cpu}).ok; }

using apportion::testing::is_sleeping;
using apportion::testing::this_tid;

TEST_F(EngineTest, APushWakesAParkedWorkerOfItsOwnGroupFirst) {
  guarded(60s, [] {
    auto h = std::make_shared<GroupHandler>();
    std::atomic<int> tids[2] = {};
    h->on_start = [&tids](Worker& w) {
      tids[w.index].store(this_tid());
      return true;
    };
    Model m(grouped({0, 1}, 0), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs;
    for (uint64_t i = 0; i < (kSanitized ? 20u : 100u); ++i) {
      // Both parked: the wake-up for group 1's request must go to group 1's worker (were it
      // any sleeper's, group 0's would steal the request about half the time).
      while (!is_sleeping(tids[0].load()) || !is_sleeping(tids[1].load())) {
        std::this_thread::sleep_for(200us);
      }
      const uint32_t group = static_cast<uint32_t>(i % 2);
      rs.push_back(make_in(i, group));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      ASSERT_TRUE(completes(rs.back()));
      EXPECT_EQ(h->group_of(i), group) << i;
    }
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().stolen, 0u);
  });
}

TEST_F(EngineTest, SubmissionsGoToTheGroupOfTheSubmittingCpu) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ASSERT_EQ(sched_getaffinity(0, sizeof allowed, &allowed), 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  if (cpus.size() < 2) GTEST_SKIP() << "needs two CPUs";
  bool pinnable = false;
  std::thread([&] { pinnable = pin_self(cpus[1]) && sched_getcpu() == cpus[1]; }).join();
  if (!pinnable) GTEST_SKIP() << "this process may not pin its threads";
  guarded(30s, [&] {
    auto h = std::make_shared<GroupHandler>();
    ModelOptions o = grouped({0, 1}, kSpinForever);
    o.placement = {apportion::InstancePlacement{{cpus[0]}, 1, {}},
                   apportion::InstancePlacement{{cpus[1]}, 1, {}}};
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    h->wait_idle(2);
    std::vector<TestRef> rs;
    for (uint32_t group = 0; group < 2; ++group) {
      const int idle_before = h->idle_by[group].load();
      const std::size_t first = rs.size();
      std::thread([&, group] {
        if (!pin_self(cpus[group])) return;
        for (uint64_t i = 0; i < 10; ++i) {
          TestRef r = make(group * 100 + i);  // no explicit group: routed by this CPU
          if (submit(m, r) == Admit::ok) rs.push_back(r);
        }
      }).join();
      ASSERT_EQ(rs.size(), first + 10);
      for (std::size_t i = first; i < rs.size(); ++i) ASSERT_TRUE(completes(rs[i]));
      // Back to spinning on its own lanes: a worker that just served looks at every group
      // once (and would steal the next submitter's requests while their worker is descheduled).
      h->idle_by[group].wait(idle_before);
    }
    for (auto& r : rs) EXPECT_EQ(h->group_of(r->tag), r->tag / 100) << r->tag;
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().stolen, 0u);
  });
}
#endif

TEST_F(EngineTest, GroupedLanesCompleteEveryRequestExactlyOnce) {
  // Tagged fuzz over two groups: explicit and routed submissions, priorities, deadlines (with
  // the delay policy on odd rounds), batching on some rounds, cancels, and a close in the
  // middle (without drain on even rounds). Nothing lost, nothing twice, counts add up.
  const int64_t live_before = live();
  guarded(120s, [] {
    const int rounds = kSanitized ? 4 : 12;
    for (int round = 0; round < rounds; ++round) {
      auto h = std::make_shared<TestHandler>();
      h->on_run = [](Worker&, TestRequest& r) {
        volatile uint64_t x = r.tag;
        for (int i = 0; i < 200; ++i) x = x * 31 + 7;
        return Outcome::ok;
      };
      ModelOptions o = grouped({0, 1, 1}, round % 3 == 0 ? 0 : 20'000, 128);
      o.priority_levels = 2;
      o.on_timeout = round % 2 == 1 ? OnTimeout::delay : OnTimeout::reject;
      if (round % 4 == 3) {
        o.batching.max_size = 4;
        o.batching.max_delay_ns = 50'000;
      }
      Model m(o, h);
      ASSERT_EQ(m.start(), 0u);
      std::mutex mu;
      std::vector<TestRef> all;
      std::vector<std::thread> submitters;
      const uint64_t per_submitter = kSanitized ? 300u : 2000u;
      std::atomic<uint64_t> attempts{0};
      for (int t = 0; t < 4; ++t) {
        submitters.emplace_back([&, t] {
          std::mt19937_64 rng(static_cast<uint64_t>(round * 16 + t));
          for (uint64_t i = 0; i < per_submitter; ++i) {
            attempts.fetch_add(1);
            TestRef r = make((static_cast<uint64_t>(t) << 32) | i);
            r->priority = static_cast<uint32_t>(rng() % 3);  // 2 is clamped to the last level
            const uint64_t g = rng() % 3;                   // 2: routed by the engine
            if (g < 2) r->group = static_cast<uint32_t>(g);
            if (rng() % 10 == 0) r->deadline_ns = now_ns() + static_cast<int64_t>(rng() % 20'000);
            if (submit(m, r) == Admit::ok) {
              if (rng() % 7 == 0) m.cancel(r.get());
              std::lock_guard lock(mu);
              all.push_back(r);
            } else if (r->completions.load() != 0) {
              h->bad_state.fetch_add(1);
            }
          }
        });
      }
      // Close midway, so the close meets queued, running and still-arriving requests.
      while (attempts.load() < 2 * per_submitter) std::this_thread::sleep_for(50us);
      m.close(round % 2 == 1);
      for (auto& t : submitters) t.join();
      m.join();
      for (auto& r : all) ASSERT_EQ(r->completions.load(), 1) << r->tag;
      const ModelSnapshot s = m.snapshot();
      ASSERT_EQ(s.submitted, accounted(s));
      ASSERT_EQ(s.queued, 0u);
      ASSERT_LE(s.stolen, s.completed + s.expired + s.cancelled + s.failed);
      ASSERT_EQ(h->bad_state.load(), 0);
    }
  });
  EXPECT_EQ(live(), live_before);
}

}  // namespace
