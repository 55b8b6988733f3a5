// The model registry: names, lifecycle rules, nested calls from callbacks, and a fuzz of every
// admin call racing submissions with exact accounting.
#include "apportion/registry.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace apportion {
namespace {

using namespace std::chrono_literals;
using testing::Watchdog;

// Set in worker threads: a callback there may submit, but never join its own model.
thread_local bool in_worker = false;

struct CountedRequest : Request {
  std::atomic<int> completions{0};
};

// Completes every request; counts what happened. Hooks run in the thread that calls them.
class Handler : public ModelHandler {
 public:
  std::function<bool()> on_start;
  std::function<void()> on_abandon;  // after the request completed
  std::atomic<int> starts{0}, stops{0}, served{0}, abandoned{0};

  bool start_worker(Worker&) override {
    in_worker = true;
    starts.fetch_add(1);
    return on_start ? on_start() : true;
  }
  void run(Worker& w, Request* const* batch, std::size_t n) override {
    for (std::size_t i = 0; i < n; ++i) {
      auto* r = static_cast<CountedRequest*>(batch[i]);
      r->completions.fetch_add(1);
      Model::complete(*r, Outcome::ok, &w.shard);
      served.fetch_add(1);
      Request::release(r);
    }
  }
  void abandon(Worker*, Request* req, Outcome why) override {
    auto* r = static_cast<CountedRequest*>(req);
    r->completions.fetch_add(1);
    Model::complete(*r, why, nullptr);
    abandoned.fetch_add(1);
    Request::release(r);
    if (on_abandon) on_abandon();
  }
  void stop_worker(Worker&) override { stops.fetch_add(1); }
};

std::shared_ptr<ModelEntry> make_entry(const std::string& name, std::shared_ptr<Handler> h,
                                       uint32_t instances = 1, std::size_t max_queue = 64) {
  ModelOptions o;
  o.name = name;
  o.instances = instances;
  o.max_queue = max_queue;
  o.spin_ns = 0;
  return std::make_shared<ModelEntry>(std::make_shared<Model>(o, h), h, 50'000'000, 2);
}

// Submits one counted request; returns it (the caller keeps a reference) when admitted.
Ref<CountedRequest> submit(ModelEntry& e) {
  Ref<CountedRequest> r(new CountedRequest);
  r->counters = e.model->counters();
  r->add_ref();  // the queue's
  if (e.model->submit(r.get()) != Admit::ok) {
    r->try_claim(RequestState::claimed);
    Request::release(r.get());
    return {};
  }
  return r;
}

TEST(Registry, ARequestMayOnlyTightenItsModelsDeadline) {
  EXPECT_EQ(effective_timeout_ns(100, std::nullopt), 100);
  EXPECT_EQ(effective_timeout_ns(100, 40), 40);
  EXPECT_EQ(effective_timeout_ns(100, 400), 100);
  EXPECT_EQ(effective_timeout_ns(Request::kNoDeadline, 400), 400);
  EXPECT_EQ(effective_timeout_ns(Request::kNoDeadline, std::nullopt), Request::kNoDeadline);
  auto e = make_entry("m", std::make_shared<Handler>());
  EXPECT_EQ(e->timeout_ns(std::nullopt), 50'000'000);
  EXPECT_EQ(e->timeout_ns(int64_t{60'000'000}), 50'000'000);
  EXPECT_EQ(e->timeout_ns(int64_t{1'000}), 1'000);
  EXPECT_TRUE(e->priority_ok(0));
  EXPECT_TRUE(e->priority_ok(1));
  EXPECT_FALSE(e->priority_ok(2));
  EXPECT_FALSE(e->priority_ok(-1));
}

TEST(Registry, LaneCellsAreWhatTheEngineMakesAndSaturate) {
  // Each lane has 2 x max_queue cells (see Model::build_groups): counting max_queue alone put
  // a model's queue memory at half of what it took.
  EXPECT_EQ(lane_cells(1000, 1, 1, false, 1), 2048u);
  EXPECT_EQ(lane_cells(1024, 4, 2, false, 4), 2048u * 8);
  // The delayed lane holds one more per worker: 2 x 1024 + 4 rounds up to 4096.
  EXPECT_EQ(lane_cells(1024, 4, 2, true, 4), 2048u * 8 + 4096u);
  EXPECT_EQ(lane_cells(0, 0, 0, false, 0), 2u);
  EXPECT_EQ(lane_cells(uint64_t{1} << 63, 256, 1024, true, 1), UINT64_MAX);
  EXPECT_EQ(lane_cells(uint64_t{1} << 58, 256, 1024, true, 1), UINT64_MAX);
  EXPECT_EQ(lane_cells(1, 1, 1, true, UINT64_MAX), UINT64_MAX);
}

TEST(Registry, LaneCellsMatchTheLanesAModelMakes) {
  for (const bool delayed : {false, true}) {
    for (const std::size_t max_queue : {std::size_t{1}, std::size_t{5}, std::size_t{1000}}) {
      ModelOptions o;
      o.name = "m";
      o.instances = 3;
      o.priority_levels = 2;
      o.max_queue = max_queue;
      o.on_timeout = delayed ? OnTimeout::delay : OnTimeout::reject;
      Model m(o, std::make_shared<Handler>());
      EXPECT_EQ(lane_cells(max_queue, 2, 1, delayed, 3), m.queue_cells()) << max_queue << " " << delayed;
    }
  }
}

TEST(Registry, NamesAreUniqueAndRemovedModelsAreGone) {
  Watchdog dog(30s);
  Registry reg;
  auto h = std::make_shared<Handler>();
  auto b = make_entry("b", h), a = make_entry("a", h);
  EXPECT_EQ(reg.add(b), RegistryStatus::ok);
  EXPECT_EQ(reg.add(a), RegistryStatus::ok);
  EXPECT_EQ(reg.add(make_entry("a", h)), RegistryStatus::exists);
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(reg.find("a"), a);
  EXPECT_EQ(reg.find("zz"), nullptr);
  std::shared_ptr<ModelEntry> removed;
  EXPECT_EQ(reg.remove("a", true, &removed), RegistryStatus::ok);
  EXPECT_EQ(removed, a);
  EXPECT_EQ(reg.remove("a", true), RegistryStatus::not_found);
  EXPECT_EQ(reg.find("a"), nullptr);
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"b"}));
  EXPECT_STREQ(to_string(RegistryStatus::nested), "nested");
}

