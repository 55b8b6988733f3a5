// Tests of live moves (Model::reshape, Registry::reshape): a model moved to other instances,
// batching or admission while requests flow loses, duplicates and reorders none of them past
// their deadline, never runs one on a worker of a retired generation after the move returned,
// keeps its stats, and stays where it was when a new instance fails to start or the shape is
// refused.
#include "engine_fixture.hpp"

#include "apportion/registry.hpp"

namespace {

using namespace apportion::testing::engine;
using apportion::Registry;
using apportion::RegistryStatus;

// Which move a worker was started in: the handler stores `epoch + 1` (at its start) in
// Worker::user. The test bumps `epoch` after each reshape() returns, so a worker may run a
// request only while `started_in + 1 >= epoch`: the old generation during the move, the new one
// after it.
struct Epochs {
  std::atomic<int64_t> epoch{0};
  std::atomic<int> stale_runs{0};

  void attach(TestHandler& h) {
    h.on_start = [this](Worker& w) {
      w.user = reinterpret_cast<void*>(static_cast<intptr_t>(epoch.load() + 1));
      return true;
    };
    h.on_batch = [this](Worker& w, Request* const*, std::size_t) { check(w); };
  }
  void check(const Worker& w) {
    const auto started_in = static_cast<int64_t>(reinterpret_cast<intptr_t>(w.user)) - 1;
    if (started_in + 1 < epoch.load()) stale_runs.fetch_add(1);
  }
};

Model::Shape shape(uint32_t instances, std::size_t max_queue = 1024, std::size_t batch = 1) {
  Model::Shape s;
  s.instances = instances;
  s.max_queue = max_queue;
  s.batching.max_size = batch;
  s.batching.max_delay_ns = 200'000;
  return s;
}

// Closed-loop clients: each keeps `depth` requests outstanding until `total` were submitted
// between them, then waits for its last ones. Every request is checked for one completion.
struct Clients {
  Model& m;
  uint64_t total;
  std::atomic<uint64_t> next{0};
  std::atomic<uint64_t> ok{0}, refused{0}, bad{0};

  void run(int depth) {
    std::vector<TestRef> mine;
    std::size_t head = 0;
    for (;;) {
      while (mine.size() - head >= static_cast<std::size_t>(depth)) {
        if (!completes(mine[head])) bad.fetch_add(1);
        ++head;
      }
      const uint64_t tag = next.fetch_add(1);
      if (tag >= total) break;
      TestRef r = make(tag);
      if (submit(m, r) != Admit::ok) {
        refused.fetch_add(1);
        continue;
      }
      mine.push_back(r);
    }
    for (; head < mine.size(); ++head) {
      if (!completes(mine[head])) bad.fetch_add(1);
    }
    for (const auto& r : mine) {
      if (r->completions.load() != 1 || r->runs.load() != 1 || r->outcome() != Outcome::ok) bad.fetch_add(1);
      else ok.fetch_add(1);
    }
  }
};

void moves_under_load(std::size_t batch) {
  auto h = std::make_shared<TestHandler>();
  Epochs epochs;
  epochs.attach(*h);
  ModelOptions o = opts(2);
  o.batching.max_size = batch;
  o.batching.max_delay_ns = 200'000;
  o.spin_ns = 0;
  h->on_run = [](Worker&, TestRequest&) {  // a call long enough for moves to land among them
    const int64_t until = now_ns() + 5'000;
    while (now_ns() < until) {
    }
    return Outcome::ok;
  };
  Model m(o, h);
  ASSERT_EQ(m.start(), 0u);
  const uint64_t total = apportion::testing::scaled(6000);
  Clients clients{m, total};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { clients.run(8); });
  const uint32_t sizes[] = {1, 3, 2, 1, 4, 2};
  int moves = 0;
  do {
    const uint32_t n = sizes[moves % 6];
    ASSERT_EQ(m.reshape(shape(n, 1024, batch)), 0u);
    epochs.epoch.fetch_add(1);
    EXPECT_EQ(m.instances(), n);
    ++moves;
  } while (clients.next.load() < total && moves < 200);
  for (auto& t : threads) t.join();
  m.close(true);
  m.join();
  EXPECT_GT(moves, 0);
  EXPECT_EQ(clients.bad.load(), 0u);
  EXPECT_EQ(clients.refused.load(), 0u);
  EXPECT_EQ(clients.ok.load(), total);
  EXPECT_EQ(epochs.stale_runs.load(), 0) << "a retired worker ran a request after its move returned";
  EXPECT_EQ(h->bad_state.load(), 0);
  const ModelSnapshot s = m.snapshot();
  EXPECT_EQ(s.submitted, total);
  EXPECT_EQ(s.completed, total);
  EXPECT_EQ(accounted(s), s.submitted);
  EXPECT_EQ(s.end_to_end.total, total) << "the retired workers' histograms are kept";
  EXPECT_EQ(m.moves(), static_cast<uint64_t>(moves));
  // Every worker that started was stopped once: old generations by their moves, the last by
  // the close.
  EXPECT_EQ(h->starts.load(), h->stops.load());
}

