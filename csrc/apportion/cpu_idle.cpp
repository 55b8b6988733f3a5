#include "apportion/cpu_idle.hpp"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "apportion/parking.hpp"

namespace apportion {

namespace {

std::atomic<IdleProbe> test_probe{nullptr};

constexpr int64_t kSampleNs = 20'000'000;  // /proc/stat counts in 10 ms ticks

struct Sample {
  int64_t at_ns = 0;
  std::vector<uint64_t> idle;  // idle + iowait ticks, by CPU id
  bool answer = true;
};

#if defined(__linux__)
bool read_idle(std::vector<uint64_t>& out) noexcept {
  std::FILE* f = std::fopen("/proc/stat", "re");
  if (f == nullptr) return false;
  out.clear();
  char line[512];
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::strncmp(line, "cpu", 3) != 0) break;  // the cpu lines come first
    if (line[3] < '0' || line[3] > '9') continue;   // the "cpu " total
    char* p = line + 3;
    const long id = std::strtol(p, &p, 10);
    uint64_t v[5] = {};
    for (auto& x : v) x = std::strtoull(p, &p, 10);  // user nice system idle iowait
    if (id < 0 || id > (1 << 16)) continue;
    if (out.size() <= static_cast<std::size_t>(id)) out.resize(static_cast<std::size_t>(id) + 1, 0);
    out[static_cast<std::size_t>(id)] = v[3] + v[4];
  }
  std::fclose(f);
  return !out.empty();
}
#endif

}  // namespace

void set_idle_probe_for_tests(IdleProbe probe) noexcept { test_probe.store(probe); }

bool other_cpu_idle(int cpu) noexcept {
  if (IdleProbe p = test_probe.load(std::memory_order_relaxed)) return p(cpu);
#if defined(__linux__)
  thread_local Sample last;
  const int64_t now = now_ns();
  if (last.at_ns != 0 && now - last.at_ns < kSampleNs) return last.answer;
  std::vector<uint64_t> idle;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (!read_idle(idle) || sched_getaffinity(0, sizeof allowed, &allowed) != 0) return true;
  bool any = last.idle.empty();  // first sample: nothing to compare with
  for (std::size_t c = 0; !any && c < idle.size() && c < last.idle.size(); ++c) {
    if (static_cast<int>(c) == cpu || !CPU_ISSET(static_cast<int>(c), &allowed)) continue;
    any = idle[c] > last.idle[c];
  }
  last.at_ns = now;
  last.idle.swap(idle);
  last.answer = any;
  return any;
#else
  (void)cpu;
  return true;
#endif
}

}  // namespace apportion