TEST(Registry, StartServesAndCloseRefusesNewModelsButKeepsTheListed) {
  Watchdog dog(30s);
  Registry reg;
  auto h = std::make_shared<Handler>();
  auto e = make_entry("m", h, 2);
  ASSERT_EQ(reg.add(e), RegistryStatus::ok);
  auto early = submit(*e);  // queued before start: served after
  ASSERT_TRUE(early);
  EXPECT_FALSE(reg.started());
  EXPECT_EQ(reg.start(), RegistryStatus::ok);
  EXPECT_TRUE(reg.started());
  auto later = submit(*e);
  ASSERT_TRUE(later);
  EXPECT_TRUE(early->wait_done(5'000'000'000));
  EXPECT_TRUE(later->wait_done(5'000'000'000));
  reg.close(true);
  reg.close(true);  // idempotent
  EXPECT_TRUE(reg.closed());
  EXPECT_EQ(h->stops.load(), 2);
  EXPECT_EQ(reg.add(make_entry("n", h)), RegistryStatus::closed);
  EXPECT_EQ(reg.start(), RegistryStatus::closed);
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"m"}));
  EXPECT_FALSE(submit(*e));  // the model is closed
}

TEST(Registry, AModelWhoseInstanceFailsToStartIsStoppedAndUnregistered) {
  Watchdog dog(30s);
  Registry reg;
  auto ok = std::make_shared<Handler>(), bad = std::make_shared<Handler>();
  bad->on_start = [] { return false; };
  auto good_entry = make_entry("good", ok), bad_entry = make_entry("bad", bad, 2);
  ASSERT_EQ(reg.add(good_entry), RegistryStatus::ok);
  ASSERT_EQ(reg.add(bad_entry), RegistryStatus::ok);
  auto queued = submit(*bad_entry);
  std::vector<std::shared_ptr<ModelEntry>> failed;
  EXPECT_EQ(reg.start(&failed), RegistryStatus::ok);  // every model starts even if one fails
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0], bad_entry);
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"good"}));
  ASSERT_TRUE(queued);
  EXPECT_TRUE(queued->done());  // cancelled when the model was stopped, exactly once
  EXPECT_EQ(queued->outcome(), Outcome::cancelled);
  EXPECT_EQ(queued->completions.load(), 1);

  auto bad2 = std::make_shared<Handler>();
  bad2->on_start = [] { return false; };
  EXPECT_EQ(reg.add(make_entry("late", bad2)), RegistryStatus::start_failed);
  EXPECT_EQ(reg.find("late"), nullptr);
  reg.close(false);
}

