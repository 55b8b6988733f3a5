// The event count alone: the announce / re-check / park handshake, wake-ups that skip sleepers
// already woken, spin-then-park with its timeout and stop, and no lost wake-up under racing
// producers. Every blocking test runs under a deadlock guard.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "apportion/event_count.hpp"
#include "test_support.hpp"

namespace {

using apportion::EventCount;
using apportion::now_ns;
using apportion::testing::guarded;
using apportion::testing::kSanitized;
using namespace std::chrono_literals;

using Wait = EventCount::Wait;

// Takes one item from `items` if there is one (seq_cst: the condition side of the handshake).
bool take_one(std::atomic<uint64_t>& items) {
  uint64_t n = items.load(std::memory_order_seq_cst);
  while (n != 0) {
    if (items.compare_exchange_weak(n, n - 1, std::memory_order_seq_cst)) return true;
  }
  return false;
}

TEST(EventCount, NotifyWithoutSleepersIssuesNothing) {
  EventCount ec;
  EXPECT_EQ(ec.notify(4), 0u);
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, NotifySkipsSleepersThatAlreadyHaveAWakeUp) {
  EventCount ec;
  EventCount::Waiter a, b;
  const auto ta = ec.prepare_wait(a);
  const auto tb = ec.prepare_wait(b);
  EXPECT_EQ(ec.sleepers(), 2u);
  EXPECT_EQ(ec.notify(5), 2u) << "no more wake-ups than sleepers";
  EXPECT_EQ(ec.wakeups_in_flight(), 2u);
  EXPECT_EQ(ec.notify(1), 0u) << "both sleepers have a wake-up on its way: no syscall";
  ec.cancel_wait(ta);
  EXPECT_EQ(ec.sleepers(), 1u);
  EXPECT_EQ(ec.wakeups_in_flight(), 1u) << "a leaving sleeper takes its wake-up with it";
  ec.cancel_wait(tb);
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, NotifyWakesNoMoreThanTheWorkStillThere) {
  EventCount ec;
  int looks = 0;
  EXPECT_EQ(ec.notify(1, [&] { return ++looks, std::size_t{1}; }), 0u);
  EXPECT_EQ(looks, 0) << "no sleeper: the work left is not even looked at";
  EventCount::Waiter a, b;
  const auto ta = ec.prepare_wait(a);
  const auto tb = ec.prepare_wait(b);
  EXPECT_EQ(ec.notify(1, [&] { return ++looks, std::size_t{0}; }), 0u) << "taken already: nobody woken";
  EXPECT_EQ(looks, 1);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  EXPECT_EQ(ec.notify(2, [] { return std::size_t{1}; }), 1u) << "one left: one woken";
  EXPECT_EQ(ec.wakeups_in_flight(), 1u);
  EXPECT_TRUE(ec.cancel_wait(tb)) << "the last announced was the one woken";
  EXPECT_FALSE(ec.cancel_wait(ta));
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
}

TEST(EventCount, NotifyWakesOnlyAsManyAsAskedTheLastAnnouncedFirst) {
  EventCount ec;
  EventCount::Waiter w[3];
  EventCount::Ticket t[3];
  for (int i = 0; i < 3; ++i) t[i] = ec.prepare_wait(w[i]);
  EXPECT_EQ(ec.notify(1), 1u);
  EXPECT_NE(w[2].word.load(), t[2].word) << "the sleeper announced last is woken first";
  EXPECT_EQ(w[1].word.load(), t[1].word);
  EXPECT_EQ(ec.notify(1), 1u);
  EXPECT_NE(w[1].word.load(), t[1].word);
  EXPECT_EQ(w[0].word.load(), t[0].word) << "the oldest sleeper is not woken by two notifies";
  EXPECT_EQ(ec.wakeups_in_flight(), 2u);
  for (int i = 0; i < 3; ++i) ec.cancel_wait(t[i]);
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  // Left from the middle of the stack: the others stay linked, and the next wake-up finds them.
  for (int i = 0; i < 3; ++i) t[i] = ec.prepare_wait(w[i]);
  ec.cancel_wait(t[1]);
  EXPECT_EQ(ec.notify(2), 2u);
  EXPECT_NE(w[2].word.load(), t[2].word);
  EXPECT_NE(w[0].word.load(), t[0].word);
  ec.cancel_wait(t[0]);
  ec.cancel_wait(t[2]);
  EXPECT_EQ(ec.sleepers(), 0u);
  EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  EXPECT_EQ(ec.notify(1), 0u) << "nobody left on the stack";
}

TEST(EventCount, AWaitAfterANotifyReturnsAtOnce) {
  // The ticket is the waiter's word read before announcing: a notify between prepare_wait and wait
  // changes it, so the wait does not sleep (it would hang here otherwise: no one wakes it).
  guarded(30s, [] {
    EventCount ec;
    const EventCount::Ticket ticket = ec.prepare_wait();
    EXPECT_EQ(ec.notify(1), 1u);
    ec.wait(ticket, -1);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}

#if defined(__linux__)
TEST(EventCount, AParkedWaiterIsWokenByNotify) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    std::atomic<int> tid{0};
    std::atomic<bool> done{false};
    std::thread waiter([&] {
      tid = apportion::testing::this_tid();
      const Wait w = ec.await(0, -1, [&] { return take_one(items); }, [&] { return take_one(items); },
                              [] { return false; }, [] { return false; });
      EXPECT_EQ(w, Wait::ready);
      done = true;
    });
    // Announced and asleep in the kernel: only a notify can release it now.
    while (tid.load() == 0 || ec.sleepers() != 1 || !apportion::testing::is_sleeping(tid.load())) {
      std::this_thread::sleep_for(1ms);
    }
    EXPECT_FALSE(done.load());
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u);
    waiter.join();
    EXPECT_TRUE(done.load());
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}
#endif

#if defined(__linux__)
// Up to kMax threads that take items through `ec` until stopped, each counting what it took.
// start(i) starts thread i and returns once it sleeps in the kernel, announced: started one
// after another, the stack's order is the start order.
class Takers {
 public:
  static constexpr int kMax = 4;
  Takers(EventCount& ec, std::atomic<uint64_t>& items) : ec_(ec), items_(items) {}
  ~Takers() { stop(); }
  void start(int i) {
    threads_.emplace_back([this, i] {
      tids_[i] = apportion::testing::this_tid();
      const auto check = [this] { return take_one(items_); };
      while (ec_.await(0, -1, check, check, [] { return false; },
                       [this] { return stop_.load(std::memory_order_acquire); }) == Wait::ready) {
        got_[i].fetch_add(1);
      }
    });
    asleep(i, static_cast<uint32_t>(threads_.size()));
  }
  // Until thread i sleeps with `sleepers` announced and no wake-up in flight.
  void asleep(int i, uint32_t sleepers) {
    while (tids_[i].load() == 0 || ec_.sleepers() != sleepers || ec_.wakeups_in_flight() != 0 ||
           !apportion::testing::is_sleeping(tids_[i].load())) {
      std::this_thread::sleep_for(1ms);
    }
  }
  int got(int i) const { return got_[i].load(); }
  void stop() {
    stop_.store(true, std::memory_order_release);
    ec_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  EventCount& ec_;
  std::atomic<uint64_t>& items_;
  std::atomic<bool> stop_{false};
  std::atomic<int> tids_[kMax] = {0, 0, 0, 0};
  std::atomic<int> got_[kMax] = {0, 0, 0, 0};
  std::vector<std::thread> threads_;
};

TEST(EventCount, TheWorkerThatParkedLastIsWokenFirst) {
  // Three threads park one after another; one item and one notify: the last to park takes it,
  // parks again on top, and takes the next one too (the other two are never woken).
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    Takers t(ec, items);
    for (int i = 0; i < 3; ++i) t.start(i);
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u);
    while (t.got(2) != 1) std::this_thread::sleep_for(1ms);
    t.asleep(2, 3);  // back on the stack, on top again
    EXPECT_EQ(t.got(0) + t.got(1), 0) << "only the thread that parked last was woken";
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u);
    while (t.got(2) != 2) std::this_thread::sleep_for(1ms);
    EXPECT_EQ(t.got(0) + t.got(1), 0) << "the warm thread, parked last again, took the next";
    t.stop();
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}

