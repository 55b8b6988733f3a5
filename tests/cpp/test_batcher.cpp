// Dynamic batching: through a model, and apportion::Batcher's decisions alone.
#include "engine_fixture.hpp"

#include <vector>

#include "apportion/batcher.hpp"

namespace {

using namespace apportion::testing::engine;
using EngineBatching = EngineTest;

TEST_F(EngineBatching, BatchesAreFormedUpToMaxSizeInPriorityOrder) {
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

TEST_F(EngineBatching, PartialBatchWaitsForMaxDelayThenRuns) {
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
    // It waited for company (nothing known yet about arrivals or call costs): the worker
    // dispatched it no earlier than max_delay after taking it.
    EXPECT_GE(lone->start_ns - lone->submit_ns, kDelay);
    m.close(true);
    m.join();
    // A request arriving while a batch waits joins it (a fresh worker: nothing known again).
    Recorder rec2;
    Model m2(batching_opts(8, kDelay), recording_handler(rec2, nullptr));
    ASSERT_EQ(m2.start(), 0u);
    TestRef a = make(2);
    ASSERT_EQ(submit(m2, a), Admit::ok);
    std::this_thread::sleep_for(2ms);
    TestRef b = make(3);
    ASSERT_EQ(submit(m2, b), Admit::ok);
    ASSERT_TRUE(completes(a));
    ASSERT_TRUE(completes(b));
    m2.close(true);
    m2.join();
    const auto sizes = rec2.sizes();
    ASSERT_EQ(sizes.size(), 1u);
    EXPECT_EQ(sizes[0], 2u) << "a request that arrives within max_delay joins the batch";
  });
}

TEST_F(EngineBatching, AClosedLoopClientDoesNotWaitForCompanyThatCannotCome) {
  // One client that submits its next request only after the previous answer: once the worker
  // has seen the gap between requests and measured a call, a batch of one is dispatched at
  // once instead of after max_delay.
  guarded(30s, [] {
    Recorder rec;
    constexpr int64_t kDelay = 50'000'000;
    Model m(batching_opts(8, kDelay), recording_handler(rec, nullptr));
    ASSERT_EQ(m.start(), 0u);
    std::vector<int64_t> waits;
    for (uint64_t i = 0; i < 6; ++i) {
      TestRef r = make(i);
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
      waits.push_back(r->start_ns - r->submit_ns);
    }
    m.close(true);
    m.join();
    EXPECT_GE(waits[0], kDelay) << "the first waits: nothing known yet";
    for (std::size_t i = 2; i < waits.size(); ++i) EXPECT_LT(waits[i], kDelay / 2) << i;
  });
}

TEST_F(EngineBatching, ClosedLoopClientsAllInOneBatchDoNotWaitForMore) {
  // Eight closed-loop clients answered together resubmit together (here: one thread submits
  // the next round once all eight answers came). Once the worker has seen a round, a batch of
  // all eight goes at once: nothing more can come until it is answered. A call costs
  // 2 ms + 0.2 ms per request, so one more request would save about c(1) - c(8) / 8 = 1.75 ms,
  // while the gaps between the eight submissions are microseconds: measured by those, the
  // worker held every round for max_delay.
  guarded(60s, [] {
    auto h = std::make_shared<TestHandler>();
    h->on_batch = [](Worker&, Request* const*, std::size_t n) {
      std::this_thread::sleep_for(std::chrono::microseconds(2'000 + 200 * n));
    };
    constexpr int64_t kDelay = 10'000'000;
    Model m(batching_opts(16, kDelay), h);
    ASSERT_EQ(m.start(), 0u);
    constexpr int kRounds = 10;
    int prompt = 0;
    for (int round = 0; round < kRounds; ++round) {
      std::vector<TestRef> rs;
      for (uint64_t i = 0; i < 8; ++i) {
        rs.push_back(make(i));
        ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      }
      for (auto& r : rs) ASSERT_TRUE(completes(r));
      // The last one submitted: the batch it closed waited for max_delay, or not at all.
      if (round >= 2 && rs.back()->start_ns - rs.back()->submit_ns < kDelay / 2) ++prompt;
    }
    m.close(true);
    m.join();
    // A stall of the test thread or the worker may delay a round; not most of them.
    EXPECT_GE(prompt, kRounds - 4) << "rounds dispatched without waiting, of " << kRounds - 2;
  });
}

TEST_F(EngineBatching, ABatchDoesNotWaitWhileAnotherInstanceIdles) {
  // Two instances, max_delay of an hour: one takes the lone request while the other waits for
  // work. Waiting could only delay it: the next request would go to the idle one.
  guarded(30s, [] {
    Recorder rec;
    ModelOptions o = batching_opts(8, 3'600'000'000'000LL);
    o.instances = 2;
    Model m(o, recording_handler(rec, nullptr));
    ASSERT_EQ(m.start(), 0u);
    // Both workers wait for work (asleep: nothing else blocks them) before the request comes.
    for (;;) {
      const std::vector<int> tids = m.worker_tids();
      if (tids.size() == 2 && std::all_of(tids.begin(), tids.end(),
                                          [](int t) { return t > 0 && is_sleeping(t); })) {
        break;
      }
      std::this_thread::sleep_for(1ms);
    }
    TestRef r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    ASSERT_TRUE(completes(r)) << "dispatched at once, not after an hour";
    EXPECT_EQ(r->outcome(), Outcome::ok);
    m.close(true);
    m.join();
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{1}));
  });
}

