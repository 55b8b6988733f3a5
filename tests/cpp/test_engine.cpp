// Tests of the engine's serving loop (apportion::Model) with a plain C++ handler, in three tiers:
//  1. single-threaded semantics, with a live-object counter proving every request is destroyed
//     exactly once after its owners release it;
//  2. a multi-threaded fuzz with tagged requests (cancellations, deadlines, errors and a close in
//     the middle) checked for loss and duplicate completion;
//  3. every test that could block runs under a deadlock guard, so a hang becomes a failure.
// Lanes and groups, batching, metrics and the shared pool have test files of their own.
#include "engine_fixture.hpp"

namespace {

using namespace apportion::testing::engine;

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
    EXPECT_EQ(m.submit_n(nullptr, 0), Admit::closed) << "an empty batch to a closed model is refused too";
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

// Six requests at once and each completed: a backlog, over which a model that admits by
// deadline measures its pace (four intervals).
void backlog(Model& m) {
  std::vector<TestRef> warm;
  for (uint64_t i = 1; i <= 6; ++i) warm.push_back(make(i));
  ASSERT_EQ(submit_all(m, warm), Admit::ok);
  for (const auto& r : warm) ASSERT_TRUE(completes(r));
}

// Admission::deadline: once the model has been backlogged (so its pace is measured), a request
// whose deadline is shorter than the queue ahead of it times that pace is refused with `late`;
// requests without a deadline, with a far one, or facing an empty queue are admitted.
TEST_F(EngineTest, AdmissionByDeadlineRefusesWhatWouldWaitPastIt) {
  guarded(30s, [] {
    for (const Admission admission : {Admission::deadline, Admission::queue}) {
      auto h = std::make_shared<TestHandler>();
      Gate gate;
      h->on_run = hold_tag0(gate, 5ms);  // the pace is at least 5 ms
      ModelOptions o = opts(1, 64);
      o.admission = admission;
      Model m(o, h);
      ASSERT_EQ(m.start(), 0u);
      backlog(m);
      if (admission == Admission::deadline) {
        EXPECT_GE(m.drain_ns(), 5'000'000);
        EXPECT_GE(m.call_ns(), 5'000'000);
        EXPECT_GE(m.expected_wait_ns(3), 20'000'000);
      } else {
        EXPECT_EQ(m.drain_ns(), 0) << "only admission by deadline measures the pace";
        EXPECT_EQ(m.call_ns(), 0);
        EXPECT_EQ(m.expected_wait_ns(3), 0);
      }

      // An empty queue admits whatever the deadline.
      TestRef alone = make(7);
      alone->deadline_ns = now_ns() + 3'600'000'000'000LL;
      ASSERT_EQ(submit(m, alone), Admit::ok);
      ASSERT_TRUE(completes(alone));

      TestRef blocker = make(0);
      ASSERT_EQ(submit(m, blocker), Admit::ok);
      gate.wait_arrivals(1);
      std::vector<TestRef> ahead;
      for (uint64_t i = 10; i < 13; ++i) ahead.push_back(make(i));
      ASSERT_EQ(submit_all(m, ahead), Admit::ok);
      // The blocker in its call and three queued ahead of it at >= 5 ms each, then its own
      // call of >= 5 ms: 25 ms or more, against a 10 ms deadline.
      EXPECT_EQ(m.held(), admission == Admission::deadline ? 1u : 0u);
      TestRef tight = make(20);
      tight->deadline_ns = now_ns() + 10'000'000;
      TestRef far = make(21);
      far->deadline_ns = now_ns() + 3'600'000'000'000LL;
      TestRef none = make(22);
      if (admission == Admission::deadline) {
        EXPECT_EQ(submit(m, tight), Admit::late);
        // A refused request is the caller's: untouched, never completed.
        EXPECT_EQ(tight->state(), RequestState::queued);
        EXPECT_EQ(tight->completions.load(), 0);
        // All or nothing: one tight deadline refuses the whole batch.
        TestRef far2 = make(23);
        far2->deadline_ns = far->deadline_ns;
        EXPECT_EQ(submit_all(m, {far2, tight}), Admit::late);
        EXPECT_EQ(far2->completions.load(), 0);
      } else {
        EXPECT_EQ(submit(m, tight), Admit::ok);
      }
      EXPECT_EQ(m.queued(), admission == Admission::deadline ? 3u : 4u);
      EXPECT_EQ(submit(m, far), Admit::ok);
      EXPECT_EQ(submit(m, none), Admit::ok);
      gate.open();
      for (const auto* r : {&blocker, &far, &none}) ASSERT_TRUE(completes(*r));
      for (const auto& r : ahead) ASSERT_TRUE(completes(r));
      if (admission == Admission::queue) {
        ASSERT_TRUE(completes(tight));
        EXPECT_EQ(tight->outcome(), Outcome::expired) << "admitted, it waited past its deadline";
      }
      EXPECT_EQ(m.held(), 0u) << "every request taken was completed";
      m.close(true);
      m.join();
      const ModelSnapshot s = m.snapshot();
      EXPECT_EQ(s.rejected, admission == Admission::deadline ? 3u : 0u);
      EXPECT_EQ(s.submitted, accounted(s));
      EXPECT_EQ(h->bad_state.load(), 0);
    }
  });
}

// Admission::deadline judges the requests really queued ahead: those cancelled (or expired)
// while queued hold cells until a worker pops them, but they will never run.
TEST_F(EngineTest, AdmissionByDeadlineDoesNotCountSettledRequestsAhead) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate, 5ms);
    ModelOptions o = opts(1, 64);
    o.admission = Admission::deadline;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    backlog(m);
    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> gone;
    for (uint64_t i = 100; i < 140; ++i) {
      gone.push_back(make(i));
      ASSERT_EQ(submit(m, gone.back()), Admit::ok);
      ASSERT_TRUE(m.cancel(gone.back().get()));
    }
    EXPECT_EQ(m.queued(), 0u);
    // Ahead of it: the blocker's call alone. It was refused as if 40 calls of 5 ms were.
    TestRef next = make(50);
    next->deadline_ns = now_ns() + 150'000'000;
    EXPECT_EQ(submit(m, next), Admit::ok);
    gate.open();
    ASSERT_TRUE(completes(blocker));
    ASSERT_TRUE(completes(next));
    EXPECT_EQ(next->outcome(), Outcome::ok);
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.cancelled, 40u);
    EXPECT_EQ(s.rejected, 0u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

// Admission::deadline learns how late requests run against its estimate: calls that stretch
// after admission (here: from 5 ms to 30 ms, as a busy host stretches them) raise the margin
// it adds, so a request that the estimate alone would admit is refused; requests in time let
// the margin decay again.
TEST_F(EngineTest, AdmissionByDeadlineAddsHowLateRequestsRan) {
  guarded(60s, [] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> call_ms{5};
    Gate gate;
    h->on_run = [&](Worker&, TestRequest& r) {
      if (r.tag == 0) {
        gate.arrive();
        gate.wait();
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(call_ms.load()));
      }
      return Outcome::ok;
    };
    ModelOptions o = opts(1, 64);
    o.admission = Admission::deadline;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    auto backlog = [&](uint64_t first, int n) {
      std::vector<TestRef> rs;
      for (int i = 0; i < n; ++i) rs.push_back(make(first + static_cast<uint64_t>(i)));
      ASSERT_EQ(submit_all(m, rs), Admit::ok);
      for (const auto& r : rs) ASSERT_TRUE(completes(r));
    };
    backlog(1, 6);  // measured at 5 ms a call; no estimate existed when these were admitted
    EXPECT_EQ(m.overrun_ns(), 0);
    for (uint64_t i = 10; i < 20; ++i) {  // one at a time, in time: nothing runs late
      TestRef r = make(i);
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    EXPECT_LT(m.overrun_ns(), 5'000'000);
    call_ms = 30;
    backlog(30, 4);  // admitted expecting ~5 ms calls, each ran 30 ms: every one late
    const int64_t margin = m.overrun_ns();
    EXPECT_GE(margin, 20'000'000);

    TestRef blocker = make(0);
    ASSERT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    TestRef ahead = make(40);
    ASSERT_EQ(submit(m, ahead), Admit::ok);
    const int64_t estimate = m.expected_wait_ns(2);  // the blocker, one queued, then its own call
    ASSERT_GT(estimate, 0);
    // Within the estimate, but not the estimate plus how late requests ran: refused.
    TestRef tight = make(41);
    tight->deadline_ns = now_ns() + estimate + m.overrun_ns() / 2;
    EXPECT_EQ(submit(m, tight), Admit::late);
    EXPECT_EQ(tight->completions.load(), 0);
    TestRef roomy = make(42);
    roomy->deadline_ns = now_ns() + estimate + m.overrun_ns() + 3'600'000'000'000LL;
    EXPECT_EQ(submit(m, roomy), Admit::ok);
    call_ms = 5;
    gate.open();
    for (const auto* r : {&blocker, &ahead, &roomy}) ASSERT_TRUE(completes(*r));

    // Requests in time again: the margin decays by 1/32 with each (64 of them: to an eighth).
    const int64_t high = m.overrun_ns();
    for (uint64_t i = 100; i < 164; ++i) {
      TestRef r = make(i);
      ASSERT_EQ(submit(m, r), Admit::ok);
      ASSERT_TRUE(completes(r));
    }
    EXPECT_LT(m.overrun_ns(), high / 4);
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.rejected, 1u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, AdmissionByDeadlineNeedsOnePriorityLevel) {
  ModelOptions o = opts(1);
  o.admission = Admission::deadline;
  o.priority_levels = 2;
  EXPECT_THROW(Model(o, std::make_shared<TestHandler>()), std::invalid_argument);
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
    // Its admission slot is back at once; only its cell waits for a worker to pop it.
    EXPECT_EQ(m.queued(), 1u);

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

TEST_F(EngineTest, ATombstoneIsDroppedThroughTheHandler) {
  // The caller cancels a queued request and lets go of it: the queue's reference, dropped
  // when a worker pops the tombstone, is the last one. It must go through the handler (the
  // Python handler frees the request's objects under the GIL there), with a plain worker and
  // with a batching one.
  for (const uint32_t batch : {1u, 4u}) {
    SCOPED_TRACE(batch);
    const int64_t live_before = live();
    guarded(30s, [batch, live_before] {
      auto h = std::make_shared<TestHandler>();
      Gate gate;
      h->on_run = hold_tag0(gate);
      ModelOptions o = opts(1);
      o.batching.max_size = batch;
      Model m(o, h);
      ASSERT_EQ(m.start(), 0u);
      TestRef running = make(0);
      ASSERT_EQ(submit(m, running), Admit::ok);
      gate.wait_arrivals(1);
      TestRef victim = make(1);
      ASSERT_EQ(submit(m, victim), Admit::ok);
      ASSERT_TRUE(m.cancel(victim.get()));
      victim = TestRef();  // the queue holds the last reference now
      EXPECT_EQ(live() - live_before, 2);
      EXPECT_EQ(h->releases.load(), 0);
      gate.open();
      ASSERT_TRUE(completes(running));
      m.close(true);
      m.join();
      EXPECT_EQ(h->releases.load(), 1) << "the tombstone's last reference bypassed the handler";
      EXPECT_EQ(live() - live_before, 1) << "the tombstone was not freed";
      EXPECT_EQ(h->bad_state.load(), 0);
    });
  }
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

// Request 0 submitted to `m` (one instance, its handler holding tag 0 at `gate`) and running,
// then requests 1..n queued behind it (into `queued`).
void queue_behind_a_running_call(Model& m, Gate& gate, TestRef& running, std::vector<TestRef>& queued, uint64_t n) {
  running = make(0);
  ASSERT_EQ(submit(m, running), Admit::ok);
  gate.wait_arrivals(1);
  for (uint64_t i = 1; i <= n; ++i) {
    queued.push_back(make(i));
    ASSERT_EQ(submit(m, queued.back()), Admit::ok);
  }
}

// Each of `rs` completed once, as cancelled, never run.
void expect_cancelled_unrun(const std::vector<TestRef>& rs) {
  for (const auto& r : rs) {
    ASSERT_TRUE(r->done()) << r->tag;
    EXPECT_EQ(r->outcome(), Outcome::cancelled) << r->tag;
    EXPECT_EQ(r->runs.load(), 0) << r->tag;
    EXPECT_EQ(r->completions.load(), 1) << r->tag;
  }
}

TEST_F(EngineTest, CloseWithoutDrainCancelsQueuedAndFinishesRunning) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef running;
    std::vector<TestRef> queued;
    ASSERT_NO_FATAL_FAILURE(queue_behind_a_running_call(m, gate, running, queued, 5));
    m.close(false);
    gate.open();
    m.join();
    ASSERT_TRUE(running->done());
    EXPECT_EQ(running->outcome(), Outcome::ok) << "a running call finishes";
    expect_cancelled_unrun(queued);
    EXPECT_EQ(h->runs.load(), 1);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 1u);
    EXPECT_EQ(s.cancelled, 5u);
    EXPECT_EQ(s.submitted, accounted(s));
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineTest, CancelQueuedCancelsWhatIsQueuedAndTakenLaterButAdmitsAndRunsNothingElse) {
  // What close(false) does first, alone (a close without drain calls it before it stops the
  // running calls of process children, so a worker freed by that finds the queue cancelled).
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef running;
    std::vector<TestRef> queued;
    ASSERT_NO_FATAL_FAILURE(queue_behind_a_running_call(m, gate, running, queued, 3));
    m.cancel_queued();
    queued.push_back(make(9));
    EXPECT_EQ(submit(m, queued.back()), Admit::ok) << "admission is close()'s to end";
    gate.open();
    m.close(true);  // a draining close afterwards still cancels: the queue was cancelled
    m.join();
    EXPECT_EQ(running->outcome(), Outcome::ok);
    expect_cancelled_unrun(queued);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.cancelled, 4u);
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
// Tier 2: multi-threaded fuzz. Tagged requests from four producers, a canceller, short
// deadlines, failing calls, and a close() part-way through; then every request is checked.

struct FuzzParams {
  bool drain;
  uint32_t instances;
  bool batches;  // also submit with submit_n (all-or-nothing batches racing the close)
  uint32_t levels = 1;         // priority lanes (requests also carry out-of-range priorities)
  std::size_t batch_size = 1;  // dynamic batching when > 1
  bool delay = false;          // on_timeout=delay
  bool by_deadline = false;    // Admission::deadline (its count of taken requests ends at 0)
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
    if (p.by_deadline) o.admission = Admission::deadline;
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
    EXPECT_EQ(m.held(), 0u) << "a request taken (or popped as settled) stayed counted as held";

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
                                           FuzzParams{true, 1, false, 1, 4, true},
                                           FuzzParams{true, 2, true, 1, 1, false, true},
                                           FuzzParams{false, 3, true, 1, 8, false, true},
                                           FuzzParams{true, 2, true, 1, 8, true, true}),
                         [](const ::testing::TestParamInfo<FuzzParams>& param_info) {
                           const FuzzParams& q = param_info.param;
                           std::string name = std::string(q.drain ? "Drain" : "Cancel") +
                                              std::to_string(q.instances) + "Instances" +
                                              (q.batches ? "Batches" : "");
                           if (q.levels > 1) name += std::to_string(q.levels) + "Levels";
                           if (q.batch_size > 1) name += "Batch" + std::to_string(q.batch_size);
                           if (q.delay) name += "Delay";
                           if (q.by_deadline) name += "AdmitByDeadline";
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

}  // namespace