TEST(EventCount, AWaiterWokenForNothingGoesBackBehindTheOthers) {
  // A parks, then B (on top). A wake-up with nothing to take (another thread got there first)
  // sends B back to sleep behind A: A is the next one woken, as the one that worked last.
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    Takers t(ec, items);
    t.start(0);
    t.start(1);
    EXPECT_EQ(ec.notify(1), 1u);  // B, for nothing
    std::this_thread::sleep_for(20ms);
    t.asleep(1, 2);  // B took its wake-up and parked again
    t.asleep(0, 2);
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u);
    while (t.got(0) + t.got(1) != 1) std::this_thread::sleep_for(1ms);
    EXPECT_EQ(t.got(0), 1) << "A, first in line again after B's empty wake-up, took it";
    t.stop();
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, AWakeUpMeantForOtherWorkIsPassedOnByAWaiterThatFoundWork) {
  // X is announced and looking (its check is held open here) when R1 is pushed and notify(1)
  // picks X, the sleeper on top; X's look then takes R0, which was there before. The wake-up
  // was R1's: X passes it on to Y, parked below it, which takes R1. Kept, it would leave R1
  // queued with Y asleep (the guard turns that into a failure).
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    std::atomic<int> y_tid{0}, y_got{0};
    std::atomic<bool> x_looking{false}, go{false};
    std::thread y([&] {
      y_tid = apportion::testing::this_tid();
      const auto check = [&] { return take_one(items); };
      EXPECT_EQ(ec.await(0, -1, check, check, [] { return false; }, [] { return false; }), Wait::ready);
      y_got = 1;
    });
    while (y_tid.load() == 0 || ec.sleepers() != 1 || !apportion::testing::is_sleeping(y_tid.load())) {
      std::this_thread::sleep_for(1ms);
    }
    items.store(1, std::memory_order_seq_cst);  // R0
    std::thread x([&] {
      int looks = 0;
      const auto check = [&] {
        if (looks++ == 0) {  // announced, on top of Y: hold the first look open
          x_looking = true;
          while (!go.load()) std::this_thread::yield();
        }
        return take_one(items);
      };
      EXPECT_EQ(ec.await(0, -1, [] { return false; }, check, [] { return false; }, [] { return false; }),
                Wait::ready);
    });
    while (!x_looking.load()) std::this_thread::yield();
    items.fetch_add(1, std::memory_order_seq_cst);  // R1
    EXPECT_EQ(ec.notify(1), 1u) << "X, on top, is picked";
    EXPECT_EQ(y_got.load(), 0);
    go = true;
    x.join();
    y.join();
    EXPECT_EQ(y_got.load(), 1);
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u);
  });
}

