// Lanes: priority order, the delay policy, lane groups (node-local queues with stealing), both
// through a model and on apportion::LaneSet alone.
#include "engine_fixture.hpp"

#include <stdexcept>
#include <string>
#include <vector>

#include "apportion/lanes.hpp"

namespace {

using namespace apportion::testing::engine;
using EngineLanes = EngineTest;

// ---------------------------------------------------------------------------------------------
// Priority lanes and the delay policy, through a model.


TEST_F(EngineLanes, HighestPriorityLaneIsServedFirst) {
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

TEST_F(EngineLanes, MaxQueueBoundsAllLanesTogether) {
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

TEST_F(EngineLanes, DelayPolicyRunsExpiredRequestsAfterEverythingElse) {
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

TEST_F(EngineLanes, DelayedRequestsAreCancelledByACloseWithoutDrain) {
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

// ---------------------------------------------------------------------------------------------
// Lane groups (instance_group): node-local queues, with stealing when a group's own are busy.

TEST_F(EngineLanes, GroupsSplitTheLanesAndWorkers) {
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

TEST_F(EngineLanes, RequestsStayInTheirGroupWhileItsWorkersAreFree) {
  guarded(30s, [] {
    GroupedModel g({0, 0, 1, 1}, 1);
    auto& h = g.h;
    auto& m = g.m;
    h->on_run = nullptr;  // nothing is held
    ASSERT_TRUE(g.start_idle());
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

TEST_F(EngineLanes, AWorkerStealsFromAGroupWhoseWorkersAreBusyHighestPriorityFirst) {
  guarded(30s, [] {
    GroupedModel g({0, 1}, 2);
    auto& h = g.h;
    auto& m = g.m;
    ASSERT_TRUE(g.start_idle());
    TestRef blocker = g.hold(0);
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
    g.gate.open();
    ASSERT_TRUE(completes(blocker));
    m.close(true);
    m.join();
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.completed, 6u);
    EXPECT_EQ(s.stolen, 4u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineLanes, APushToABusyGroupWakesAParkedWorkerOfAnother) {
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

TEST_F(EngineLanes, PriorityOrderHoldsWithinAGroup) {
  guarded(30s, [] {
    GroupedModel g({0, 1}, 3);
    auto& h = g.h;
    auto& m = g.m;
    ASSERT_TRUE(g.start_idle());
    TestRef blocker = g.hold(0);
    std::vector<TestRef> rs;
    for (uint64_t i = 1; i <= 9; ++i) {
      rs.push_back(make_in(i, 0, static_cast<uint32_t>(2 - (i - 1) % 3)));
      ASSERT_EQ(submit(m, rs.back()), Admit::ok);
    }
    g.gate.open();
    for (auto& r : rs) ASSERT_TRUE(completes(r));
    m.close(true);
    m.join();
    EXPECT_EQ(h->order_in(0), (std::vector<uint64_t>{0, 3, 6, 9, 2, 5, 8, 1, 4, 7}));
    EXPECT_EQ(m.snapshot().stolen, 0u);
    EXPECT_EQ(h->bad_state.load(), 0);
  });
}

TEST_F(EngineLanes, MaxQueueBoundsAllGroupsTogether) {
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

TEST_F(EngineLanes, RegroupingBeforeStartKeepsQueuedRequests) {
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
TEST_F(EngineLanes, APushWakesAParkedWorkerOfItsOwnGroupFirst) {
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

TEST_F(EngineLanes, SubmissionsGoToTheGroupOfTheSubmittingCpu) {
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
    o.spin_beside_caller = true;  // the submitters run on their group's one CPU
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

TEST_F(EngineLanes, GroupedLanesCompleteEveryRequestExactlyOnce) {
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

// ---------------------------------------------------------------------------------------------
// apportion::LaneSet alone: no model, no threads.

using apportion::LaneSet;

// Pops everything `group` would take next (with or without stealing), as tags.
std::vector<uint64_t> drain(LaneSet& ls, uint32_t group, bool steal,
                            std::vector<uint32_t>* lanes = nullptr) {
  std::vector<uint64_t> out;
  Request* r = nullptr;
  uint32_t lane = 0;
  while (ls.try_take(group, r, lane, steal)) {
    out.push_back(static_cast<TestRequest*>(r)->tag);
    if (lanes != nullptr) lanes->push_back(lane);
  }
  return out;
}

TEST_F(EngineLanes, LaneSetServesHigherPrioritiesFirstAndFifoWithinOne) {
  LaneSet ls;
  ls.build(1, 3, 8, 0);
  EXPECT_EQ(ls.size(), 3u);
  EXPECT_FALSE(ls.has_delayed());
  std::vector<TestRef> rs;
  const uint32_t prio[] = {2, 0, 1, 0, 99};  // 99: clamped into the last lane
  for (uint64_t i = 0; i < 5; ++i) {
    rs.push_back(make(i));
    ls.push(0, prio[i], rs.back().get());
  }
  EXPECT_EQ(drain(ls, 0, true), (std::vector<uint64_t>{1, 3, 2, 0, 4}));
  EXPECT_EQ(ls.stolen(), 0u);
}

TEST_F(EngineLanes, LaneSetStealsOnlyWhenAskedHighestPriorityFirst) {
  LaneSet ls;
  ls.build(3, 2, 8, 0);
  EXPECT_EQ(ls.size(), 6u);
  std::vector<TestRef> rs;
  const auto put = [&](uint64_t tag, uint32_t group, uint32_t prio) {
    rs.push_back(make(tag));
    ls.push(group, prio, rs.back().get());
  };
  put(0, 0, 1);
  put(1, 2, 1);
  put(2, 1, 1);
  put(3, 2, 0);
  put(4, 1, 0);
  // Its own group only: what it holds, nothing of the others'.
  EXPECT_EQ(drain(ls, 0, false), (std::vector<uint64_t>{0}));
  EXPECT_EQ(ls.stolen(), 0u);
  // Then the others', priority 0 of every group before priority 1, victims from the next
  // group on (1, then 2).
  EXPECT_EQ(drain(ls, 0, true), (std::vector<uint64_t>{4, 3, 2, 1}));
  EXPECT_EQ(ls.stolen(), 4u);
}

TEST_F(EngineLanes, LaneSetTakesFromEveryGroupAlikeForNoGroupWithoutCountingSteals) {
  LaneSet ls;
  ls.build(2, 1, 4, 0);
  TestRef a = make(0), b = make(1);
  ls.push(1, 0, a.get());
  ls.push(0, 0, b.get());
  EXPECT_EQ(drain(ls, LaneSet::kNoGroup, true), (std::vector<uint64_t>{1, 0}));
  EXPECT_EQ(ls.stolen(), 0u) << "a burst worker or join() steals from no group of its own";
}

TEST_F(EngineLanes, LaneSetServesTheDelayedLaneLast) {
  LaneSet ls;
  ls.build(2, 2, 4, 5);
  ASSERT_TRUE(ls.has_delayed());
  EXPECT_EQ(ls.delayed_lane(), 4u);
  EXPECT_EQ(ls.size(), 5u);
  TestRef late = make(0), low = make(1);
  ls.push_delayed(late.get());
  ls.push(1, 1, low.get());
  std::vector<uint32_t> lanes;
  EXPECT_EQ(drain(ls, 0, true, &lanes), (std::vector<uint64_t>{1, 0}));
  EXPECT_EQ(lanes, (std::vector<uint32_t>{3, 4}));
}

TEST_F(EngineLanes, LaneSetRegroupingKeepsQueuedRequestsInOrder) {
  LaneSet ls;
  ls.build(2, 2, 8, 4);
  std::vector<TestRef> rs;
  for (uint64_t i = 0; i < 6; ++i) {
    rs.push_back(make(i));
    if (i == 5) {
      ls.push_delayed(rs.back().get());
    } else {
      ls.push(static_cast<uint32_t>(i % 2), static_cast<uint32_t>(i / 2 % 2), rs.back().get());
    }
  }
  ls.build(1, 2, 8, 4);
  EXPECT_EQ(ls.groups(), 1u);
  EXPECT_EQ(ls.size(), 3u);
  // Group 0's then the former group 1's, per priority; the delayed lane kept as it was.
  EXPECT_EQ(drain(ls, 0, true), (std::vector<uint64_t>{0, 4, 1, 2, 3, 5}));
}

TEST_F(EngineLanes, LaneSetRefusesLevelsAndGroupsALaneIndexCannotHold) {
  LaneSet ls;
  EXPECT_THROW(ls.build(1, 0, 4, 0), std::invalid_argument);
  EXPECT_THROW(ls.build(1, LaneSet::kMaxLevels + 1, 4, 0), std::invalid_argument);
  EXPECT_THROW(ls.build(LaneSet::kMaxGroups + 1, 1, 4, 0), std::invalid_argument);
  ModelOptions o = opts(1);
  o.name = "ranker";
  o.priority_levels = LaneSet::kMaxLevels + 1;
  try {
    Model m(o, std::make_shared<TestHandler>());
    ADD_FAILURE() << "priority_levels beyond LaneSet::kMaxLevels was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'ranker'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("priority_levels"), std::string::npos) << e.what();
  }
}

TEST_F(EngineLanes, LaneSetWakesItsOwnGroupFirstThenTheOthers) {
  LaneSet ls;
  ls.build(3, 1, 4, 0);
  // Announced sleepers (not parked: wake-ups are counted, the futex finds nobody).
  apportion::EventCount::Waiter w1, w2;
  const auto t1 = ls.idle(1).prepare_wait(w1);
  const auto t2 = ls.idle(2).prepare_wait(w2);
  ls.wake(1, 1);
  EXPECT_EQ(ls.idle(1).wakeups_in_flight(), 1u) << "the pushed-to group's sleeper first";
  EXPECT_EQ(ls.idle(2).wakeups_in_flight(), 0u);
  ls.wake(1, 1);
  EXPECT_EQ(ls.idle(2).wakeups_in_flight(), 1u) << "its own has a wake-up already: another group's";
  ls.wake(1, 0);
  EXPECT_EQ(ls.idle(0).wakeups_in_flight() + ls.idle(1).wakeups_in_flight() +
                ls.idle(2).wakeups_in_flight(),
            2u)
      << "nobody left to wake";
  ls.idle(1).cancel_wait(t1);
  ls.idle(2).cancel_wait(t2);
  EXPECT_EQ(ls.idle(1).sleepers() + ls.idle(2).sleepers(), 0u);
  EXPECT_EQ(&ls.idle(LaneSet::kNoGroup), &ls.idle(0));
}

#if defined(__linux__)
TEST_F(EngineLanes, LaneSetRoutesByTheSubmittingCpuElseRoundRobin) {
  LaneSet ls;
  ls.build(2, 1, 4, 0);
  // Off every mapped CPU: round-robin over the groups.
  const uint32_t a = ls.route(), b = ls.route();
  EXPECT_LT(a, 2u);
  EXPECT_NE(a, b);
  // Every CPU this thread can run on mapped to group 1.
  ls.set_cpu_groups(std::vector<uint32_t>(CPU_SETSIZE, 1));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(ls.route(), 1u);
}
#endif

}  // namespace
