// Prompt expiry: the heap's order and bookkeeping alone, and a model whose only worker is busy
// expiring a queued request at its deadline.
#include <gtest/gtest.h>

#include "engine_fixture.hpp"

#include "apportion/expiry.hpp"

namespace apportion::testing::engine {
namespace {

using apportion::ExpiryHeap;

TestRef due_at(uint64_t tag, int64_t deadline) {
  TestRef r = make(tag);
  r->deadline_ns = deadline;
  return r;
}

TEST(ExpiryHeapTest, PopsInDeadlineOrderAndRemovesAnyEntry) {
  auto heap = std::make_shared<ExpiryHeap>();
  std::vector<TestRef> rs;
  for (int64_t d : {50, 10, 40, 20, 30, 60}) rs.push_back(due_at(static_cast<uint64_t>(d), d));
  for (auto& r : rs) heap->add(r.get());
  EXPECT_EQ(heap->size(), 6u);
  heap->remove(rs[2].get());  // 40
  heap->remove(rs[2].get());  // twice: nothing more
  EXPECT_EQ(rs[2]->heap_index, -1);
  EXPECT_EQ(heap->size(), 5u);
  std::vector<int64_t> order;
  std::size_t batches = 0;
  std::thread timer([&] {
    heap->run([&](std::vector<Request*>& due, int64_t) {
      ++batches;
      for (Request* r : due) {
        order.push_back(r->deadline_ns);
        EXPECT_EQ(r->heap_index, -1);
        Request::release(r);  // the heap's reference, handed over
      }
      if (order.size() == 5) heap->stop();
    });
  });
  timer.join();  // every deadline (tens of ns after the clock's epoch) has long passed
  EXPECT_EQ(order, (std::vector<int64_t>{10, 20, 30, 50, 60}));
  EXPECT_EQ(batches, 1u) << "everything due at once goes in one batch";
  EXPECT_EQ(heap->size(), 0u);
  for (auto& r : rs) EXPECT_EQ(r->heap_index, -1);
}

TEST(ExpiryHeapTest, DrainHandsBackWhatIsLeft) {
  ExpiryHeap heap;
  TestRef a = due_at(1, now_ns() + 60'000'000'000), b = due_at(2, now_ns() + 30'000'000'000);
  heap.add(a.get());
  heap.add(b.get());
  auto left = heap.drain();
  ASSERT_EQ(left.size(), 2u);
  EXPECT_EQ(left[0], b.get()) << "the earliest first";
  for (Request* r : left) {
    EXPECT_EQ(r->heap_index, -1);
    Request::release(r);
  }
}

// Requests of one timeout submitted one after another, each completed before the next (a
// caller's round trips): the heap empties every time, and each one woke the timer, a futex
// call and a context switch per request. Now only one due before the timer's next look does.
TEST(ExpiryHeapTest, RequestsDueAfterTheTimersNextLookDoNotWakeIt) {
  auto heap = std::make_shared<ExpiryHeap>();
  std::thread timer([&] { heap->run([](std::vector<Request*>& due, int64_t) {
    for (Request* r : due) Request::release(r);
  }); });
  for (uint64_t i = 0; i < 1000; ++i) {
    TestRef r = due_at(i, now_ns() + 60'000'000'000);  // a minute: none expires here
    heap->add(r.get());
    heap->remove(r.get());  // completed
  }
  EXPECT_EQ(heap->size(), 0u);
  EXPECT_LE(heap->wakeups(), 2u) << "the first request arms the timer; the others come after it";
  // One due before the timer's next look still wakes it, and expires on time.
  TestRef soon = due_at(7, now_ns() + 20'000'000);
  const uint64_t before = heap->wakeups();
  heap->add(soon.get());
  EXPECT_EQ(heap->wakeups(), before + 1);
  const int64_t deadline = now_ns() + 10'000'000'000;
  while (heap->size() != 0 && now_ns() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(heap->size(), 0u) << "expired within 10 s of a 20 ms deadline";
  heap->stop();
  timer.join();
}

TEST_F(EngineTest, AQueuedRequestExpiresAtItsDeadlineWhileTheWorkerIsBusy) {
  guarded(30s, [] {
    Gate gate;
    auto h = std::make_shared<TestHandler>();
    h->on_run = [&](Worker&, TestRequest& r) {
      if (r.tag == 1) {
        gate.arrive();
        gate.wait();
      }
      return Outcome::ok;
    };
    ModelOptions o;
    o.name = "m";
    Model m(o, h);
    ASSERT_EQ(m.start(), 0u);
    TestRef busy = make(1);
    ASSERT_EQ(submit(m, busy), Admit::ok);
    gate.wait_arrivals(1);
    TestRef late = make(2);
    late->deadline_ns = now_ns() + 20'000'000;
    ASSERT_EQ(submit(m, late), Admit::ok);
    ASSERT_TRUE(late->wait_done(5'000'000'000));
    const int64_t lateness = late->end_ns - late->deadline_ns;
    EXPECT_EQ(late->outcome(), Outcome::expired);
    EXPECT_GE(lateness, 0);
    EXPECT_LT(lateness, 200'000'000) << "expired at its deadline, not when the call ends";
    EXPECT_FALSE(busy->done());
    gate.open();
    ASSERT_TRUE(completes(busy));
    m.close(true);
    m.join();
    EXPECT_EQ(late->runs.load(), 0) << "never run afterwards";
    EXPECT_EQ(late->completions.load(), 1) << "completed once";
    EXPECT_EQ(h->abandons_without_worker.load(), 1) << "by the timer, not a worker";
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.completed, 1u);
  });
}

TEST_F(EngineTest, ARequestSubmittedBeforeStartExpiresAtItsDeadline) {
  // The timer ran only from start(): such a request waited, and its caller with it, until
  // someone started the model.
  guarded(30s, [] {
    auto h = std::make_shared<TestHandler>();
    Model m(opts(1), h);
    TestRef early = make(1);
    early->deadline_ns = now_ns() + 20'000'000;
    ASSERT_EQ(submit(m, early), Admit::ok);
    ASSERT_TRUE(early->wait_done(5'000'000'000)) << "expired without start()";
    EXPECT_EQ(early->outcome(), Outcome::expired);
    EXPECT_LT(early->end_ns - early->deadline_ns, 200'000'000);
    ASSERT_EQ(m.start(), 0u);
    TestRef later = make(2);
    ASSERT_EQ(submit(m, later), Admit::ok);
    ASSERT_TRUE(completes(later));
    m.close(true);
    m.join();
    EXPECT_EQ(early->runs.load(), 0);
    EXPECT_EQ(early->completions.load(), 1);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 1u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, AQueuedRequestExpiresAtItsDeadlineWhileADrainingCloseWaits) {
  // close(true) + join() stopped the timer first: a request queued behind a long call then
  // settled only when the worker reached it, at the end of the drain.
  guarded(30s, [] {
    Gate gate;
    auto h = std::make_shared<TestHandler>();
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef busy = make(0);
    ASSERT_EQ(submit(m, busy), Admit::ok);
    gate.wait_arrivals(1);
    TestRef late = make(1);
    late->deadline_ns = now_ns() + 30'000'000;
    ASSERT_EQ(submit(m, late), Admit::ok);
    m.close(true);
    std::thread closer([&] { m.join(); });
    const bool expired_in_time = late->wait_done(5'000'000'000);
    EXPECT_TRUE(expired_in_time) << "expired while the close drained";
    EXPECT_FALSE(busy->done());
    gate.open();
    closer.join();  // before any assertion may return
    EXPECT_EQ(late->outcome(), Outcome::expired);
    EXPECT_LT(late->end_ns - late->deadline_ns, 200'000'000);
    ASSERT_TRUE(completes(busy));
    EXPECT_EQ(late->runs.load(), 0);
    EXPECT_EQ(late->completions.load(), 1);
  });
}

TEST_F(EngineTest, RequestsDueTogetherExpireInOneBatchEachOnce) {
  // A burst with one deadline behind a busy worker: the timer hands the whole burst to the
  // handler at once (the Python handler takes the GIL once for it, not once per request).
  guarded(30s, [] {
    Gate gate;
    struct BatchCounting final : TestHandler {
      std::atomic<int> expire_calls{0};
      std::atomic<std::size_t> largest{0};
      void expire(Request* const* expired, std::size_t n, Request* const* others, std::size_t m) override {
        expire_calls.fetch_add(1);
        if (n > largest.load()) largest.store(n);
        TestHandler::expire(expired, n, others, m);
      }
    };
    auto h = std::make_shared<BatchCounting>();
    h->on_run = hold_tag0(gate);
    Model m(opts(1), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef busy = make(0);
    ASSERT_EQ(submit(m, busy), Admit::ok);
    gate.wait_arrivals(1);
    const int64_t deadline = now_ns() + 30'000'000;
    std::vector<TestRef> burst;
    for (uint64_t i = 1; i <= 64; ++i) {
      burst.push_back(make(i));
      burst.back()->deadline_ns = deadline;
    }
    ASSERT_EQ(submit_all(m, burst), Admit::ok);
    for (auto& r : burst) ASSERT_TRUE(r->wait_done(5'000'000'000));
    gate.open();
    ASSERT_TRUE(completes(busy));
    m.close(true);
    m.join();
    for (auto& r : burst) {
      EXPECT_EQ(r->outcome(), Outcome::expired);
      EXPECT_EQ(r->completions.load(), 1);
      EXPECT_EQ(r->runs.load(), 0);
    }
    EXPECT_EQ(h->largest.load(), 64u) << "one deadline, one batch";
    EXPECT_EQ(h->abandons_without_worker.load(), 64);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 64u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

TEST_F(EngineTest, RequestsSettledWhileQueuedGiveTheirAdmissionSlotsBack) {
  // A queue of 4 behind a busy worker: 4 requests expire there, then 4 more are admitted at
  // once (they held their slots until a worker reached them, refusing new ones meanwhile).
  // Cancelled ones give theirs back too, up to max_queue unpopped at a time (the lanes' spare
  // room); beyond that a settled request keeps its slot until it is popped.
  guarded(30s, [] {
    Gate gate;
    auto h = std::make_shared<TestHandler>();
    h->on_run = hold_tag0(gate);
    Model m(opts(1, 4), h);
    ASSERT_EQ(m.start(), 0u);
    TestRef busy = make(0);
    ASSERT_EQ(submit(m, busy), Admit::ok);
    gate.wait_arrivals(1);
    std::vector<TestRef> expiring;
    for (uint64_t i = 1; i <= 4; ++i) {
      expiring.push_back(make(i));
      expiring.back()->deadline_ns = now_ns() + 5'000'000;
      ASSERT_EQ(submit(m, expiring.back()), Admit::ok);
    }
    TestRef refused = make(9);
    EXPECT_EQ(submit(m, refused), Admit::full);
    for (auto& r : expiring) ASSERT_TRUE(r->wait_done(5'000'000'000));
    EXPECT_EQ(m.queued(), 0u) << "expired: slots back, cells still taken";
    std::vector<TestRef> later;
    for (uint64_t i = 10; i < 14; ++i) {
      later.push_back(make(i));
      EXPECT_EQ(submit(m, later.back()), Admit::ok) << "request " << i;
    }
    // 4 unpopped settled requests already: a cancel now keeps its slot until it is popped.
    EXPECT_TRUE(m.cancel(later[0].get()));
    EXPECT_EQ(m.queued(), 4u);
    TestRef still_full = make(20);
    EXPECT_EQ(submit(m, still_full), Admit::full);
    gate.open();
    ASSERT_TRUE(completes(busy));
    for (std::size_t i = 1; i < later.size(); ++i) ASSERT_TRUE(completes(later[i]));
    m.close(true);
    m.join();
    for (auto& r : expiring) {
      EXPECT_EQ(r->outcome(), Outcome::expired);
      EXPECT_EQ(r->runs.load(), 0);
      EXPECT_EQ(r->completions.load(), 1);
    }
    EXPECT_EQ(later[0]->outcome(), Outcome::cancelled);
    EXPECT_EQ(later[0]->runs.load(), 0);
    EXPECT_EQ(m.queued(), 0u);
    const ModelSnapshot s = m.snapshot();
    EXPECT_EQ(s.expired, 4u);
    EXPECT_EQ(s.cancelled, 1u);
    EXPECT_EQ(s.completed, 4u);
    EXPECT_EQ(s.rejected, 2u);
    EXPECT_EQ(s.submitted, accounted(s));
  });
}

}  // namespace
}  // namespace apportion::testing::engine