TEST(EventCount, AClosedLoopOfFourKeepsFourSpinningWaitersServed) {
  // Four consumers that spin before they park serve items that only complete four at a time
  // (a barrier), and a producer that keeps four outstanding: every item must find a consumer,
  // or the other three wait at the barrier for good (the guard fires).
  guarded(60s, [] {
    constexpr int kConsumers = 4;
    const int64_t run_ns = kSanitized ? 300'000'000 : 1'000'000'000;
    EventCount ec;
    std::atomic<uint64_t> items{0}, done{0};
    // 32 bits: libstdc++ waits on a 4-byte atomic with a futex on the word itself, on a wider
    // one through a shared proxy table; the barrier must not be the part that can hang.
    std::atomic<uint32_t> round{0};
    std::atomic<int> inside{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < kConsumers; ++c) {
      threads.emplace_back([&] {
        const auto check = [&] { return take_one(items); };
        while (ec.await(50'000, -1, check, check, [] { return false; },
                        [&] { return stop.load(std::memory_order_acquire); }) == Wait::ready) {
          const uint32_t r = round.load();
          if (inside.fetch_add(1) + 1 == kConsumers) {
            inside.store(0);
            round.fetch_add(1);
            round.notify_all();
          } else {
            // Blocking, not yielding: three yielding threads could keep the fourth (or the
            // producer) off the CPUs of a busy host for long.
            while (round.load() == r) round.wait(r);
          }
          done.fetch_add(1);
        }
      });
    }
    uint64_t sent = 0;
    const int64_t until = now_ns() + run_ns;
    while (now_ns() < until) {
      while (sent - done.load() < kConsumers) {
        items.fetch_add(1, std::memory_order_seq_cst);
        ec.notify(1);
        ++sent;
      }
      std::this_thread::yield();
    }
    // Whole rounds only: a last round with fewer than four items would wait at the barrier.
    for (; sent % kConsumers != 0; ++sent) {
      items.fetch_add(1, std::memory_order_seq_cst);
      ec.notify(1);
    }
    while (done.load() != sent) std::this_thread::sleep_for(1ms);  // the last round completes
    stop.store(true, std::memory_order_release);
    ec.notify_all();
    for (auto& t : threads) t.join();
    EXPECT_GE(done.load(), static_cast<uint64_t>(kConsumers));
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}
#endif

TEST(EventCount, AwaitTimesOutAndLeaves) {
  guarded(30s, [] {
    EventCount ec;
    int spin_checks = 0, checks = 0;
    const Wait w = ec.await(
        1'000'000, now_ns() + 2'000'000, [&] { return ++spin_checks, false; },
        [&] { return ++checks, false; }, [] { return false; }, [] { return false; });
    EXPECT_EQ(w, Wait::timeout);
    EXPECT_GE(spin_checks, 1);
    EXPECT_GE(checks, 1) << "it announced itself and looked again before giving up";
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, AwaitThatIsStoppedTakesWhatIsLeftFirst) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{1};
    std::atomic<bool> stop{true};
    const auto check = [&] { return take_one(items); };
    const auto stopping = [&] { return stop.load(std::memory_order_acquire); };
    // Stopped with an item left: the last check takes it.
    EXPECT_EQ(ec.await(0, -1, [] { return false; }, check, [] { return false; }, stopping),
              Wait::ready);
    EXPECT_EQ(ec.await(0, -1, [] { return false; }, check, [] { return false; }, stopping),
              Wait::stopped);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, NotifyAllReleasesAParkedWaiterThatThenSeesTheStop) {
  guarded(30s, [] {
    EventCount ec;
    std::atomic<bool> stop{false};
    std::atomic<int> result{-1};
    std::thread waiter([&] {
      const Wait w = ec.await(0, -1, [] { return false; }, [] { return false; },
                              [] { return false; }, [&] { return stop.load(std::memory_order_acquire); });
      result = static_cast<int>(w);
    });
    while (ec.sleepers() != 1) std::this_thread::yield();
    stop.store(true, std::memory_order_release);
    ec.notify_all();
    waiter.join();
    EXPECT_EQ(result.load(), static_cast<int>(Wait::stopped));
  });
}

TEST(EventCount, PendingWorkIsWaitedForWithoutParking) {
  // `pending` says the work is on its way: the waiter yields and looks again instead of
  // parking. Nobody notifies here, so a park would hang (the guard turns that into a failure).
  guarded(30s, [] {
    EventCount ec;
    int checks = 0, pendings = 0;
    const Wait w = ec.await(
        0, -1, [] { return false; }, [&] { return ++checks >= 4; },
        [&] { return ++pendings, true; }, [] { return false; });
    EXPECT_EQ(w, Wait::ready);
    EXPECT_EQ(checks, 4);
    EXPECT_EQ(pendings, 3);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

// Producers publish an item (seq_cst) and notify one waiter; consumers spin for `spin_ns`
// (0: never, so every item they get after the first park goes through the handshake) before
// they park. A lost wake-up leaves a consumer asleep with items queued: the count below is
// never reached and the guard fires.
void no_lost_wake_up(int64_t spin_ns, bool look_first = false) {
  guarded(60s, [spin_ns, look_first] {
    const uint64_t per_producer = kSanitized ? 2'000 : 20'000;
    constexpr int kProducers = 2, kConsumers = 2;
    EventCount ec;
    std::atomic<uint64_t> items{0}, consumed{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < kConsumers; ++c) {
      threads.emplace_back([&] {
        const auto check = [&] { return take_one(items); };
        while (ec.await(spin_ns, -1, check, check, [] { return false; },
                        [&] { return stop.load(std::memory_order_acquire); }) == Wait::ready) {
          consumed.fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
    for (int p = 0; p < kProducers; ++p) {
      threads.emplace_back([&] {
        for (uint64_t i = 0; i < per_producer; ++i) {
          items.fetch_add(1, std::memory_order_seq_cst);
          if (look_first) {
            ec.notify(1, [&] { return static_cast<std::size_t>(items.load(std::memory_order_seq_cst)); });
          } else {
            ec.notify(1);
          }
          if (i % 64 == 0) std::this_thread::yield();  // let consumers park now and then
        }
      });
    }
    const uint64_t total = per_producer * kProducers;
    // Every item is consumed without any stop: the wake-ups alone must get them there.
    while (consumed.load(std::memory_order_relaxed) != total) std::this_thread::sleep_for(1ms);
    stop.store(true, std::memory_order_release);
    ec.notify_all();
    for (auto& t : threads) t.join();
    EXPECT_EQ(consumed.load(), total);
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
    EXPECT_EQ(ec.spinners(), 0u);
  });
}

TEST(EventCount, NoLostWakeUpUnderRacingProducers) { no_lost_wake_up(0); }

TEST(EventCount, NoLostWakeUpUnderRacingProducersWithSpinningConsumers) {
  // Short spins: producers claim spinners whose spin is about to end, and spinners catch items
  // other producers claimed them for.
  no_lost_wake_up(2'000);
}

TEST(EventCount, NoLostWakeUpWhenProducersWakeOnlyForWorkStillThere) {
  // A producer that finds its item taken wakes nobody: the taker was a consumer that spun or
  // looked after announcing, and any item published later has a producer that notifies.
  no_lost_wake_up(0, true);
  no_lost_wake_up(2'000, true);
}

#if defined(__linux__)
TEST(EventCount, AProducerClaimsASpinnerInsteadOfWakingASleeper) {
  // One thread sleeps; another spins. An item and notify(1): the spinner is claimed and takes
  // it, and the sleeper is not woken (no syscall, no empty wake-up for it).
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    Takers t(ec, items);
    t.start(0);
    std::atomic<bool> took{false}, look{false};
    std::thread spinner([&] {
      // Its spin sees the item only once the producer has notified: taken before, the item
      // would leave no spinner to claim.
      const auto spin_check = [&] { return look.load() && take_one(items); };
      const auto check = [&] { return take_one(items); };
      took = ec.await(60'000'000'000, -1, spin_check, check, [] { return false; }, [] { return false; }) ==
             Wait::ready;
    });
    while (ec.spinners() != 1) std::this_thread::yield();
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(1), 1u) << "the spinner is claimed";
    EXPECT_EQ(ec.spinners(), 0u);
    EXPECT_EQ(ec.wakeups_in_flight(), 0u) << "no sleeper woken";
    look = true;
    spinner.join();
    EXPECT_TRUE(took.load());
    EXPECT_EQ(ec.spinners(), 0u);
    t.asleep(0, 1);
    EXPECT_EQ(t.got(0), 0) << "the sleeper took nothing and still sleeps";
    EXPECT_EQ(items.load(), 0u);
  });
}
#endif

TEST(EventCount, AClaimedSpinnerThatMissedItsWorkLooksBeforeItParks) {
  // The spinner watches something else in its spin (its spin check never sees the item) and
  // its spin is ended by a stop; claimed, it takes the item on its look before parking.
  guarded(30s, [] {
    EventCount ec;
    std::atomic<uint64_t> items{0};
    std::atomic<bool> end{false};
    std::atomic<int> got{-1};
    std::thread spinner([&] {
      const Wait w = ec.await(60'000'000'000, -1, [] { return false; }, [&] { return take_one(items); },
                              [] { return false; }, [&] { return end.load(); });
      got = w == Wait::ready ? 1 : 0;
    });
    while (ec.spinners() != 1) std::this_thread::yield();
    items.fetch_add(1, std::memory_order_seq_cst);
    EXPECT_EQ(ec.notify(2), 1u) << "one spinner to claim, nobody to wake";
    EXPECT_EQ(ec.spinners(), 0u) << "claimed";
    end = true;
    spinner.join();
    EXPECT_EQ(got.load(), 1) << "the claimed spinner took the item";
    EXPECT_EQ(items.load(), 0u);
    EXPECT_EQ(ec.spinners(), 0u);
    EXPECT_EQ(ec.sleepers(), 0u);
  });
}

TEST(EventCount, ASpinnerThatIsNotClaimedLeavesTheCount) {
  EventCount ec;
  const Wait w = ec.await(1'000'000, now_ns() + 2'000'000, [] { return false; }, [] { return false; },
                          [] { return false; }, [] { return false; });
  EXPECT_EQ(w, Wait::timeout);
  EXPECT_EQ(ec.spinners(), 0u);
  EXPECT_EQ(ec.notify(1), 0u) << "no spinner left to claim";
}

}  // namespace
