// Admission at its bounds and parameters at theirs, from an adversarial review of the engine: a
// cancel racing a submit into a full lane, a batch too large to fit racing single submits, the
// bounds a model is made with, deadlines at the ends of int64, burst instances with batching,
// and pinning errors read during a live move.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <future>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "apportion/engine.hpp"
#include "apportion/shared_pool.hpp"
#include "test_support.hpp"

namespace apportion::testing::bounds {
namespace {

using namespace std::chrono_literals;

struct Tagged : Request {
  bool hold = false;  // held inside the call until the handler opens
};

// Completes every request; a held one waits in its call until `open`.
struct Handler : ModelHandler {
  std::atomic<bool> open{true};
  std::atomic<int> holding{0};
  bool start_worker(Worker&) override { return true; }
  void run(Worker& w, Request* const* batch, std::size_t n) override {
    for (std::size_t i = 0; i < n; ++i) {
      if (static_cast<Tagged*>(batch[i])->hold) {
        holding.fetch_add(1);
        while (!open.load()) std::this_thread::yield();
      }
      Model::complete(*batch[i], Outcome::ok, &w.shard);
      Request::release(batch[i]);
    }
  }
  void abandon(Worker* w, Request* r, Outcome o) override {
    Model::complete(*r, o, w != nullptr ? &w->shard : nullptr);
    Request::release(r);
  }
  void stop_worker(Worker&) override {}
};

// Submits with the queue's reference taken first (given back when refused).
Admit submit(Model& m, Request* r) {
  r->add_ref();
  const Admit a = m.submit(r);
  if (a != Admit::ok) Request::release(r);
  return a;
}

ModelOptions options(uint32_t instances, std::size_t max_queue) {
  ModelOptions o;
  o.name = "m";
  o.instances = instances;
  o.max_queue = max_queue;
  return o;
}

TEST(EngineBounds, ACancelRacingASubmitIntoAFullLaneNeverAdmitsPastItsCells) {
  // max_queue 1: lanes of 2 cells, the model not started (nothing pops). A tombstone takes the
  // spare cell, a request the other; cancelling that request pushed `returned` one past its
  // cap for a moment, a submit reading it then was admitted into the full lane and spun in
  // its push for ever (and close() waited for it).
  const int trials = kSanitized ? 300 : 3000;
  for (int trial = 0; trial < trials; ++trial) {
    auto handler = std::make_shared<Handler>();
    Model m(options(1, 1), handler);
    Ref<Tagged> a(new Tagged), b(new Tagged), c(new Tagged);
    ASSERT_EQ(submit(m, a.get()), Admit::ok);
    ASSERT_TRUE(m.cancel(a.get()));
    ASSERT_EQ(submit(m, b.get()), Admit::ok);
    std::atomic<int> ready{0};
    std::atomic<bool> finished{false};
    std::thread submitter([&] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      for (int i = 0; i < 300 && submit(m, c.get()) != Admit::ok; ++i) {
      }
      finished.store(true);
    });
    ready.fetch_add(1);
    while (ready.load() < 2) {
    }
    m.cancel(b.get());
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (!finished.load() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    if (!finished.load()) {
      ADD_FAILURE() << "trial " << trial << ": a submit was admitted into a full lane and spins in its push";
      m.start();  // a worker pops a cell: the push goes through, and the thread can be joined
    }
    submitter.join();
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(EngineBounds, ABatchThatCannotFitNeverGetsASingleRequestRefusedWhileThereIsRoom) {
  // submit_n added all 65 to the queued count before it looked at the bound and took them back
  // after: a single submit in between read the inflated count and was refused "full".
  auto handler = std::make_shared<Handler>();
  Model m(options(1, 64), handler);
  m.start();
  std::atomic<bool> stop{false};
  std::thread big([&] {
    std::vector<Ref<Tagged>> own;
    std::vector<Request*> raw;
    for (int i = 0; i < 65; ++i) {
      own.emplace_back(new Tagged);
      raw.push_back(own.back().get());
    }
    while (!stop.load()) {
      for (Request* r : raw) r->add_ref();
      EXPECT_EQ(m.submit_n(raw.data(), raw.size()), Admit::full);  // 65 never fit in 64
      for (Request* r : raw) Request::release(r);
    }
  });
  int admitted = 0, full = 0;
  const auto until = std::chrono::steady_clock::now() + (kSanitized ? 2s : 1s);
  while (std::chrono::steady_clock::now() < until) {
    Ref<Tagged> r(new Tagged);
    const Admit a = submit(m, r.get());
    if (a == Admit::ok) {
      ++admitted;
      ASSERT_TRUE(r->wait_done(10'000'000'000));
    } else if (a == Admit::full) {
      ++full;
    }
  }
  stop.store(true);
  big.join();
  EXPECT_GT(admitted, 0);
  EXPECT_EQ(full, 0) << "refused with the queue holding at most one request";
  m.close(true);
  m.join();
}

TEST(EngineBounds, AModelIsNotMadeWithBoundsItCannotHold) {
  auto handler = std::make_shared<Handler>();
  // 2 x max_queue cells per lane overflowed to 0 for max_queue >= 2^63: the third submit spun.
  EXPECT_THROW(Model(options(1, std::size_t{1} << 63), handler), std::invalid_argument);
  EXPECT_THROW(Model(options(1, kMaxQueueBound + 1), handler), std::invalid_argument);
  // max_queue 0 admitted nothing, and no set_max_queue() could lift it.
  try {
    Model(options(1, 0), handler);
    ADD_FAILURE() << "max_queue 0 was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("max_queue 0 is out of range (1 .. "), std::string::npos) << e.what();
  }
  // A batch of SIZE_MAX was a length_error thrown in the worker thread: std::terminate.
  ModelOptions huge = options(1, 64);
  huge.batching.max_size = SIZE_MAX;
  EXPECT_THROW(Model(huge, handler), std::invalid_argument);
  Model m(options(1, 64), handler);
  Model::Shape shape;
  shape.instances = 1;
  shape.max_queue = 64;
  shape.batching.max_size = kMaxBatchSize + 1;
  m.start();
  EXPECT_THROW(m.reshape(shape), std::invalid_argument);
  m.close(true);
  m.join();
}

TEST(EngineBounds, BurstInstancesAreNotMadeForABatchingModel) {
  // A burst worker waits until every own worker reports itself busy, which only workers
  // serving one request per call do: with batching, the burst instances never served.
  auto handler = std::make_shared<Handler>();
  ModelOptions o = options(1, 64);
  o.pool = std::make_shared<SharedPool>(2);
  o.burst_instances = 1;
  o.batching.max_size = 4;
  EXPECT_THROW(Model(o, handler), std::invalid_argument);
  o.batching.max_size = 1;
  Model m(o, handler);
  m.start();
  handler->open.store(false);
  Ref<Tagged> blocker(new Tagged);
  blocker->hold = true;
  ASSERT_EQ(submit(m, blocker.get()), Admit::ok);
  while (handler->holding.load() == 0) std::this_thread::yield();
  Ref<Tagged> more(new Tagged);
  ASSERT_EQ(submit(m, more.get()), Admit::ok);
  EXPECT_TRUE(more->wait_done(10'000'000'000)) << "the burst worker did not serve beside the busy own one";
  handler->open.store(true);
  EXPECT_TRUE(blocker->wait_done(10'000'000'000));
  m.close(true);
  m.join();
}

TEST(EngineBounds, DeadlinesAtTheEndsOfInt64) {
  // A deadline far in the past under admission by deadline was signed overflow (deadline - now)
  // and admitted; one near INT64_MAX overflowed the timer's wait, which then spun holding its
  // lock, and close() + join() waited for ever.
  struct Slow : Handler {
    void run(Worker& w, Request* const* batch, std::size_t n) override {
      std::this_thread::sleep_for(500us);
      Handler::run(w, batch, n);
    }
  };
  ModelOptions o = options(1, 1024);
  o.admission = Admission::deadline;
  Model m(o, std::make_shared<Slow>());
  m.start();
  std::vector<Ref<Tagged>> ahead;
  for (int round = 0; round < 8 && m.drain_ns() == 0; ++round) {
    for (int i = 0; i < 20; ++i) {
      ahead.emplace_back(new Tagged);
      ASSERT_EQ(submit(m, ahead.back().get()), Admit::ok);
    }
    for (auto& r : ahead) ASSERT_TRUE(r->wait_done(10'000'000'000));
  }
  ASSERT_NE(m.drain_ns(), 0) << "no drain pace measured";
  for (int i = 0; i < 20; ++i) {
    ahead.emplace_back(new Tagged);
    ASSERT_EQ(submit(m, ahead.back().get()), Admit::ok);
  }
  Ref<Tagged> past(new Tagged);
  past->deadline_ns = INT64_MIN;
  EXPECT_EQ(submit(m, past.get()), Admit::late);
  for (auto& r : ahead) ASSERT_TRUE(r->wait_done(10'000'000'000));
  m.close(true);
  m.join();

  Model far(options(1, 64), std::make_shared<Handler>());
  Ref<Tagged> r(new Tagged);
  r->deadline_ns = INT64_MAX - 1;
  ASSERT_EQ(submit(far, r.get()), Admit::ok);
  std::this_thread::sleep_for(50ms);
  auto closed = std::async(std::launch::async, [&] {
    far.close(false);
    far.join();
  });
  ASSERT_EQ(closed.wait_for(20s), std::future_status::ready) << "close() + join() hung on the timer";
  EXPECT_TRUE(r->done());
}

TEST(EngineBounds, PinningErrorsReadDuringALiveMoveAreNotARace) {
  // The new workers of a move wrote their pinning error without the workers' lock while
  // pin_errors() read it under that lock (ThreadSanitizer: a race on the string).
  auto handler = std::make_shared<Handler>();
  Model m(options(1, 64), handler);
  m.start();
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop.load()) (void)m.pin_errors();
  });
  Model::Shape shape;
  shape.instances = 1;
  shape.max_queue = 64;
  shape.placement = {InstancePlacement{{4000}, 1, {}}};  // a CPU no machine here has: pinning fails
  const int moves = kSanitized ? 40 : 200;
  for (int i = 0; i < moves; ++i) m.reshape(shape);
  stop.store(true);
  reader.join();
  const auto errors = m.pin_errors();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("instance 0: "), std::string::npos) << errors[0];
  m.close(true);
  m.join();
}

}  // namespace
}  // namespace apportion::testing::bounds
