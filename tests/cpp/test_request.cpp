// Tests of the request lifecycle on its own (no engine): reference counting with a live-object
// counter, the single-claim rule, publish/wait_done with and without timeouts, outcome counters.
// Blocking tests run under a guard that turns a hang into a failure.
#include <gtest/gtest.h>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "apportion/request.hpp"

namespace {

using apportion::ModelCounters;
using apportion::now_ns;
using apportion::Outcome;
using apportion::Ref;
using apportion::Request;
using apportion::RequestState;
using namespace std::chrono_literals;

using apportion::testing::kSanitized;

using apportion::testing::g_constructed;
using apportion::testing::g_destroyed;
using apportion::testing::live;

class CountedRequest : public Request {
 public:
  CountedRequest() { g_constructed.fetch_add(1); }
  ~CountedRequest() override {
    // A second destruction would show up as destroyed > constructed; ASan also reports it.
    g_destroyed.fetch_add(1);
  }
};

using apportion::testing::guarded;

class RequestTest : public ::testing::Test {
 protected:
  void SetUp() override { live_before_ = live(); }
  void TearDown() override { EXPECT_EQ(alive(), 0) << "requests leaked or double-freed"; }
  // Live requests made by this test (a failure in an earlier test cannot shift the count).
  int64_t alive() const { return live() - live_before_; }