TEST_F(EngineTest, MovesUnderClosedLoopLoadLoseAndDuplicateNothing) {
  guarded(120s, [] { moves_under_load(1); });
}

TEST_F(EngineTest, MovesOfABatchingModelUnderLoadLoseAndDuplicateNothing) {
  guarded(120s, [] { moves_under_load(8); });
}

TEST_F(EngineTest, ARetiringBatchWorkerRunsTheBatchItHolds) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(1);
    o.batching.max_size = 8;
    o.batching.max_delay_ns = 10'000'000'000;  // the batch would wait for ever for company
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef r = make(1);
    ASSERT_EQ(submit(m, r), Admit::ok);
    while (m.queued() != 0) std::this_thread::yield();  // taken into a forming batch
    auto moved = shape(1, 1024, 8);
    moved.batching.max_delay_ns = 0;
    ASSERT_EQ(m.reshape(moved), 0u);  // returns once the old worker ran what it held
    EXPECT_TRUE(r->done());
    EXPECT_EQ(r->runs.load(), 1);
    EXPECT_EQ(r->outcome(), Outcome::ok);
    m.close(true);
    m.join();
  });
}

TEST_F(EngineTest, AMoveSwitchesBetweenSingleCallsAndBatchesAndCountsBoth) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    std::atomic<int> batched_calls{0};
    h->on_batch = [&](Worker& w, Request* const*, std::size_t) {
      if (!w.single) batched_calls.fetch_add(1);
    };
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    const auto serve = [&](int n) {
      std::vector<TestRef> rs;
      for (int i = 0; i < n; ++i) rs.push_back(make(i));
      ASSERT_EQ(submit_all(m, rs), Admit::ok);
      for (auto& r : rs) ASSERT_TRUE(completes(r));
    };
    serve(10);
    ASSERT_EQ(m.reshape(shape(1, 1024, 8)), 0u);
    serve(16);
    ASSERT_EQ(m.reshape(shape(2, 1024, 1)), 0u);
    serve(5);
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_GT(batched_calls.load(), 0);
    // One sample per call: the one-request calls of both single generations, plus the batches.
    EXPECT_EQ(s.batch_size.total, static_cast<uint64_t>(h->calls.load()));
    EXPECT_EQ(s.batch_size.sum, 31u) << "every request is in exactly one call";
    EXPECT_EQ(s.end_to_end.total, 31u);
  });
}

TEST_F(EngineTest, AFailedMoveLeavesTheOldWorkersServing) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Epochs epochs;
    epochs.attach(*h);
    std::atomic<bool> fail{false};
    auto inner = h->on_start;
    std::atomic<int> built{0};
    h->on_start = [&](Worker& w) {
      built.fetch_add(1);
      // The second new instance fails: the first started and must never serve.
      if (fail.load() && w.index == 1) return false;
      return inner(w);
    };
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    std::atomic<int> served_by_new{0};
    h->on_run = [&](Worker& w, TestRequest&) {
      if (reinterpret_cast<intptr_t>(w.user) != 1) served_by_new.fetch_add(1);
      return Outcome::ok;
    };
    fail.store(true);
    epochs.epoch.store(5);  // new workers record 6: only the old one (1) may serve
    std::vector<TestRef> rs;
    for (int i = 0; i < 50; ++i) {
      rs.push_back(make(i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    EXPECT_EQ(m.reshape(shape(3)), 1u);
    EXPECT_EQ(built.load(), 4);  // one old, three new started
    EXPECT_EQ(m.instances(), 1u);
    EXPECT_EQ(m.moves(), 0u);
    for (int i = 0; i < 50; ++i) {
      rs.push_back(make(100 + i));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    for (auto& r : rs) {
      ASSERT_TRUE(completes(r));
      EXPECT_EQ(r->runs.load(), 1);
    }
    EXPECT_EQ(served_by_new.load(), 0);
    // The two new instances that started were stopped without serving.
    EXPECT_EQ(h->stops.load(), 2);
    // And the model still moves once the failure is gone.
    fail.store(false);
    EXPECT_EQ(m.reshape(shape(2)), 0u);
    EXPECT_EQ(m.instances(), 2u);
    m.close(true);
    m.join();
    EXPECT_EQ(h->starts.load(), h->stops.load() + 1);  // the failed one never stops
  });
}

TEST_F(EngineTest, ShapesAMoveCannotTakeAreRefusedBeforeAnythingMoves) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(1, 64);
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    const auto refused = [&](Model::Shape s, const std::string& words) {
      try {
        m.reshape(std::move(s));
        ADD_FAILURE() << "accepted a shape that should be refused (" << words << ")";
      } catch (const std::invalid_argument& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find("model 'm'"), std::string::npos) << what;
        EXPECT_NE(what.find(words), std::string::npos) << what;
      }
    };
    refused(shape(0, 64), "instances must be >= 1");
    refused(shape(1, 65), "max_queue 65 is out of range");
    refused(shape(1, 0), "max_queue 0 is out of range");
    auto bad_placement = shape(2, 64);
    bad_placement.placement.resize(1);
    refused(bad_placement, "placement has 1 instances");
    auto groups = shape(2, 64);
    groups.instance_group = {0, 1};
    refused(groups, "NUMA node");
    auto out_of_range = shape(2, 64);
    out_of_range.instance_group = {0, 2};
    refused(out_of_range, "instance_group entry 2");
    EXPECT_EQ(h->starts.load(), 1);
    EXPECT_EQ(m.instances(), 1u);
    m.close(true);
    m.join();
  });
}

