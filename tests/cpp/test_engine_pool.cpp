// The engine on a shared pool: models whose calls draw on one pool's capacity, and burst
// workers.
#include "engine_fixture.hpp"

namespace {

using namespace apportion::testing::engine;
using EnginePool = EngineTest;

TEST_F(EnginePool, PooledModelsNeverRunMoreCallsThanThePoolHasUnits) {
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

TEST_F(EnginePool, AHigherPriorityClassModelGoesBeforeABackloggedLowerOne) {
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

TEST_F(EnginePool, AModelOnThePoolChangesClassInPlaceAndOneWithoutAPoolHasNone) {
  guarded(60s, [] {
    // The pool's one unit is held; "mid" (class 3) waits for it, then a's worker (class 0)
    // with a request. Moved to class 4 while its worker waits, a goes first.
    auto pool = std::make_shared<SharedPool>(1);
    auto holder = pool->join("holder", 1.0, 10);
    const uint32_t held = pool->acquire(*holder, 1);
    std::mutex mu;
    std::vector<std::string> order;
    auto h = std::make_shared<TestHandler>();
    h->on_run = [&](Worker&, TestRequest&) {
      std::lock_guard lock(mu);
      order.emplace_back("a");
      return Outcome::ok;
    };
    Model a(pooled("a", 1, pool, 1.0, 0), h);
    ASSERT_EQ(a.start(), 0u);
    auto mid = pool->join("mid", 1.0, 3);
    std::thread t([&] {
      const uint32_t u = pool->acquire(*mid, 1);
      {
        std::lock_guard lock(mu);
        order.emplace_back("mid");
      }
      pool->release(*mid, u, 1000);
    });
    while (pool->waiting() < 1) std::this_thread::sleep_for(100us);
    auto r = make(1);
    ASSERT_EQ(submit(a, r), Admit::ok);
    while (pool->waiting() < 2) std::this_thread::sleep_for(100us);
    a.set_priority_class(4);
    pool->release(*holder, held, 1000);
    EXPECT_TRUE(completes(r));
    t.join();
    EXPECT_EQ(order, (std::vector<std::string>{"a", "mid"}));
    a.close(true);
    a.join();
    Model lone(opts(1), std::make_shared<TestHandler>());
    try {
      lone.set_priority_class(1);
      FAIL() << "a model without a pool took a class";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("scheduled shared pool"), std::string::npos) << e.what();
    }
  });
}

TEST_F(EnginePool, BackloggedPooledModelsSplitCallsByWeight) {
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
    const double time_ratio = static_cast<double>(a.snapshot().pool_busy_unit_ns) /
                              static_cast<double>(b.snapshot().pool_busy_unit_ns);
    a.close(false);
    b.close(false);
    a.join();
    b.join();
    // What the pool shares is time: 3:1 within a tenth. Calls of the same work split about as
    // much, less tightly: a call that oversleeps or is preempted costs its model more time
    // (2.6:1 seen under ThreadSanitizer beside another test).
    EXPECT_NEAR(time_ratio, 3.0, 0.3) << a.snapshot().pool_busy_unit_ns << " vs " << b.snapshot().pool_busy_unit_ns;
    EXPECT_NEAR(ratio, 3.0, 0.75) << ha->runs.load() << " vs " << hb->runs.load();
    for (auto& r : ra) ASSERT_EQ(r->completions.load(), 1);
    for (auto& r : rb) ASSERT_EQ(r->completions.load(), 1);
  });
}