TEST(Registry, LifecycleCallsFromACallbackInsideCloseDoNotWaitForThemselves) {
  Watchdog dog(30s);
  Registry reg;
  auto h = std::make_shared<Handler>();
  auto e = make_entry("m", h);
  ASSERT_EQ(reg.add(e), RegistryStatus::ok);
  std::vector<Ref<CountedRequest>> reqs;
  for (int i = 0; i < 3; ++i) reqs.push_back(submit(*e));  // never started: close cancels them
  std::vector<RegistryStatus> nested;
  bool inside = false;
  h->on_abandon = [&] {
    inside = reg.in_lifecycle();
    reg.close(true);  // returns at once: the outer close finishes the work
    nested.push_back(reg.remove("m", true));
    nested.push_back(reg.add(make_entry("x", std::make_shared<Handler>())));
    nested.push_back(reg.start());
  };
  EXPECT_FALSE(reg.in_lifecycle());
  reg.close(false);
  EXPECT_TRUE(inside);
  EXPECT_FALSE(reg.in_lifecycle());
  ASSERT_EQ(nested.size(), 9u);
  for (auto s : nested) EXPECT_EQ(s, RegistryStatus::nested);
  for (auto& r : reqs) {
    EXPECT_EQ(r->outcome(), Outcome::cancelled);
    EXPECT_EQ(r->completions.load(), 1);
  }
  // Another registry's calls from inside this one's are not nested.
  Registry other;
  EXPECT_EQ(other.add(make_entry("o", std::make_shared<Handler>())), RegistryStatus::ok);
}

TEST(Registry, RemoveRacingAStartingAddWaitsForTheStartThenStopsIt) {
  Watchdog dog(30s);
  Registry reg;
  ASSERT_EQ(reg.start(), RegistryStatus::ok);
  auto h = std::make_shared<Handler>();
  std::atomic<bool> release{false}, entered{false};
  h->on_start = [&] {
    entered.store(true);
    entered.notify_all();
    while (!release.load()) std::this_thread::sleep_for(1ms);
    return true;
  };
  auto e = make_entry("m", h, 2);
  RegistryStatus added = RegistryStatus::nested;
  std::thread adder([&] { added = reg.add(e); });
  entered.wait(false);
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    EXPECT_EQ(reg.remove("m", true), RegistryStatus::ok);
    removed.store(true);
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(reg.find("m"), nullptr);  // gone from the map at once
  EXPECT_FALSE(removed.load());       // but its workers are still starting
  release.store(true);
  adder.join();
  remover.join();
  EXPECT_EQ(added, RegistryStatus::ok);
  EXPECT_EQ(h->starts.load(), 2);
  EXPECT_EQ(h->stops.load(), 2);
  reg.close(true);
}