TEST_F(EngineTest, ABurstModelIsNotMovedLive) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(1);
    o.pool = std::make_shared<apportion::SharedPool>();
    o.pool->set_capacity(1);
    o.burst_instances = 1;
    Model m(o, h);
    EXPECT_THROW(m.reshape(shape(2)), std::invalid_argument);
  });
}

TEST_F(EngineTest, AMoveLowersAndRestoresAdmission) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1, 8), h);
    ASSERT_EQ(m.start(), 0u);
    ASSERT_EQ(m.reshape(shape(1, 2)), 0u);
    EXPECT_EQ(m.max_queue(), 2u);
    TestRef held = make(0);
    ASSERT_EQ(submit(m, held), Admit::ok);
    gate.wait_arrivals(1);
    TestRef a = make(1), b = make(2), c = make(3);
    EXPECT_EQ(submit(m, a), Admit::ok);
    EXPECT_EQ(submit(m, b), Admit::ok);
    EXPECT_EQ(submit(m, c), Admit::full);
    gate.open();
    for (auto* r : {&held, &a, &b}) ASSERT_TRUE(completes(*r));
    ASSERT_EQ(m.reshape(shape(1, 8)), 0u);
    EXPECT_EQ(m.max_queue(), 8u);
    m.close(true);
    m.join();
    EXPECT_EQ(m.snapshot().rejected, 1u);
  });
}

TEST_F(EngineTest, ANewAdmissionBoundAloneStartsNoWorkerAndKeepsTheQueue) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Gate gate;
    h->on_run = hold_tag0(gate);
    Model m(opts(1, 8), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef held = make(0);
    ASSERT_EQ(submit(m, held), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> queued;
    for (uint64_t i = 1; i <= 4; ++i) {
      queued.push_back(make(i));
      ASSERT_EQ(submit(m, queued.back()), Admit::ok);
    }
    // Below what is queued: new requests are refused, the queued ones stay.
    m.set_max_queue(2);
    EXPECT_EQ(m.max_queue(), 2u);
    TestRef refused = make(9);
    EXPECT_EQ(submit(m, refused), Admit::full);
    EXPECT_THROW(m.set_max_queue(0), std::invalid_argument);
    EXPECT_THROW(m.set_max_queue(9), std::invalid_argument);  // beyond the lanes' size
    EXPECT_EQ(m.max_queue(), 2u);
    m.set_max_queue(8);
    queued.push_back(make(5));
    EXPECT_EQ(submit(m, queued.back()), Admit::ok);
    gate.open();
    ASSERT_TRUE(completes(held));
    for (auto& r : queued) {
      ASSERT_TRUE(completes(r));
      EXPECT_EQ(r->outcome(), Outcome::ok);
    }
    m.close(true);
    m.join();
    EXPECT_EQ(h->starts.load(), 1) << "a new bound alone must not start workers";
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 6u);
    EXPECT_EQ(s.rejected, 1u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, AMoveBeforeStartChangesWhatStarts) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1, 16), h);
    ASSERT_EQ(m.reshape(shape(3, 4)), 0u);
    EXPECT_EQ(m.instances(), 3u);
    EXPECT_EQ(m.max_queue(), 4u);
    EXPECT_EQ(m.moves(), 0u);  // nothing was serving
    std::vector<TestRef> rs;
    for (int i = 0; i < 5; ++i) {
      rs.push_back(make(i));
      EXPECT_EQ(submit(m, rs.back()), i < 4 ? Admit::ok : Admit::full);
    }
    ASSERT_EQ(m.start(), 0u);
    EXPECT_EQ(h->starts.load(), 3);
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(completes(rs[i]));
    m.close(true);
    m.join();
  });
}

