// Shared fixtures of the engine tests (test_engine*.cpp, test_lanes.cpp, test_batcher.cpp):
// a tagged request with a live-object counter, a handler that runs a std::function and checks
// the handler contract, a gate to hold a worker inside a call, submit helpers, the recording
// handler for order tests, and the grouped-model setup (GroupHandler, grouped(), make_in()).
#pragma once

#include <gtest/gtest.h>

#if defined(__linux__)
#include <sched.h>
#endif

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

namespace apportion::testing::engine {


using apportion::Admission;
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

inline TestRef make(uint64_t tag = 0, Behaviour b = Behaviour::ok) {
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

  // References the engine drops through the handler (a discarded tombstone, the expiry
  // timer's): a handler whose requests hold objects that need something to be freed (Python's
  // need the GIL) adds it here, so the engine must never drop such a reference behind its back.
  std::atomic<int> releases{0};
  void release(Request* r) override {
    releases.fetch_add(1);
    ModelHandler::release(r);
  }

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
// wants) and serves every other request at once, or after `pace` when one is given.
inline std::function<Outcome(Worker&, TestRequest&)> hold_tag0(Gate& gate,
                                                              std::chrono::nanoseconds pace = {}) {
  return [&gate, pace](Worker&, TestRequest& r) {
    if (r.tag == 0) {
      gate.arrive();
      gate.wait();
    } else if (pace.count() > 0) {
      std::this_thread::sleep_for(pace);
    }
    return Outcome::ok;
  };
}

// The queue's reference is added before submit and dropped again when admission says no.
inline Admit submit(Model& m, const TestRef& r) {
  r->add_ref();
  const Admit a = m.submit(r.get());
  if (a != Admit::ok) Request::release(r.get());
  return a;
}

inline Admit submit_all(Model& m, const std::vector<TestRef>& rs) {
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
inline ::testing::AssertionResult completes(const TestRef& r) {
  if (r->wait_done(10'000'000'000LL * (kSanitized ? 4 : 1))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "request " << r->tag << " never completed";
}

inline uint64_t accounted(const ModelSnapshot& s) {
  return s.completed + s.failed + s.rejected + s.expired + s.cancelled;
}

inline ModelOptions opts(uint32_t instances, std::size_t max_queue = 1024) {
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

// A handler whose first call (tag 0) blocks on a gate, recording every call's tags in order.
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

inline ModelOptions batching_opts(std::size_t max_size, int64_t max_delay_ns,
                           std::vector<std::size_t> preferred = {}) {
  ModelOptions o = opts(1);
  o.batching = BatchingOptions{max_size, max_delay_ns, std::move(preferred)};
  return o;
}

using apportion::SharedPool;

inline ModelOptions pooled(const char* name, uint32_t instances, std::shared_ptr<SharedPool> pool,
                    double weight = 1.0, int32_t priority_class = 0) {
  ModelOptions o = opts(instances);
  o.name = name;
  o.pool = std::move(pool);
  o.weight = weight;
  o.priority_class = priority_class;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Lane groups (instance_group): the grouped-model setup.

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

inline ModelOptions grouped(std::vector<uint32_t> groups, int64_t spin_ns, std::size_t max_queue = 1024) {
  ModelOptions o = opts(static_cast<uint32_t>(groups.size()), max_queue);
  o.instance_group = std::move(groups);
  o.spin_ns = spin_ns;
  return o;
}

inline TestRef make_in(uint64_t tag, uint32_t group, uint32_t priority = 0) {
  TestRef r = make(tag);
  r->group = group;
  r->priority = priority;
  return r;
}

// A model of `instances` (not started) whose TestHandler holds request 0 at `gate` until the
// test opens it, and serves the rest at once.
struct HeldModel {
  std::shared_ptr<TestHandler> h = std::make_shared<TestHandler>();
  Gate gate;
  Model m;

  HeldModel(uint32_t instances, std::size_t max_queue) : m(opts(instances, max_queue), h) {
    h->on_run = hold_tag0(gate);
  }
};

// The grouped-model setup most group tests share: a started model whose own instances serve
// `groups` (one entry per instance), a GroupHandler that holds request 0 at `gate`, and every
// worker gone idle before the test submits (with kSpinForever each then watches only its own
// group's lanes: "who serves what" is deterministic).
struct GroupedModel {
  std::shared_ptr<GroupHandler> h = std::make_shared<GroupHandler>();
  Gate gate;
  Model m;

  GroupedModel(std::vector<uint32_t> groups, uint32_t levels, int64_t spin_ns = kSpinForever)
      : m(with_levels(grouped(std::move(groups), spin_ns), levels), h) {
    h->on_run = hold_tag0(gate);
  }
  // Starts the workers and waits until every one of them found nothing and went to wait.
  ::testing::AssertionResult start_idle() {
    const uint32_t failed = m.start();
    if (failed != 0) return ::testing::AssertionFailure() << failed << " workers failed to start";
    h->wait_idle(m.options().instances);
    return ::testing::AssertionSuccess();
  }
  // Submits request 0 into `group` and waits until a worker holds it at the gate.
  TestRef hold(uint32_t group) {
    TestRef blocker = make_in(0, group);
    EXPECT_EQ(submit(m, blocker), Admit::ok);
    gate.wait_arrivals(1);
    return blocker;
  }

 private:
  static ModelOptions with_levels(ModelOptions o, uint32_t levels) {
    o.priority_levels = levels;
    return o;
  }
};

#if defined(__linux__)
// Pins the calling thread to `cpu`; false when the OS refuses.
inline bool pin_self(int cpu) { return apportion::pin_current_thread({cpu}).ok; }

using apportion::testing::is_sleeping;
using apportion::testing::this_tid;
#endif

}  // namespace apportion::testing::engine