 private:
  int64_t live_before_ = 0;
};

TEST_F(RequestTest, StartsQueuedWithOneReference) {
  auto* r = new CountedRequest;
  EXPECT_EQ(alive(), 1);
  EXPECT_EQ(r->state(), RequestState::queued);
  EXPECT_FALSE(r->done());
  EXPECT_EQ(r->deadline_ns, Request::kNoDeadline);
  Request::release(r);
  EXPECT_EQ(alive(), 0);
}

TEST_F(RequestTest, LastReleaseDestroysExactlyOnce) {
  auto* r = new CountedRequest;
  r->add_ref();
  r->add_ref();
  Request::release(r);
  Request::release(r);
  EXPECT_EQ(alive(), 1);
  Request::release(r);
  EXPECT_EQ(alive(), 0);
}

TEST_F(RequestTest, RefAdoptsCopiesMovesAndDetaches) {
  {
    Ref<CountedRequest> a(new CountedRequest);
    EXPECT_EQ(alive(), 1);
    Ref<CountedRequest> b = a;  // +1
    Ref<CountedRequest> c = std::move(b);
    EXPECT_FALSE(b);
    EXPECT_EQ(c.get(), a.get());
    Ref<CountedRequest> d;
    d = c;  // +1
    d = Ref<CountedRequest>(new CountedRequest);  // drops one of a's, adopts a new one
    EXPECT_EQ(alive(), 2);
    CountedRequest* raw = c.detach();
    EXPECT_FALSE(c);
    Request::release(raw);
    EXPECT_EQ(alive(), 2);  // `a` still holds the first
  }
  EXPECT_EQ(alive(), 0);
}

TEST_F(RequestTest, TryClaimSucceedsExactlyOnce) {
  Ref<CountedRequest> r(new CountedRequest);
  EXPECT_TRUE(r->try_claim(RequestState::running));
  EXPECT_EQ(r->state(), RequestState::running);
  EXPECT_FALSE(r->try_claim(RequestState::running));
  EXPECT_FALSE(r->try_claim(RequestState::claimed));
  EXPECT_EQ(r->state(), RequestState::running);
  r->publish(Outcome::ok);
  EXPECT_FALSE(r->try_claim(RequestState::claimed));
  EXPECT_TRUE(r->done());
  EXPECT_EQ(r->outcome(), Outcome::ok);
}

TEST_F(RequestTest, ConcurrentClaimHasOneWinner) {
  const int rounds = kSanitized ? 200 : 2000;
  constexpr int kThreads = 4;
  guarded(60s, [&] {
    for (int round = 0; round < rounds; ++round) {
      Ref<CountedRequest> r(new CountedRequest);
      std::atomic<int> go{0};
      std::atomic<int> winners{0};
      std::vector<std::thread> ts;
      for (int t = 0; t < kThreads; ++t) {
        ts.emplace_back([&, t] {
          go.fetch_add(1);
          // yield, not spin: four threads share two cores here.
          while (go.load() < kThreads) std::this_thread::yield();
          if (r->try_claim(t % 2 ? RequestState::running : RequestState::claimed)) {
            winners.fetch_add(1);
          }
        });
      }
      for (auto& t : ts) t.join();
      ASSERT_EQ(winners.load(), 1) << "round " << round;
    }
  });
}

TEST_F(RequestTest, WaitDoneReturnsAtOnceWhenAlreadyDone) {
  Ref<CountedRequest> r(new CountedRequest);
  ASSERT_TRUE(r->try_claim(RequestState::claimed));
  r->publish(Outcome::cancelled);
  EXPECT_TRUE(r->wait_done(0));
  EXPECT_TRUE(r->wait_done(-1));  // would block forever if the done check were skipped
  EXPECT_EQ(r->outcome(), Outcome::cancelled);
}

TEST_F(RequestTest, WaitDoneTimesOutWhenNothingIsPublished) {
  guarded(30s, [] {
    Ref<CountedRequest> r(new CountedRequest);
    EXPECT_FALSE(r->wait_done(0, 0));
    EXPECT_FALSE(r->wait_done(0));
    const int64_t timeout = 5'000'000;
    const int64_t t0 = now_ns();
    EXPECT_FALSE(r->wait_done(timeout));
    // Not a speed claim: a timed-out wait cannot return before its timeout has elapsed.
    EXPECT_GE(now_ns() - t0, timeout);
    EXPECT_EQ(r->state(), RequestState::queued);
  });
}

TEST_F(RequestTest, WaitDoneWakesWhenPublishedFromAnotherThread) {
  guarded(30s, [] {
    Ref<CountedRequest> r(new CountedRequest);
    ASSERT_TRUE(r->try_claim(RequestState::running));
    std::atomic<bool> waiting{false};
    std::thread publisher([&] {
      while (!waiting.load()) std::this_thread::yield();
      // Give the waiter time to get past its spin and park (correct either way).
      std::this_thread::sleep_for(10ms);
      r->publish(Outcome::error);
    });
    waiting.store(true);
    EXPECT_TRUE(r->wait_done(-1, 0));  // no spin: goes straight to parking
    EXPECT_EQ(r->outcome(), Outcome::error);
    publisher.join();
  });
}

TEST_F(RequestTest, BoundedWaitSucceedsWhenPublishedInTime) {
  guarded(30s, [] {
    Ref<CountedRequest> r(new CountedRequest);
    ASSERT_TRUE(r->try_claim(RequestState::running));
    std::thread publisher([&] {
      std::this_thread::sleep_for(5ms);
      r->publish(Outcome::ok);
    });
    // 20 s is "forever" for this test, but exercises the timed path of the park loop.
    EXPECT_TRUE(r->wait_done(20'000'000'000, 0));
    publisher.join();
  });
}

TEST_F(RequestTest, ManyWaitersAllWakeOnOnePublish) {
  const int rounds = kSanitized ? 20 : 200;
  constexpr int kWaiters = 4;
  guarded(60s, [&] {
    for (int round = 0; round < rounds; ++round) {
      Ref<CountedRequest> r(new CountedRequest);
      ASSERT_TRUE(r->try_claim(RequestState::running));
      std::atomic<int> woke{0};
      std::vector<std::thread> ts;
      for (int i = 0; i < kWaiters; ++i) {
        // Each waiter owns a reference, as a caller's future does.
        ts.emplace_back([&woke, ref = r, i] {
          if (ref->wait_done(-1, i % 2 ? 0 : 2000)) woke.fetch_add(1);
          EXPECT_EQ(ref->outcome(), Outcome::ok);
        });
      }
      if (round % 2) std::this_thread::sleep_for(200us);
      r->publish(Outcome::ok);
      for (auto& t : ts) t.join();
      ASSERT_EQ(woke.load(), kWaiters);
    }
  });
}

TEST_F(RequestTest, ReleasesFromManyThreadsDestroyOnce) {
  const int rounds = kSanitized ? 200 : 2000;
  guarded(60s, [&] {
    for (int round = 0; round < rounds; ++round) {
      auto* r = new CountedRequest;
      constexpr int kOwners = 4;
      for (int i = 1; i < kOwners; ++i) r->add_ref();
      std::vector<std::thread> ts;
      for (int i = 0; i < kOwners; ++i) ts.emplace_back([r] { Request::release(r); });
      for (auto& t : ts) t.join();
    }
  });
  EXPECT_EQ(alive(), 0);
}

TEST(ModelCounters, CountMapsEachOutcomeToItsCounter) {
  ModelCounters c("m");
  EXPECT_EQ(c.name, "m");
  c.count(Outcome::ok);
  c.count(Outcome::ok);
  c.count(Outcome::error);
  c.count(Outcome::rejected);
  c.count(Outcome::expired);
  c.count(Outcome::expired);
  c.count(Outcome::expired);
  c.count(Outcome::cancelled);
  c.count(Outcome::pending);  // not an outcome: counts nothing
  EXPECT_EQ(c.completed.load(), 2u);
  EXPECT_EQ(c.failed.load(), 1u);
  EXPECT_EQ(c.rejected.load(), 1u);
  EXPECT_EQ(c.expired.load(), 3u);
  EXPECT_EQ(c.cancelled.load(), 1u);
  EXPECT_EQ(c.submitted.load(), 0u);
}

}  // namespace