TEST(Registry, CloseWaitsForTheWorkersOfAModelBeingRemoved) {
  Watchdog dog(30s);
  Registry reg;
  auto h = std::make_shared<Handler>();
  std::atomic<bool> release{false};
  auto e = make_entry("m", h);
  ASSERT_EQ(reg.add(e), RegistryStatus::ok);
  ASSERT_EQ(reg.start(), RegistryStatus::ok);
  // A worker that is slow to stop: stop_worker runs after the queue drained.
  struct SlowStop : Handler {
    std::atomic<bool>* release = nullptr;
    void stop_worker(Worker& w) override {
      while (!release->load()) std::this_thread::sleep_for(1ms);
      Handler::stop_worker(w);
    }
  };
  auto s = std::make_shared<SlowStop>();
  s->release = &release;
  ASSERT_EQ(reg.add(make_entry("slow", s)), RegistryStatus::ok);
  std::thread remover([&] { EXPECT_EQ(reg.remove("slow", true), RegistryStatus::ok); });
  while (reg.find("slow") != nullptr) std::this_thread::sleep_for(1ms);
  std::atomic<bool> closed{false};
  std::thread closer([&] {
    reg.close(true);
    closed.store(true);
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(closed.load());  // the retiring model's worker has not exited yet
  release.store(true);
  closer.join();
  remover.join();
  EXPECT_EQ(s->stops.load(), 1);
}

// Every admin call races submissions for at least 10 s (also under the sanitizers): no crash, no
// hang, and every admitted request completes exactly once.
TEST(Registry, FuzzAdminCallsRacingSubmissionsKeepExactAccounting) {
  Watchdog dog(90s);
  auto reg = std::make_shared<Registry>();
  ASSERT_EQ(reg->start(), RegistryStatus::ok);
  const std::vector<std::string> names = {"a", "b", "c"};
  std::mutex admitted_mu;
  std::vector<Ref<CountedRequest>> admitted;
  std::atomic<uint64_t> adds{0}, removes{0}, refused{0};
  std::atomic<bool> stop{false};
  const auto until = std::chrono::steady_clock::now() + 10s;

  auto admin = [&](unsigned seed) {
    std::mt19937 rng(seed);
    while (!stop.load()) {
      const auto& name = names[rng() % names.size()];
      auto h = std::make_shared<Handler>();
      // Some cancellations call back into the registry, as a done-callback would: a worker
      // submits again (what a callback there may do), the closing thread tries a removal
      // (nested: refused at once).
      if (rng() % 4 == 0) {
        h->on_abandon = [&reg, &admitted_mu, &admitted, name] {
          if (!in_worker) {
            (void)reg->remove(name, false);
            return;
          }
          if (auto e = reg->find(name)) {
            if (auto r = submit(*e)) {
              std::lock_guard lock(admitted_mu);
              admitted.push_back(std::move(r));
            }
          }
        };
      }
      if (rng() % 2 == 0) {
        if (reg->add(make_entry(name, h, 1 + rng() % 2)) == RegistryStatus::ok) adds.fetch_add(1);
      } else if (reg->remove(name, rng() % 2 == 0) == RegistryStatus::ok) {
        removes.fetch_add(1);
      }
    }
  };
  auto submitter = [&](unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<Ref<CountedRequest>> mine;
    while (!stop.load()) {
      auto e = reg->find(names[rng() % names.size()]);
      if (e == nullptr) {
        refused.fetch_add(1);
        continue;
      }
      if (rng() % 3 == 0) {
        Ref<CountedRequest> batch[4];
        Request* raw[4];
        for (int i = 0; i < 4; ++i) {
          batch[i] = Ref<CountedRequest>(new CountedRequest);
          batch[i]->counters = e->model->counters();
          batch[i]->add_ref();
          raw[i] = batch[i].get();
        }
        if (e->model->submit_n(raw, 4) == Admit::ok) {
          for (auto& r : batch) mine.push_back(r);
        } else {
          for (auto& r : batch) {
            r->try_claim(RequestState::claimed);
            Request::release(r.get());
          }
          refused.fetch_add(1);
        }
      } else if (auto r = submit(*e)) {
        mine.push_back(std::move(r));
      } else {
        refused.fetch_add(1);
      }
    }
    std::lock_guard lock(admitted_mu);
    for (auto& r : mine) admitted.push_back(std::move(r));
  };

  std::vector<std::thread> threads;
  threads.emplace_back(admin, 1u);
  threads.emplace_back(admin, 2u);
  threads.emplace_back(submitter, 3u);
  threads.emplace_back(submitter, 4u);
  while (std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
  std::thread closer([&] { reg->close(false); });  // closes while everything still runs
  std::this_thread::sleep_for(50ms);
  stop.store(true);
  for (auto& t : threads) t.join();
  closer.join();
  reg->close(true);

  EXPECT_GT(adds.load(), 10u);
  EXPECT_GT(removes.load(), 10u);
  ASSERT_FALSE(admitted.empty());
  for (auto& r : admitted) {
    ASSERT_TRUE(r->done());
    ASSERT_EQ(r->completions.load(), 1);
    ASSERT_TRUE(r->outcome() == Outcome::ok || r->outcome() == Outcome::cancelled);
  }
}

}  // namespace
}  // namespace apportion
