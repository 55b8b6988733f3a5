// Queue throughput: apportion::MpmcQueue against the queue a user would otherwise write (a
// std::mutex around a std::deque, with a condition_variable for blocking pops), measured in the
// same run, interleaved repetition by repetition so both see the same machine load.
//
// Scenarios (items/s = items that went through the queue per second of wall time):
//   pairs  one thread doing try_push + try_pop back to back (the uncontended fast path)
//   1P1C   one producer, one consumer
//   2P2C   two producers, two consumers
// each with spinning consumers (try_pop, back off on empty) and blocking ones (pop_wait for the
// MPMC queue, condition_variable wait for the baseline).
//
// Usage: bench_queue [items_per_run=2000000] [repetitions=7] [capacity=1024]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "apportion/mpmc_queue.hpp"

namespace {

using apportion::MpmcQueue;
using apportion::PopStatus;

// Backoff for a failed try_push/try_pop: a few pause instructions for the common short wait,
// then yield, because with 4 threads on 2 cores a pure spinner can hold the core its partner
// needs for a whole time slice. Both queues use the same backoff so only the queue differs.
struct Backoff {
  uint32_t n = 0;
  void operator()() noexcept {
    if (++n < 16) {
      apportion::cpu_relax();
    } else {
      std::this_thread::yield();
      n = 0;
    }
  }
};

// The baseline: bounded like MpmcQueue (same capacity) so a fast producer meets back-pressure in
// both, and notify only when a consumer may be waiting, as a careful hand-written queue would.
class MutexDequeQueue {
 public:
  explicit MutexDequeQueue(std::size_t capacity) : capacity_(capacity) {}

  bool try_push(uint64_t v) {
    bool wake = false;
    {
      std::lock_guard lock(mu_);
      if (items_.size() >= capacity_) return false;
      items_.push_back(v);
      wake = waiting_ > 0;
    }
    if (wake) cv_.notify_one();
    return true;
  }

  bool try_pop(uint64_t& out) {
    std::lock_guard lock(mu_);
    if (items_.empty()) return false;
    out = items_.front();
    items_.pop_front();
    return true;
  }

  void pop_wait(uint64_t& out) {
    std::unique_lock lock(mu_);
    ++waiting_;
    cv_.wait(lock, [this] { return !items_.empty(); });
    --waiting_;
    out = items_.front();
    items_.pop_front();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> items_;
  std::size_t capacity_;
  int waiting_ = 0;
};

enum class Mode { spin, block };

// A sum of everything popped, checked against what was pushed: proves every item went through
// and keeps the compiler from discarding the pops.
std::atomic<uint64_t> g_checksum{0};

template <class Q>
void push_spin(Q& q, uint64_t v) {
  Backoff b;
  while (!q.try_push(v)) b();
}

template <class Q>
uint64_t pop_one(Q& q, Mode mode) {
  uint64_t v = 0;
  if (mode == Mode::spin) {
    Backoff b;
    while (!q.try_pop(v)) b();
  } else if constexpr (std::is_same_v<Q, MutexDequeQueue>) {
    q.pop_wait(v);
  } else {
    // The default spin before parking is what the engine's workers use.
    while (q.pop_wait(v, -1) != PopStatus::ok) {
    }
  }
  return v;
}

template <class Q>
double run_pairs(std::size_t capacity, uint64_t items) {
  Q q(capacity);
  uint64_t sum = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < items; ++i) {
    q.try_push(i);
    uint64_t v = 0;
    q.try_pop(v);
    sum += v;
  }
  const auto t1 = std::chrono::steady_clock::now();
  g_checksum.fetch_add(sum - items * (items - 1) / 2);
  return static_cast<double>(items) / std::chrono::duration<double>(t1 - t0).count();
}

template <class Q>
double run_threads(std::size_t capacity, uint64_t items, int producers, int consumers, Mode mode) {
  Q q(capacity);
  const uint64_t per_producer = items / static_cast<uint64_t>(producers);
  const uint64_t total = per_producer * static_cast<uint64_t>(producers);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      const uint64_t base = static_cast<uint64_t>(p) * per_producer;
      for (uint64_t i = 0; i < per_producer; ++i) push_spin(q, base + i);
    });
  }
  for (int c = 0; c < consumers; ++c) {
    // Fixed share per consumer (the remainder to the first) so no shared counter is needed to
    // decide when to stop; a shared counter would add its own contention to both queues.
    const uint64_t share = total / static_cast<uint64_t>(consumers) +
                           (c == 0 ? total % static_cast<uint64_t>(consumers) : 0);
    threads.emplace_back([&, share] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      uint64_t sum = 0;
      for (uint64_t i = 0; i < share; ++i) sum += pop_one(q, mode);
      g_checksum.fetch_add(sum);
    });
  }
  while (ready.load() < producers + consumers) std::this_thread::yield();
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();
  const auto t1 = std::chrono::steady_clock::now();
  g_checksum.fetch_sub(total * (total - 1) / 2);
  return static_cast<double>(total) / std::chrono::duration<double>(t1 - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Scenario {
  std::string name;
  std::function<double(bool mpmc)> run;  // one repetition; returns items/s
};

}  // namespace

