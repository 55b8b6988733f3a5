// Planner time: plan_placement for 100 models on the 2-socket 128-thread fixture (issue goal:
// well under 10 ms). The same-run baseline is reading that topology from its sysfs tree, a cost
// every plan already pays once, so the ratio says what planning adds on top.
//
// The workload mixes what a busy host would ask for: 40 exclusive models of 1 core (half with
// SMT, a quarter pinned to a NUMA node), 10 exclusive models of 2 cores with 2 instances, and
// 50 shared models, half of them capped to a few cores of the pool.
//
// Usage: bench_placement [repetitions=200] [fixture_root=<tests/fixtures/topology/server_2s128t>]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "apportion/placement.hpp"
#include "apportion/topology.hpp"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<apportion::Quota> workload() {
  std::vector<apportion::Quota> quotas;
  for (int i = 0; i < 40; ++i) {
    apportion::Quota q;
    q.name = "excl" + std::to_string(i);
    q.isolation = apportion::Isolation::exclusive;
    q.cores = 1;
    q.smt = i % 2 == 0;
    q.numa = i % 4 == 0 ? (i / 4) % 2 : -1;
    quotas.push_back(q);
  }
  for (int i = 0; i < 10; ++i) {
    apportion::Quota q;
    q.name = "pair" + std::to_string(i);
    q.isolation = apportion::Isolation::exclusive;
    q.cores = 2;
    q.instances = 2;
    quotas.push_back(q);
  }
  for (int i = 0; i < 50; ++i) {
    apportion::Quota q;
    q.name = "shared" + std::to_string(i);
    q.cores = i % 2 == 0 ? 1 + i % 3 : 0;
    q.smt = i % 3 == 0;
    quotas.push_back(q);
  }
  return quotas;
}

struct Summary {
  double median_us, p90_us, max_us;
};

Summary summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 9 / 10], us.back()};
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 200;
  const std::string root =
      argc > 2 ? argv[2] : std::string(APPORTION_BENCH_FIXTURES) + "/topology/server_2s128t";
  const auto quotas = workload();

  std::vector<double> read_us, plan_us;
  std::size_t checksum = 0;
  apportion::Topology topology = apportion::read_topology(root);
  // Interleaved so both see the same machine load on a shared host.
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    topology = apportion::read_topology(root);
    auto t1 = Clock::now();
    const apportion::Plan plan = apportion::plan_placement(topology, quotas);
    auto t2 = Clock::now();
    checksum += plan.shared_pool.size() + plan.models.back().cpus.size();
    read_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    plan_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  const Summary rd = summarise(read_us), pl = summarise(plan_us);
  std::printf("fixture: %s (%zu CPUs, %zu cores), %zu models, %d repetitions\n", root.c_str(),
              topology.cpus.size(), topology.cores.size(), quotas.size(), reps);
  std::printf("%-28s %10s %10s %10s\n", "", "median_us", "p90_us", "max_us");
  std::printf("%-28s %10.1f %10.1f %10.1f\n", "read_topology (baseline)", rd.median_us, rd.p90_us, rd.max_us);
  std::printf("%-28s %10.1f %10.1f %10.1f\n", "plan_placement (100 models)", pl.median_us, pl.p90_us, pl.max_us);
  std::printf("plan / read (median): %.3f   goal: plan median < 10000 us: %s   (checksum %zu)\n",
              pl.median_us / rd.median_us, pl.median_us < 10000.0 ? "met" : "MISSED", checksum);
  return 0;
}
