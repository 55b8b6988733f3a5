// Engine hot path: apportion::Model with a no-op C++ handler against the hand-off a user would
// otherwise write (one worker thread behind a std::mutex + std::deque + condition_variable),
// measured in the same run, interleaved repetition by repetition so both see the same load.
//
// Scenarios (ns per request, median over repetitions; lower is better):
//   rtt     one caller: submit one request, wait for its completion, repeat (the worker spins
//           50 us before parking, the default)
//   parked  the same with spin_ns = 0: every request wakes a parked worker (the event count)
//   burst   one caller submits 64 requests with one submit_n and waits for the last: the
//           worker's pop -> run -> complete loop
//   submit  one thread submits to a model not started yet: admission -> lane push -> wake (no
//           sleeper), with no other thread involved (baseline: lock, push_back, unlock, notify)
//   drain   every request queued before start(), one worker drains them: pop -> run ->
//           complete without ever waiting (baseline: lock, pop_front, unlock per item)
// The first three hand requests between threads and swing with the machine's load (on a busy
// 2-CPU host they are bimodal: both threads on one CPU or not); the last two stay on one thread
// and are the ones to compare the hot path by.
//
// Usage: bench_engine [requests_per_run=20000] [repetitions=7]
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "apportion/engine.hpp"

namespace {

using apportion::Admit;
using apportion::Model;
using apportion::ModelHandler;
using apportion::ModelOptions;
using apportion::Outcome;
using apportion::Request;
using apportion::Worker;

class NoopHandler : public ModelHandler {
 public:
  bool start_worker(Worker&) override { return true; }
  void run(Worker& w, Request* const* batch, std::size_t n) override {
    for (std::size_t i = 0; i < n; ++i) {
      Model::complete(*batch[i], Outcome::ok, &w.shard);
      Request::release(batch[i]);
    }
  }
  void abandon(Worker* w, Request* r, Outcome why) override {
    Model::complete(*r, why, w ? &w->shard : nullptr);
    Request::release(r);
  }
  void stop_worker(Worker&) override {}
};

constexpr std::size_t kBurst = 64;

double elapsed_ns(std::chrono::steady_clock::time_point t0) {
  return static_cast<double>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
          .count());
}

// ns per request through the engine.
double run_engine(uint64_t n, int64_t spin_ns, bool burst) {
  ModelOptions o;
  o.name = "bench";
  o.instances = 1;
  o.max_queue = 1024;
  o.spin_ns = spin_ns;
  Model m(o, std::make_shared<NoopHandler>());
  m.start();
  // Requests are allocated up front: the figure is the engine's, not the allocator's.
  std::vector<Request*> rs(n);
  for (auto& r : rs) r = new Request();
  const auto t0 = std::chrono::steady_clock::now();
  if (!burst) {
    for (Request* r : rs) {
      r->add_ref();
      if (m.submit(r) != Admit::ok) std::abort();
      r->wait_done(-1);
    }
  } else {
    for (uint64_t i = 0; i + kBurst <= n; i += kBurst) {
      for (std::size_t k = 0; k < kBurst; ++k) rs[i + k]->add_ref();
      if (m.submit_n(&rs[i], kBurst) != Admit::ok) std::abort();
      rs[i + kBurst - 1]->wait_done(-1);
    }
  }
  const double ns = elapsed_ns(t0);
  m.close(true);
  m.join();
  for (Request* r : rs) Request::release(r);
  return ns / static_cast<double>(burst ? n / kBurst * kBurst : n);
}

// ns per request submitted to a model that is not started (queued, never handed over), and
// per request drained by one worker from a full queue.
double run_engine_one_side(uint64_t n, bool drain) {
  ModelOptions o;
  o.name = "bench";
  o.instances = 1;
  o.max_queue = n;
  Model m(o, std::make_shared<NoopHandler>());
  std::vector<Request*> rs(n);
  for (auto& r : rs) r = new Request();
  auto t0 = std::chrono::steady_clock::now();
  for (Request* r : rs) {
    r->add_ref();
    if (m.submit(r) != Admit::ok) std::abort();
  }
  double ns = elapsed_ns(t0);
  if (drain) {
    t0 = std::chrono::steady_clock::now();
    m.start();
    rs.back()->wait_done(-1);
    ns = elapsed_ns(t0);
  }
  m.close(true);
  m.join();
  for (Request* r : rs) Request::release(r);
  return ns / static_cast<double>(n);
}

double run_baseline_one_side(uint64_t n, bool drain) {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<uint64_t> q;
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    {
      std::lock_guard lock(mu);
      q.push_back(i);
    }
    cv.notify_one();
  }
  double ns = elapsed_ns(t0);
  if (drain) {
    t0 = std::chrono::steady_clock::now();
    uint64_t sum = 0;
    std::thread worker([&] {
      for (;;) {
        std::lock_guard lock(mu);
        if (q.empty()) return;
        sum += q.front();
        q.pop_front();
      }
    });
    worker.join();
    ns = elapsed_ns(t0);
    if (sum == 0 && n > 1) std::abort();
  }
  return ns / static_cast<double>(n);
}

// The baseline: one worker thread, a mutex-protected deque, condition variables both ways.
double run_baseline(uint64_t n, bool burst) {
  std::mutex mu;
  std::condition_variable work_cv, done_cv;
  std::deque<uint64_t> q;
  uint64_t done = 0;
  bool stop = false;
  std::thread worker([&] {
    std::unique_lock lock(mu);
    for (;;) {
      work_cv.wait(lock, [&] { return stop || !q.empty(); });
      if (q.empty()) return;
      q.pop_front();
      ++done;
      done_cv.notify_one();
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t batch = burst ? kBurst : 1;
  const uint64_t total = n / batch * batch;
  for (uint64_t i = 0; i < total; i += batch) {
    {
      std::lock_guard lock(mu);
      for (uint64_t k = 0; k < batch; ++k) q.push_back(i + k);
    }
    work_cv.notify_one();
    std::unique_lock lock(mu);
    done_cv.wait(lock, [&] { return done == i + batch; });
  }
  const double ns = elapsed_ns(t0);
  {
    std::lock_guard lock(mu);
    stop = true;
  }
  work_cv.notify_one();
  worker.join();
  return ns / static_cast<double>(total);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20'000;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 7;
  struct Scenario {
    const char* name;
    int64_t spin_ns;
    bool burst;
    int one_side;  // 0: hand-off between threads; 1: submit only; 2: drain only
  };
  const Scenario scenarios[] = {{"rtt", 50'000, false, 0},
                                {"parked", 0, false, 0},
                                {"burst", 50'000, true, 0},
                                {"submit", 0, false, 1},
                                {"drain", 0, false, 2}};
  std::printf("%-8s %14s %14s %8s\n", "scenario", "engine ns/req", "mutex ns/req", "ratio");
  for (const Scenario& s : scenarios) {
    std::vector<double> engine, base;
    for (int r = 0; r < reps; ++r) {
      if (s.one_side != 0) {
        // Ten times the requests: each costs tens of ns, and thread start must not count.
        engine.push_back(run_engine_one_side(n * 10, s.one_side == 2));
        base.push_back(run_baseline_one_side(n * 10, s.one_side == 2));
      } else {
        engine.push_back(run_engine(n, s.spin_ns, s.burst));
        base.push_back(run_baseline(n, s.burst));
      }
    }
    const double e = median(engine), b = median(base);
    std::printf("%-8s %14.0f %14.0f %8.2f\n", s.name, e, b, e / b);
  }
  return 0;
}
