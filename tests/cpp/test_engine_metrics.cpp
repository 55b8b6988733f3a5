// The engine's per-model metrics: snapshots, worker shards, direct calls.
#include "engine_fixture.hpp"

namespace {

using namespace apportion::testing::engine;
using EngineMetrics = EngineTest;

TEST_F(EngineMetrics, DirectCallsOnlyWithNothingQueuedAndAreCountedLikeRequests) {
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

TEST_F(EngineMetrics, DirectCallsFromManyThreadsAddUp) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<std::thread> ts;
    // What the callers counted: every direct call made must show in the snapshot, as a
    // submission with its outcome, and as nothing else.
    std::atomic<uint64_t> made{0}, errors{0};
    for (int t = 0; t < 4; ++t) {
      ts.emplace_back([&m, &made, &errors, t] {
        for (int i = 0; i < 500; ++i) {
          if (!m.direct_allowed()) continue;
          const bool error = (i + t) % 3 == 0;
          m.count_direct(error ? Outcome::error : Outcome::ok, now_ns());
          made.fetch_add(1);
          if (error) errors.fetch_add(1);
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
    EXPECT_EQ(s.direct, made.load());
    EXPECT_EQ(s.failed, errors.load()) << "only the direct calls failed";
    EXPECT_EQ(s.completed, 200u + made.load() - errors.load());
    EXPECT_EQ(s.queue_wait.total, s.submitted) << "a direct call records a zero queue wait";
  });
}


TEST_F(EngineMetrics, SnapshotCountsAddUpWhileWorkIsInFlight) {
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
    EXPECT_EQ(s.queued, 7u);  // the seven live ones: the tombstone gave its slot back
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

TEST_F(EngineMetrics, RunningCallsAndTheOldestCallsAgeAreSeenWhileTheyRun) {
  guarded(30s, [] {
    HeldModel model(2, 8);
    Model& m = model.m;
    Gate& gate = model.gate;
    ASSERT_EQ(m.start(), 0u);
    ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.running_calls, 0u);
    EXPECT_EQ(s.oldest_call_ns, 0u);
    TestRef held = make(0);
    ASSERT_EQ(submit(m, held), Admit::ok);
    gate.wait_arrivals(1);
    const int64_t since = now_ns();
    // The other instance serves the rest meanwhile: one call stays running, the held one.
    for (uint64_t i = 1; i <= 20; ++i) {
      TestRef r = make(i);
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    std::this_thread::sleep_for(20ms);
    // Read before the snapshot: the held call began before `since`, and the snapshot reads its
    // age after `before`, so no stall of this thread (TSan's, a loaded machine's) can make the
    // age less than this.
    const int64_t before = now_ns();
    s = m.snapshot();
    EXPECT_EQ(s.running_calls, 1u);
    EXPECT_GE(s.oldest_call_ns, static_cast<uint64_t>(before - since))
        << "the held call's age, not the latest call's";
    EXPECT_GE(s.oldest_call_ns, 20'000'000u);
    gate.open();
    ASSERT_TRUE(completes(held));
    m.close(true);
    m.join();
    s = m.snapshot();
    EXPECT_EQ(s.running_calls, 0u);
    EXPECT_EQ(s.oldest_call_ns, 0u);
  });
}

TEST_F(EngineMetrics, ShardsOfEveryWorkerAreMerged) {
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

TEST_F(EngineMetrics, CompleteWithoutShardCountsButRecordsNoLatency) {
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


}  // namespace