TEST_F(EngineBatching, PreferredSizeDispatchesWithoutWaiting) {
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

TEST_F(EngineBatching, BatchingKeepsRequestsOutOfBatchesThatFinishTooLate) {
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

TEST_F(EngineBatching, BatchingWithDelayRunsHopelessRequestsLast) {
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

TEST_F(EngineBatching, RequestCancelledWhileItsBatchFormsCompletesOnce) {
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

TEST_F(EngineBatching, CloseWithoutDrainCancelsAFormingBatch) {
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
// apportion::Batcher's decisions alone: no model, no clock, no threads.

using apportion::Batcher;
using Fit = apportion::Batcher::Fit;

constexpr int64_t kNone = Request::kNoDeadline;

TEST_F(EngineBatching, BatcherDispatchesAtMaxSize) {
  const BatchingOptions opt{3, 1'000, {}};
  const std::vector<int64_t> cost;  // nothing measured: every estimate 0
  Batcher b(opt, cost);
  Request r[4];
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.offer(&r[0], kNone, 100), Fit::joined);
  EXPECT_EQ(b.offer(&r[1], kNone, 110), Fit::joined);
  EXPECT_EQ(b.offer(&r[2], kNone, 120), Fit::full);
  EXPECT_EQ(b.size(), 3u);
  EXPECT_EQ(b.requests(), (std::vector<Request*>{&r[0], &r[1], &r[2]}));
  b.clear();
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.offer(&r[3], kNone, 130), Fit::joined);
}

TEST_F(EngineBatching, BatcherWaitsAtMostMaxDelayFromTheFirstRequest) {
  const BatchingOptions opt{8, 1'000, {}};
  const std::vector<int64_t> cost;
  Batcher b(opt, cost);
  Request r[3];
  ASSERT_EQ(b.offer(&r[0], kNone, 5'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 6'000);
  ASSERT_EQ(b.offer(&r[1], kNone, 5'700), Fit::joined);
  EXPECT_EQ(b.wait_until(), 6'000) << "the delay runs from the batch's first request";
  EXPECT_FALSE(b.dispatch_now(false)) << "below max_size, no preferred size: wait for more";
  EXPECT_TRUE(b.dispatch_now(true)) << "a stopping model dispatches at once";
  b.clear();
  ASSERT_EQ(b.offer(&r[2], kNone, 9'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 10'000) << "a new batch opens a new delay";
}

TEST_F(EngineBatching, BatcherWithADeadlineAndNoMeasuredCallDoesNotWait) {
  const BatchingOptions opt{8, 50'000'000, {}};
  const std::vector<int64_t> cost;  // no call measured yet
  Batcher b(opt, cost);
  Request r[2];
  ASSERT_EQ(b.offer(&r[0], kNone, 1'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 50'001'000) << "no deadline: the configured delay";
  ASSERT_EQ(b.offer(&r[1], 6'001'000, 2'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 1'000)
      << "waiting up to the deadline itself (nothing says how long the call takes) makes it late";
}

TEST_F(EngineBatching, BatcherDispatchesAPreferredSizeWithoutWaiting) {
  const BatchingOptions opt{8, 1'000'000, {2, 4}};
  const std::vector<int64_t> cost;
  Batcher b(opt, cost);
  Request r[4];
  const bool expected[] = {false, true, false, true};
  for (int i = 0; i < 4; ++i) {
    ASSERT_EQ(b.offer(&r[i], kNone, 0), Fit::joined);
    EXPECT_EQ(b.dispatch_now(false), expected[i]) << "size " << i + 1;
  }
}

TEST_F(EngineBatching, BatcherKeepsRequestsOutOfBatchesThatWouldFinishLate) {
  const BatchingOptions opt{8, 1'000'000, {}};
  // One request takes 100 ns, two 300 ns, three 600 ns (index = batch size).
  const std::vector<int64_t> cost{0, 100, 300, 600};
  Batcher b(opt, cost);
  Request r[4];
  EXPECT_EQ(b.offer(&r[0], 1'050, 1'000), Fit::hopeless) << "not even alone in time";
  EXPECT_TRUE(b.empty());
  ASSERT_EQ(b.offer(&r[1], 1'400, 1'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 1'100) << "one more (300 ns for two) must still meet 1'400";
  EXPECT_EQ(b.offer(&r[2], 1'250, 1'000), Fit::next_batch) << "a pair would end at 1'300";
  EXPECT_EQ(b.size(), 1u);
  b.carry(&r[2], 7);
  ASSERT_TRUE(b.has_carry());
  b.clear();
  uint32_t lane = 0;
  EXPECT_EQ(b.take_carry(lane), &r[2]);
  EXPECT_EQ(lane, 7u);
  EXPECT_FALSE(b.has_carry());
  ASSERT_EQ(b.offer(&r[2], 1'250, 1'000), Fit::joined) << "it opens the next batch";
  EXPECT_EQ(b.offer(&r[3], kNone, 1'000), Fit::next_batch)
      << "no deadline of its own, but the batch's earliest one binds it";
}

TEST_F(EngineBatching, BatcherProbesOnceAHopelessVerdictRestsOnAStaleEstimate) {
  const BatchingOptions opt{8, 1'000'000, {}};
  const std::vector<int64_t> cost{0, 100};  // one request: 100 ns by the last measure
  Batcher b(opt, cost);
  Request r[4];
  // Nothing ran in this batcher yet: the estimate is all there is.
  EXPECT_EQ(b.offer(&r[0], 1'050, 1'000), Fit::hopeless);
  ASSERT_EQ(b.offer(&r[1], kNone, 1'000), Fit::joined);  // a batch opens at 1'000
  b.clear();
  const int64_t stale_at = 1'000 + Batcher::kProbeAfterEstimates * 100;
  EXPECT_EQ(b.offer(&r[2], stale_at + 50, stale_at), Fit::hopeless) << "still fresh";
  EXPECT_FALSE(b.probing());
  EXPECT_EQ(b.offer(&r[2], stale_at + 51, stale_at + 1), Fit::joined)
      << "no batch for too long: it runs, and its call re-measures";
  EXPECT_TRUE(b.probing());
  EXPECT_EQ(b.offer(&r[3], stale_at + 150, stale_at + 1), Fit::next_batch)
      << "the probe's deadline binds the batch: a pair (200 ns) would end too late";
  b.clear();
  EXPECT_FALSE(b.probing());
  EXPECT_EQ(b.offer(&r[3], stale_at + 60, stale_at + 2), Fit::hopeless) << "fresh again";
}

TEST(BatchCosts, AnEstimateFallsFasterThanItRises) {
  std::vector<int64_t> cost(3, 0);
  apportion::batch_observe(cost, 1, 1'000);
  EXPECT_EQ(cost[1], 1'000) << "the first measure is the estimate";
  apportion::batch_observe(cost, 1, 2'000);
  EXPECT_EQ(cost[1], 1'250) << "a quarter of the way up";
  apportion::batch_observe(cost, 1, 250);
  EXPECT_EQ(cost[1], 750) << "half the way down";
  apportion::batch_observe(cost, 1, 5'000, /*replace=*/true);
  EXPECT_EQ(cost[1], 5'000) << "a probe's measure replaces the estimate";
  apportion::batch_observe(cost, 9, 5);  // beyond max_size: ignored
  EXPECT_EQ(cost.size(), 3u);
}

TEST(BatchCosts, SlowCallsAreFollowedByHowMuchTheyOverran) {
  std::vector<int64_t> cost(4, 0), slow(4, 0);
  apportion::batch_observe(cost, 1, 1'000, false, &slow);
  EXPECT_EQ(slow[1], 0) << "the first measure is the estimate: nothing to overrun";
  apportion::batch_observe(cost, 1, 1'800, false, &slow);
  EXPECT_EQ(slow[1], 100) << "800 ns over the estimate of 1'000, weight 1/8";
  EXPECT_EQ(cost[1], 1'200);
  apportion::batch_observe(cost, 1, 600, false, &slow);
  EXPECT_EQ(slow[1], 88) << "a call within the estimate overran by nothing";
  EXPECT_EQ(cost[1], 900);
  EXPECT_EQ(apportion::batch_deadline_estimate_ns(cost, &slow, 1), 900 + apportion::kSlowCalls * 88);
  EXPECT_EQ(apportion::batch_deadline_estimate_ns(cost, nullptr, 1), 900) << "not followed: the estimate";
  apportion::batch_observe(cost, 1, 9'000, /*replace=*/true, &slow);
  EXPECT_EQ(slow[1], 0) << "a probe re-measures a stale estimate, and the overrun planned with it";
  EXPECT_EQ(cost[1], 9'000);
  apportion::batch_observe(cost, 2, 2'000, false, &slow);
  EXPECT_EQ(apportion::batch_deadline_estimate_ns(cost, &slow, 2), 2'000)
      << "size 2 measured, no overrun yet: its own 0, not size 1's scaled";
  EXPECT_EQ(apportion::batch_deadline_estimate_ns(cost, &slow, 3), 3'000 + apportion::kSlowCalls * 0)
      << "size 3 unmeasured: both scaled from size 2";
}

TEST_F(EngineBatching, BatcherPlansDeadlinesWithTheSlowCalls) {
  const BatchingOptions opt{8, 1'000'000, {}};
  const std::vector<int64_t> cost{0, 100, 300, 600};
  const std::vector<int64_t> slow{0, 50, 0, 0};  // calls of one overran by 50 ns on average
  Batcher plain(opt, cost);
  Batcher b(opt, cost, &slow);
  Request r[3];
  EXPECT_EQ(plain.offer(&r[0], 1'150, 1'000), Fit::joined) << "a typical call (100 ns) ends in time";
  EXPECT_EQ(b.offer(&r[0], 1'150, 1'000), Fit::hopeless)
      << "a slow one (100 + 2 x 50 ns) does not: expired now rather than late";
  ASSERT_EQ(b.offer(&r[1], 1'400, 1'000), Fit::joined);
  EXPECT_EQ(b.wait_until(), 1'100) << "a pair: 300 ns, and pairs have not overrun";
}

TEST_F(EngineBatching, AFewSlowCallsDoNotStopAModelForGood) {
  // A cold model: its first calls take 150 ms, later ones 1 ms; every request has 60 ms.
  // The first calls make the estimate of a call 150 ms: longer than any request has, so by
  // that estimate each following request is hopeless and expires unrun, and no call ever
  // corrects it, unless a stale estimate is re-measured.
  guarded(60s, [] {
    Recorder rec;
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> calls{0};
    h->on_batch = [&calls](Worker&, Request* const*, std::size_t) {
      std::this_thread::sleep_for(calls.fetch_add(1) < 2 ? 150ms : 1ms);
    };
    Model m(batching_opts(4, 1'000'000), h);
    ASSERT_EQ(m.start(), 0u);
    std::vector<TestRef> rs;
    const int64_t start = now_ns();
    for (uint64_t i = 1; now_ns() - start < 1'500'000'000 && i <= 400; ++i) {
      rs.push_back(make(i));
      rs.back()->deadline_ns = now_ns() + 60'000'000;
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      std::this_thread::sleep_for(5ms);
    }
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    // The last quarter was submitted well after the slow calls (and after the estimate went
    // stale, 3 x 150 ms later): served, not expired.
    std::size_t ok_late = 0;
    const std::size_t tail = rs.size() - rs.size() / 4;
    for (std::size_t i = tail; i < rs.size(); ++i) ok_late += rs[i]->outcome() == Outcome::ok;
    EXPECT_GT(ok_late, (rs.size() - tail) / 2) << "of " << rs.size() - tail << " late requests";
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_GT(s.completed, 2u + ok_late);
  });
}

// Times in microseconds (the gaps' buckets start at about one: Batcher::kGapFloorNs).
constexpr int64_t us = 1'000;
// Costs by size (index = size): a call of one takes 1,000 us, of two 1,200, of three 1,500.
const std::vector<int64_t> kCurve{0, 1'000 * us, 1'200 * us, 1'500 * us};
constexpr int64_t kSecond = 1'000'000 * us;

void submitted_at(Request& r, int64_t ns) { r.submit_ns = ns; }

// A batch of one, taken at `first`; the queue runs dry at `dry`; the batch goes; the next
// request is submitted and taken at `second`: the batcher has seen one gap at size 1.
void one_gap(Batcher& b, Request (&r)[2], int64_t first, int64_t dry, int64_t second) {
  submitted_at(r[0], first);
  submitted_at(r[1], second);
  ASSERT_EQ(b.offer(&r[0], kNone, first), Fit::joined);
  b.ran_dry(dry);
  b.clear();
  ASSERT_EQ(b.offer(&r[1], kNone, second), Fit::joined);
}

TEST(BatcherWaiting, TheGapsBucketsDoubleFromAMicrosecondUpToMaxDelay) {
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, kCurve);
  EXPECT_EQ(b.gap_edge_ns(0), 1'024);
  EXPECT_EQ(b.gap_edge_ns(9), 524'288);
  EXPECT_EQ(b.gap_edge_ns(14), 16'777'216);
  EXPECT_EQ(b.gap_edge_ns(Batcher::kGapBuckets - 1), kSecond);
  const BatchingOptions short_delay{3, 20 * us, {}};
  Batcher s(short_delay, kCurve);
  EXPECT_EQ(s.gap_edge_ns(4), 16'384);
  EXPECT_EQ(s.gap_edge_ns(5), 20 * us) << "at most max_delay";
  EXPECT_EQ(s.gap_edge_ns(Batcher::kGapBuckets - 1), 20 * us);
}

TEST(BatcherWaiting, WaitsWhileNothingIsKnown) {
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[1];
  submitted_at(r[0], 100 * us);
  ASSERT_EQ(b.offer(&r[0], kNone, 200 * us), Fit::joined);
  b.ran_dry(300 * us);
  EXPECT_EQ(b.gaps_seen(1), 0.0) << "never ran dry before: no gap yet";
  EXPECT_EQ(b.wait_for_more_ns(), -1);
  EXPECT_TRUE(b.waiting_pays());
  EXPECT_FALSE(b.dispatch_now(false));
  EXPECT_EQ(b.wait_until(), 200 * us + kSecond) << "max_delay after it opened";
  const std::vector<int64_t> unmeasured;
  Batcher fresh(opt, unmeasured);
  Request s[2];
  one_gap(fresh, s, 100 * us, 200 * us, 400 * us);
  fresh.ran_dry(500 * us);
  EXPECT_EQ(fresh.gaps_seen(1), 1.0);
  EXPECT_EQ(fresh.wait_for_more_ns(), -1) << "no call measured";
}

TEST(BatcherWaiting, DispatchesAtOnceWhenTheNextRequestIsFartherThanTheSaving) {
  // A batch of one; one more would save c(1) + c(1) - c(2) = 800 us of worker time.
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[2];
  submitted_at(r[0], 0);
  submitted_at(r[1], 5'020 * us);  // a closed-loop client: one request per round trip
  ASSERT_EQ(b.offer(&r[0], kNone, 10 * us), Fit::joined);
  b.ran_dry(20 * us);
  b.clear();  // dispatched (nothing known: after waiting)
  ASSERT_EQ(b.offer(&r[1], kNone, 5'030 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(1), 1.0);
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 0.0);
  b.ran_dry(5'040 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 0);
  EXPECT_FALSE(b.waiting_pays());
  EXPECT_TRUE(b.dispatch_now(false));
  EXPECT_EQ(b.wait_until(), 5'040 * us) << "now";
}

TEST(BatcherWaiting, WaitsWhenRequestsArriveFasterThanTheSaving) {
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[4];
  submitted_at(r[0], 1'000 * us);
  submitted_at(r[1], 1'300 * us);  // 300 us after the queue ran dry
  ASSERT_EQ(b.offer(&r[0], kNone, 1'000 * us), Fit::joined);
  b.ran_dry(1'000 * us);
  b.clear();
  ASSERT_EQ(b.offer(&r[1], kNone, 1'300 * us), Fit::joined);
  submitted_at(r[2], 1'350 * us);
  ASSERT_EQ(b.offer(&r[2], kNone, 1'350 * us), Fit::joined);
  b.ran_dry(1'400 * us);
  EXPECT_EQ(b.wait_for_more_ns(), -1) << "a batch of two has seen no gap yet";
  submitted_at(r[3], 1'700 * us);
  ASSERT_EQ(b.offer(&r[3], kNone, 1'700 * us), Fit::full);
  EXPECT_EQ(b.gaps_seen(2), 1.0);
  b.clear();
  ASSERT_EQ(b.offer(&r[0], kNone, 2'000 * us), Fit::joined);
  ASSERT_EQ(b.offer(&r[1], kNone, 2'000 * us), Fit::joined);
  b.ran_dry(2'000 * us);
  // A batch of two; a third would save c(2) + c(1) - c(3) = 700 us, and came 300 us after the
  // queue ran dry: 2 x 300 us of waiting. It waits up to the edge of the gap's bucket,
  // 1,024 ns << 9 = 524 us, no longer.
  EXPECT_EQ(b.wait_for_more_ns(), 524'288);
  EXPECT_FALSE(b.dispatch_now(false));
  EXPECT_EQ(b.wait_until(), 2'000 * us + 524'288) << "well before max_delay";
  EXPECT_TRUE(b.dispatch_now(true)) << "stopping always dispatches";
}

TEST(BatcherWaiting, ABatchHoldingEveryClosedLoopClientDoesNotWait) {
  // Three closed-loop clients answered together resubmit 10 us apart, faster than the worker
  // takes them: submissions close together, but nothing comes once all three are in the batch
  // until its call (1,500 us) answers them. A batch of three would save c(3) + c(1) - c(4)
  // = 1,000 us (c(4), never measured, taken as c(3)); the next request is 1,510 us away.
  const BatchingOptions opt{8, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[3];
  int64_t t = 0;
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 3; ++i) {
      submitted_at(r[i], t + 10 * us * i);
      ASSERT_EQ(b.offer(&r[i], kNone, t + 10 * us * i), Fit::joined);
    }
    b.ran_dry(t + 30 * us);
    if (round > 0) {
      EXPECT_EQ(b.gaps_seen(3), round == 1 ? 1.0 : 1.875) << round;
      EXPECT_EQ(b.wait_for_more_ns(), 0) << round;
      EXPECT_TRUE(b.dispatch_now(false)) << round;
    }
    b.clear();  // dispatched: its call takes 1,500 us
    t += (30 + 1'500 + 10) * us;
  }
}

TEST(BatcherWaiting, TheGapIsLearnedPerBatchSize) {
  // Caught between resubmissions with one request, the worker waits for the others (they
  // come 50 us later); with all three it does not: that gap is a whole call.
  const BatchingOptions opt{8, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[3];
  submitted_at(r[0], 0);
  submitted_at(r[1], 150 * us);
  submitted_at(r[2], 200 * us);
  ASSERT_EQ(b.offer(&r[0], kNone, 100 * us), Fit::joined);
  b.ran_dry(100 * us);
  ASSERT_EQ(b.offer(&r[1], kNone, 150 * us), Fit::joined);
  ASSERT_EQ(b.offer(&r[2], kNone, 200 * us), Fit::joined);
  b.ran_dry(200 * us);
  b.clear();
  submitted_at(r[0], 2'200 * us);
  ASSERT_EQ(b.offer(&r[0], kNone, 2'200 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(1), 1.0);
  EXPECT_EQ(b.gaps_seen(3), 1.0);
  EXPECT_EQ(b.gaps_seen(2), 0.0);
  b.ran_dry(2'200 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 65'536) << "one request: the next came 50 us after (bucket of 32-65 us)";
  ASSERT_EQ(b.offer(&r[1], kNone, 2'250 * us), Fit::joined);
  ASSERT_EQ(b.offer(&r[2], kNone, 2'260 * us), Fit::joined);
  b.ran_dry(2'270 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 0) << "three: the next came a call later";
}

TEST(BatcherWaiting, TheGapsDecayAndThoseBeyondMaxDelayAreCountedApart) {
  const BatchingOptions opt{8, 10'000 * us, {}};
  Batcher b(opt, kCurve);
  Request r[4];
  const auto round = [&](Request& q, int64_t dry, int64_t submit) {
    submitted_at(q, submit);
    b.ran_dry(dry);
    b.ran_dry(dry + 5 * us);  // the first look that found nothing counts
    b.clear();
    ASSERT_EQ(b.offer(&q, kNone, submit), Fit::joined);
  };
  ASSERT_EQ(b.offer(&r[0], kNone, 0), Fit::joined);
  round(r[1], 100 * us, 900 * us);
  EXPECT_EQ(b.gaps_seen(1), 1.0);
  round(r[2], 1'000 * us, 9'800 * us);
  EXPECT_EQ(b.gaps_seen(1), 1.0 + 0.875) << "the older gap weighs 7/8";
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 0.0);
  round(r[3], 10'000 * us, 1'000'000 * us);
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 1.0) << "nothing came within max_delay";
  EXPECT_DOUBLE_EQ(b.gaps_seen(1), 1.0 + 0.875 + 0.875 * 0.875);
  submitted_at(r[0], 999'000 * us);  // submitted before the worker looked: a gap of 0
  round(r[0], 1'000'000 * us, 999'000 * us);
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 0.875);
  // Long unused, a bucket is emptied, not left to decay for ever.
  Request s[2];
  for (int i = 0; i < 200; ++i) {
    b.clear();
    one_gap(b, s, (2'000'000 + 20 * i) * us, (2'000'000 + 20 * i) * us, (2'000'010 + 20 * i) * us);
  }
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 0.0);
  EXPECT_NEAR(b.gaps_seen(1), 8.0, 1e-3) << "what 1 + 7/8 + (7/8)^2 + ... adds up to";
}

TEST(BatcherWaiting, ARequestStillBeingPushedWhenTheWorkerLookedIsWaitedFor) {
  // Submitted before the worker found the queue empty (its push not yet seen): a gap of 0.
  // The batch waits the shortest bucket's edge for the next such one, even with a max_delay
  // of 20 us, whose 1/32768 would be no wait at all.
  const BatchingOptions opt{8, 20 * us, {}};
  Batcher b(opt, kCurve);
  Request r[2];
  one_gap(b, r, 0, 10 * us, 5 * us);
  b.clear();
  ASSERT_EQ(b.offer(&r[0], kNone, 30 * us), Fit::joined);
  b.ran_dry(30 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 1'024);
  EXPECT_EQ(b.wait_until(), 30 * us + 1'024);
}

TEST(BatcherWaiting, AGapOfMaxDelayIsNotWorthWaitingFor) {
  // One more would save 800 us, but the next request has always come 500 us or more after
  // the queue ran dry, which is all the batch may wait.
  const BatchingOptions opt{3, 500 * us, {}};
  Batcher b(opt, kCurve);
  Request r[2];
  one_gap(b, r, 0, 0, 700 * us);
  EXPECT_EQ(b.gaps_beyond_max_delay(1), 1.0);
  b.ran_dry(700 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 0);
  EXPECT_FALSE(b.waiting_pays());
}

TEST(BatcherWaiting, TheWaitIsWhatTheBatchHasLeft) {
  // The next request comes 300 us after the queue ran dry, well worth waiting for; but this
  // batch ran dry 900 us after it opened and must go at 1 ms (max_delay). 100 us of waiting
  // catches nothing.
  const BatchingOptions opt{3, 1'000 * us, {}};
  Batcher b(opt, kCurve);
  Request r[2];
  one_gap(b, r, 0, 0, 300 * us);
  b.ran_dry(300 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 524'288) << "with its whole max_delay left";
  b.clear();
  submitted_at(r[0], 600 * us);  // 300 us after that dry look too
  ASSERT_EQ(b.offer(&r[0], kNone, 2'000 * us), Fit::joined);
  b.ran_dry(2'900 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 0);
  EXPECT_TRUE(b.dispatch_now(false));
  // With 400 us left, the gaps of 300 us would come in time, but their bucket (262-524 us) may
  // hold gaps up to 524 us: what the batcher cannot tell apart it does not count on.
  b.clear();
  submitted_at(r[0], 3'200 * us);
  ASSERT_EQ(b.offer(&r[0], kNone, 4'000 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(1), 1.0 + 0.875 + 0.875 * 0.875) << "three gaps of 300 us";
  b.ran_dry(4'600 * us);
  EXPECT_EQ(b.wait_for_more_ns(), 0) << "the gap's bucket ends past the time left: not counted on";
  EXPECT_EQ(b.wait_until(), 4'600 * us);
}

TEST(BatcherWaiting, GapsThatAreShortOrNeverAreWaitedForOnlyAsLongAsTheShortOnes) {
  // A batch of one is as often the first of a round of closed-loop clients (the next comes
  // 100 us later) as the last straggler of one (nothing comes within max_delay). On average
  // the next one is ~500 ms away, far more than the 800 us it saves; but waiting 131 us (the
  // edge of the bucket of 100 us) catches it half the time: ~400 us saved for ~115 waited.
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[2];
  int64_t t = 0;
  for (int round = 0; round < 6; ++round) {
    submitted_at(r[0], t);
    ASSERT_EQ(b.offer(&r[0], kNone, t), Fit::joined);
    b.ran_dry(t);
    b.clear();
    const int64_t next = round % 2 == 0 ? t + 100 * us : t + 2 * kSecond;
    submitted_at(r[1], next);
    ASSERT_EQ(b.offer(&r[1], kNone, next), Fit::joined);
    b.clear();
    t = next + 10 * us;
  }
  // Decayed: the newest (nothing came) weighs 1, the one before (100 us) 7/8, ...
  const double never = 1 + 0.875 * 0.875 + 0.875 * 0.875 * 0.875 * 0.875;
  EXPECT_DOUBLE_EQ(b.gaps_beyond_max_delay(1), never);
  EXPECT_DOUBLE_EQ(b.gaps_seen(1), never + 0.875 + 0.875 * 0.875 * 0.875 + 0.875 * 0.875 * 0.875 * 0.875 * 0.875);
  ASSERT_EQ(b.offer(&r[0], kNone, t), Fit::joined);
  b.ran_dry(t);
  EXPECT_EQ(b.gap_edge_ns(7), 131'072);
  EXPECT_EQ(b.wait_for_more_ns(), 131'072);
  EXPECT_EQ(b.wait_until(), t + 131'072);
}

// How long a batch of one waits by the call costs `cost_ns` (max_size 3), once a gap of 100 us
// was seen at its size and the queue ran dry again.
int64_t wait_after_a_gap_of_100us(const std::vector<int64_t>& cost_ns) {
  const BatchingOptions opt{3, kSecond, {}};
  Batcher b(opt, cost_ns);
  Request r[2];
  one_gap(b, r, 0, 0, 100 * us);
  b.ran_dry(200 * us);
  return b.wait_for_more_ns();
}

TEST(BatcherWaiting, ASizeNeverCalledIsWeighedBetweenTheSizesMeasuredAroundIt) {
  // Calls of one and of three measured at 1,000 us each; two never ran. Scaled up from one,
  // a call of two reads 2,000 us and one more request in a batch of one saves nothing; between
  // its neighbours it reads 1,000 us, and one more saves 1,000 us: worth waiting 100 us for.
  const std::vector<int64_t> flat{0, 1'000 * us, 0, 1'000 * us};
  EXPECT_EQ(wait_after_a_gap_of_100us(flat), 131'072);
  EXPECT_EQ(apportion::batch_estimate_ns(flat, 2), 2'000 * us) << "deadlines still plan with the scaled-up estimate";
}

TEST(BatcherWaiting, ASizeBeyondEveryMeasuredOneIsTakenToCostNoMore) {
  // Only calls of one measured (1,000 us). Scaled up, two would cost 2,000 us and one more
  // request save nothing: the worker never waited with one, and never learned what two cost.
  // Taken at 1,000 us until measured, one more saves 1,000 us, worth the 100 us it takes.
  const std::vector<int64_t> ones{0, 1'000 * us, 0, 0};
  EXPECT_EQ(wait_after_a_gap_of_100us(ones), 131'072);
  EXPECT_EQ(apportion::batch_estimate_ns(ones, 2), 2'000 * us) << "deadlines still plan with the scaled-up estimate";
}

TEST(BatcherWaiting, VeryLargeBatchesShareOneHistogram) {
  const BatchingOptions opt{5'000, kSecond, {}};
  Batcher b(opt, kCurve);
  std::vector<Request> r(Batcher::kGapSizes + 2);
  for (std::size_t i = 0; i + 1 < r.size(); ++i) ASSERT_EQ(b.offer(&r[i], kNone, 0), Fit::joined);
  b.ran_dry(0);
  submitted_at(r.back(), 100 * us);
  ASSERT_EQ(b.offer(&r.back(), kNone, 100 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(Batcher::kGapSizes + 1), 1.0);
  EXPECT_EQ(b.gaps_seen(4'999), 1.0) << "one histogram for kGapSizes and more";
  EXPECT_EQ(b.gaps_seen(Batcher::kGapSizes - 1), 0.0);
  EXPECT_EQ(b.gaps_seen(5'001), 0.0) << "beyond max_size: none";
}

TEST(BatcherWaiting, TheWaitIsWeighedAgainstEveryRequestItDelays) {
  // A batch of three; a fourth would save c(3) + c(1) - c(4) = 1,000 us (c(4), never
  // measured, taken as c(3)). It comes 400 us after the queue runs dry, sooner than that, but
  // each of the three waits those 400 us too: 1,200 us of waiting for 1,000 us saved.
  const BatchingOptions opt{8, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[4];
  for (int i = 0; i < 3; ++i) ASSERT_EQ(b.offer(&r[i], kNone, 0), Fit::joined);
  b.ran_dry(0);
  submitted_at(r[3], 400 * us);
  ASSERT_EQ(b.offer(&r[3], kNone, 400 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(3), 1.0);
  b.clear();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(b.offer(&r[i], kNone, 500 * us), Fit::joined);
  b.ran_dry(500 * us);
  EXPECT_FALSE(b.waiting_pays());
  b.clear();
  ASSERT_EQ(b.offer(&r[0], kNone, 600 * us), Fit::joined);
  b.ran_dry(600 * us);
  submitted_at(r[1], 1'000 * us);
  ASSERT_EQ(b.offer(&r[1], kNone, 1'000 * us), Fit::joined);
  EXPECT_EQ(b.gaps_seen(1), 1.0);
  b.clear();
  ASSERT_EQ(b.offer(&r[0], kNone, 1'100 * us), Fit::joined);
  b.ran_dry(1'100 * us);
  EXPECT_TRUE(b.waiting_pays()) << "alone, 400 us of waiting saves 800";
}

TEST(BatcherWaiting, DoesNotWaitWhileAnotherInstanceIdles) {
  // Nothing known, so this batch would wait max_delay; but a request that comes meanwhile is
  // the idle instance's at once.
  const BatchingOptions opt{8, kSecond, {}};
  Batcher b(opt, kCurve);
  Request r[1];
  ASSERT_EQ(b.offer(&r[0], kNone, 0), Fit::joined);
  b.ran_dry(0);
  EXPECT_TRUE(b.waiting_pays());
  EXPECT_FALSE(b.dispatch_now(false, /*sibling_idle=*/false));
  EXPECT_TRUE(b.dispatch_now(false, /*sibling_idle=*/true));
}

}  // namespace