TEST_F(EngineTest, AMoveOfADelayModelChecksItsDelayedLaneRoom) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    ModelOptions o = opts(1, 14);  // the delayed lane: 2 x 14 + 1 cells, rounded up to 32
    o.on_timeout = OnTimeout::delay;
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    EXPECT_EQ(m.reshape(shape(3, 14)), 0u);  // 2 x 14 + 1 old + 3 new = 32
    EXPECT_THROW(m.reshape(shape(2, 14)), std::invalid_argument);  // 28 + 3 old + 2 new
    m.close(true);
    m.join();
  });
}

// --- through the registry ----------------------------------------------------------------------

std::shared_ptr<apportion::ModelEntry> entry(const std::string& name, std::shared_ptr<TestHandler> h,
                                             uint32_t instances) {
  ModelOptions o = opts(instances);
  o.name = name;
  return std::make_shared<apportion::ModelEntry>(std::make_shared<Model>(o, h), h);
}

TEST_F(EngineTest, RegistrySetsANamedModelsAdmissionBoundAndRefusesWhenClosed) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Registry reg;
    auto e = entry("a", h, 1);
    ASSERT_EQ(reg.add(e), RegistryStatus::ok);
    ASSERT_EQ(reg.start(), RegistryStatus::ok);
    EXPECT_EQ(reg.set_max_queue("a", 3), RegistryStatus::ok);
    EXPECT_EQ(e->model->max_queue(), 3u);
    EXPECT_EQ(reg.set_max_queue("b", 3), RegistryStatus::not_found);
    EXPECT_THROW(reg.set_max_queue("a", 4096), std::invalid_argument);
    EXPECT_EQ(e->model->max_queue(), 3u);
    reg.close(false);
    EXPECT_EQ(reg.set_max_queue("a", 4), RegistryStatus::closed);
    EXPECT_EQ(h->starts.load(), 1);
  });
}

TEST_F(EngineTest, RegistryMovesNamedModelsAndReportsWhyNot) {
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Registry reg;
    auto e = entry("a", h, 1);
    ASSERT_EQ(reg.add(e), RegistryStatus::ok);
    ASSERT_EQ(reg.start(), RegistryStatus::ok);
    EXPECT_EQ(reg.reshape("b", shape(2)), RegistryStatus::not_found);
    EXPECT_EQ(reg.reshape("a", shape(2)), RegistryStatus::ok);
    EXPECT_EQ(e->model->instances(), 2u);
    std::atomic<bool> fail{true};
    h->on_start = [&](Worker&) { return !fail.load(); };
    uint32_t failed = 0;
    EXPECT_EQ(reg.reshape("a", shape(3), &failed), RegistryStatus::start_failed);
    EXPECT_EQ(failed, 3u);
    EXPECT_EQ(e->model->instances(), 2u);
    EXPECT_NE(reg.find("a"), nullptr) << "a failed move keeps the model registered";
    reg.close(true);
    EXPECT_EQ(reg.reshape("a", shape(1)), RegistryStatus::closed);
  });
}

TEST_F(EngineTest, ACloseRacingAMoveWaitsForItAndCompletesEveryRequest) {
  guarded(60s, [] {
    for (int round = 0; round < static_cast<int>(apportion::testing::scaled(20)); ++round) {
      auto h = std::make_shared<TestHandler>();
      h->on_start = [](Worker&) {
        std::this_thread::sleep_for(1ms);  // a factory that takes a moment
        return true;
      };
      Registry reg;
      auto e = entry("a", h, 1);
      ASSERT_EQ(reg.add(e), RegistryStatus::ok);
      ASSERT_EQ(reg.start(), RegistryStatus::ok);
      std::vector<TestRef> rs;
      for (int i = 0; i < 40; ++i) {
        rs.push_back(make(i));
        ASSERT_EQ(submit(*e->model, rs.back()), Admit::ok);
      }
      std::thread mover([&] {
        const RegistryStatus s = reg.reshape("a", shape(2));
        EXPECT_TRUE(s == RegistryStatus::ok || s == RegistryStatus::closed) << apportion::to_string(s);
      });
      if (round % 2 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200 * (round % 5)));
      reg.close(round % 3 != 0);
      mover.join();
      for (auto& r : rs) {
        ASSERT_TRUE(completes(r));
        EXPECT_EQ(r->completions.load(), 1);
      }
      EXPECT_EQ(h->bad_state.load(), 0);
      EXPECT_EQ(h->starts.load(), h->stops.load());
    }
  });
}

}  // namespace