int main(int argc, char** argv) {
  const uint64_t items = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2'000'000;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 7;
  const std::size_t capacity = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1024;
  if (items < 4 || reps < 1 || capacity < 2) {
    std::fprintf(stderr, "usage: %s [items_per_run>=4] [repetitions>=1] [capacity>=2]\n", argv[0]);
    return 2;
  }

  auto threaded = [&](int p, int c, Mode m) {
    return [=](bool mpmc) {
      return mpmc ? run_threads<MpmcQueue<uint64_t>>(capacity, items, p, c, m)
                  : run_threads<MutexDequeQueue>(capacity, items, p, c, m);
    };
  };
  const std::vector<Scenario> scenarios = {
      {"1 thread, push+pop pairs",
       [&](bool mpmc) {
         // The single-threaded loop is ~10x faster than the threaded ones: give it more items so
         // a repetition is long enough to time.
         return mpmc ? run_pairs<MpmcQueue<uint64_t>>(capacity, items * 5)
                     : run_pairs<MutexDequeQueue>(capacity, items * 5);
       }},
      {"1P1C, spin (try_pop)", threaded(1, 1, Mode::spin)},
      {"1P1C, blocking (pop_wait / condvar)", threaded(1, 1, Mode::block)},
      {"2P2C, spin (try_pop)", threaded(2, 2, Mode::spin)},
      {"2P2C, blocking (pop_wait / condvar)", threaded(2, 2, Mode::block)},
  };

  std::printf("items per run: %llu, repetitions: %d, capacity: %zu, hardware threads: %u\n\n",
              static_cast<unsigned long long>(items), reps, capacity,
              std::thread::hardware_concurrency());
  std::printf("| scenario | MpmcQueue Mitems/s (median [min-max]) | mutex+deque Mitems/s (median [min-max]) | ratio |\n");
  std::printf("|---|---|---|---|\n");
  for (const auto& s : scenarios) {
    std::vector<double> a;
    std::vector<double> b;
    s.run(true);  // warm-up: page in the ring, start the threads' stacks, settle the clocks
    s.run(false);
    for (int r = 0; r < reps; ++r) {
      // Alternate which queue goes first so a load spike does not always hit the same one.
      if (r % 2 == 0) {
        a.push_back(s.run(true));
        b.push_back(s.run(false));
      } else {
        b.push_back(s.run(false));
        a.push_back(s.run(true));
      }
    }
    const double ma = median(a);
    const double mb = median(b);
    std::printf("| %s | %.1f [%.1f-%.1f] | %.1f [%.1f-%.1f] | %.2fx |\n", s.name.c_str(), ma / 1e6,
                *std::min_element(a.begin(), a.end()) / 1e6,
                *std::max_element(a.begin(), a.end()) / 1e6, mb / 1e6,
                *std::min_element(b.begin(), b.end()) / 1e6,
                *std::max_element(b.begin(), b.end()) / 1e6, ma / mb);
    std::fflush(stdout);
  }
  if (g_checksum.load() != 0) {
    std::fprintf(stderr, "checksum mismatch: items were lost or duplicated\n");
    return 1;
  }
  return 0;
}