TEST_F(EnginePool, BurstWorkersServeOnThePoolOnlyWhileOwnWorkersAreBusy) {
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

// A model with one own worker and one burst worker on `pool`: `blocker` (tag 0) holds the own
// worker until `gate` opens, and `r` (tag 1) is queued behind it for the burst worker.
struct HeldBurstModel {
  HeldBurstModel(std::shared_ptr<SharedPool> pool, Gate& gate) : h(std::make_shared<TestHandler>()) {
    h->on_run = hold_tag0(gate);
    ModelOptions o = opts(1);
    o.pool = std::move(pool);
    o.burst_instances = 1;
    m = std::make_unique<Model>(o, h);
    EXPECT_EQ(m->start(), 0u);
    EXPECT_EQ(submit(*m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    EXPECT_EQ(submit(*m, r), Admit::ok);
  }
  std::shared_ptr<TestHandler> h;
  std::unique_ptr<Model> m;
  TestRef blocker = make(0);
  TestRef r = make(1);
};

TEST_F(EnginePool, BurstWorkersWaitForPoolCapacity) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    auto other = pool->join("other", 1.0, 0);
    const uint32_t held = pool->acquire(*other, 1);  // the pool is busy with another model
    Gate gate;
    HeldBurstModel b(pool, gate);
    Model& m = *b.m;
    TestRef& r = b.r;
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

TEST_F(EnginePool, ADrainingCloseDoesNotWaitForABurstWorkerStuckOnAPoolWithNoCapacity) {
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(0);  // no CPUs in the pool: nothing is ever granted
    Gate gate;
    HeldBurstModel b(pool, gate);
    Model& m = *b.m;
    TestRef &blocker = b.blocker, &r = b.r;
    while (pool->waiting() == 0) std::this_thread::sleep_for(1ms);  // the burst worker waits in line
    m.close(true);
    gate.open();
    m.join();  // the burst worker left the line; the own worker drained the queue
    EXPECT_EQ(blocker->outcome(), Outcome::ok);
    EXPECT_EQ(r->outcome(), Outcome::ok);
    EXPECT_EQ(m.snapshot().burst_served, 0u);
    EXPECT_EQ(pool->waiting(), 0u);
  });
}

TEST_F(EnginePool, ABatchThatWaitedForThePoolExpiresWhatItCanNoLongerServeInTime) {
  // A batch is formed, judged by its requests' deadlines, and only then waits for pool
  // capacity: while other models' calls held the pool, a request whose deadline the call can
  // no longer meet is expired (before its deadline passes), not run to finish late.
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    Recorder rec;
    auto h = recording_handler(rec, nullptr, 200ms);  // every call: 200 ms
    ModelOptions o = batching_opts(4, 0);
    o.name = "batched";
    o.pool = pool;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef warm = make(1);  // the worker learns a call's duration
    ASSERT_EQ(submit(m, warm), Admit::ok);
    ASSERT_TRUE(completes(warm));

    auto other = pool->join("other", 1.0, 0);
    const uint32_t held = pool->acquire(*other, 1);  // another model's call holds the pool
    TestRef r = make(2);
    r->deadline_ns = now_ns() + 400'000'000;  // in time when taken (400 ms > 200 ms)...
    ASSERT_EQ(submit(m, r), Admit::ok);
    std::this_thread::sleep_for(250ms);  // ...but not once the pool is free: 150 ms left
    EXPECT_FALSE(r->done());
    pool->release(*other, held, 250'000'000);
    ASSERT_TRUE(completes(r));
    EXPECT_EQ(r->outcome(), Outcome::expired);
    EXPECT_EQ(r->runs.load(), 0);
    EXPECT_LT(r->start_ns, r->deadline_ns) << "expired before its deadline passed";

    TestRef next = make(3);  // the model goes on serving
    next->deadline_ns = now_ns() + 1'000'000'000;
    ASSERT_EQ(submit(m, next), Admit::ok);
    ASSERT_TRUE(completes(next));
    EXPECT_EQ(next->outcome(), Outcome::ok);
    EXPECT_EQ(rec.sizes(), (std::vector<std::size_t>{1, 1}));
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EnginePool, AnEstimateThatExpiresEveryBatchAfterThePoolWaitIsReMeasured) {
  // Calls took 20 ms while the worker learned them, then 1 ms. Each request has 30 ms: in
  // time by the 20 ms estimate when its batch forms, but the batch then waits 15 ms for the
  // pool, which another model holds, and is judged too late by that estimate. Expired whole,
  // no call runs, nothing corrects the estimate: without a re-measure the model would serve
  // nothing from then on.
  guarded(60s, [] {
    auto pool = std::make_shared<SharedPool>(1);
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> calls{0};
    h->on_batch = [&calls](Worker&, Request* const*, std::size_t) {
      std::this_thread::sleep_for(calls.fetch_add(1) < 3 ? 20ms : 1ms);
    };
    ModelOptions o = batching_opts(4, 0);
    o.name = "batched";
    o.pool = pool;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    for (uint64_t i = 1; i <= 3; ++i) {  // one at a time: three 20 ms calls of one
      TestRef warm = make(i);
      ASSERT_EQ(submit(m, warm), Admit::ok);
      ASSERT_TRUE(completes(warm));
    }
    auto other = pool->join("other", 1.0, 0);
    std::vector<TestRef> rs;
    for (uint64_t i = 10; i < 30; ++i) {
      const uint32_t held = pool->acquire(*other, 1);
      rs.push_back(make(i));
      rs.back()->deadline_ns = now_ns() + 30'000'000;
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
      while (pool->waiting() < 1) std::this_thread::sleep_for(100us);  // its batch waits
      std::this_thread::sleep_for(15ms);
      pool->release(*other, held, 15'000'000);
      ASSERT_TRUE(completes(rs.back()));
    }
    m.close(true);
    m.join();
    // The first rounds expire (the estimate is fresh); once no call has run for three
    // estimated calls (60 ms: four rounds), a batch runs anyway, its 1 ms call replaces the
    // estimate, and the rest run.
    std::size_t ok = 0;
    for (const auto& r : rs) ok += r->outcome() == Outcome::ok;
    EXPECT_EQ(rs.front()->outcome(), Outcome::expired);
    EXPECT_GE(ok, rs.size() / 2) << "of " << rs.size();
    EXPECT_EQ(rs.back()->outcome(), Outcome::ok);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EnginePool, PooledAndBurstPathsCompleteEveryRequestExactlyOnce) {
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

}  // namespace
