#include "apportion/affinity.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace apportion {
namespace fs = std::filesystem;

namespace {

// Values from <linux/mempolicy.h>, spelled out so no kernel or libnuma header is needed.
constexpr int kMpolDefault = 0;
constexpr int kMpolPreferred = 1;
constexpr int kMpolBind = 2;
constexpr int kMaxNodes = 1024;
constexpr int kBitsPerWord = static_cast<int>(sizeof(unsigned long) * 8);

std::string errno_text(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

}  // namespace

AffinityResult pin_current_thread(const CpuList& cpus) {
  if (cpus.empty()) return {false, "pin_current_thread: empty CPU list"};
  const int max_cpu = *std::max_element(cpus.begin(), cpus.end());
  if (*std::min_element(cpus.begin(), cpus.end()) < 0)
    return {false, "pin_current_thread: negative CPU id"};
  const auto count = static_cast<std::size_t>(max_cpu) + 1;
  cpu_set_t* set = CPU_ALLOC(count);
  if (set == nullptr) return {false, "pin_current_thread: CPU_ALLOC failed"};
  const std::size_t bytes = CPU_ALLOC_SIZE(count);
  CPU_ZERO_S(bytes, set);
  for (int cpu : cpus) CPU_SET_S(static_cast<std::size_t>(cpu), bytes, set);
  // pthread_setaffinity_np returns the error instead of setting errno.
  const int rc = pthread_setaffinity_np(pthread_self(), bytes, set);
  CPU_FREE(set);
  if (rc != 0)
    return {false, errno_text(("pin to CPUs " + format_cpulist(cpus) + " refused").c_str(), rc)};
  return {true, {}};
}

AffinityResult set_memory_policy(MemoryPolicy policy, const std::vector<int>& nodes) {
  long rc = 0;
  if (policy == MemoryPolicy::none || nodes.empty()) {
    rc = syscall(SYS_set_mempolicy, kMpolDefault, nullptr, 0UL);
  } else {
    std::vector<unsigned long> mask(kMaxNodes / kBitsPerWord, 0UL);
    const std::vector<int> chosen =
        policy == MemoryPolicy::prefer ? std::vector<int>{nodes.front()} : nodes;
    for (int node : chosen) {
      if (node < 0 || node >= kMaxNodes)
        return {false, "set_memory_policy: node " + std::to_string(node) + " is out of range"};
      mask[static_cast<std::size_t>(node / kBitsPerWord)] |= 1UL << (node % kBitsPerWord);
    }
    const int mode = policy == MemoryPolicy::bind ? kMpolBind : kMpolPreferred;
    // maxnode counts bits; the kernel reads maxnode-1 of them, hence the +1.
    rc = syscall(SYS_set_mempolicy, mode, mask.data(), static_cast<unsigned long>(kMaxNodes) + 1);
  }
  if (rc != 0) {
    const int err = errno;  // before any allocation can clobber it
    std::string what = "set_mempolicy(";
    what += to_string(policy);
    what += ", nodes ";
    for (std::size_t i = 0; i < nodes.size(); ++i) {
      if (i > 0) what += ',';
      what += std::to_string(nodes[i]);
    }
    what += ") refused";
    return {false, errno_text(what.c_str(), err)};
  }
  return {true, {}};
}

std::optional<CpuList> current_thread_affinity(std::string* error) {
  for (std::size_t count = 1024; count <= (1u << 20); count *= 2) {
    cpu_set_t* set = CPU_ALLOC(count);
    if (set == nullptr) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(count);
    CPU_ZERO_S(bytes, set);
    const int rc = pthread_getaffinity_np(pthread_self(), bytes, set);
    if (rc == 0) {
      CpuList out;
      for (std::size_t i = 0; i < count; ++i)
        if (CPU_ISSET_S(i, bytes, set)) out.push_back(static_cast<int>(i));
      CPU_FREE(set);
      return out;
    }
    CPU_FREE(set);
    if (rc != EINVAL) {
      if (error) *error = errno_text("pthread_getaffinity_np", rc);
      return std::nullopt;
    }
  }
  if (error) *error = "pthread_getaffinity_np: no mask size was accepted";
  return std::nullopt;
}

std::optional<MemoryPolicyState> current_memory_policy(std::string* error) {
  int mode = -1;
  std::vector<unsigned long> mask(kMaxNodes / kBitsPerWord, 0UL);
  if (syscall(SYS_get_mempolicy, &mode, mask.data(), static_cast<unsigned long>(kMaxNodes) + 1,
              nullptr, 0UL) != 0) {
    if (error) *error = errno_text("get_mempolicy", errno);
    return std::nullopt;
  }
  MemoryPolicyState state;
  // Mode flags (MPOL_F_STATIC_NODES etc.) live in the high bits.
  switch (mode & 0xff) {
    case kMpolBind: state.policy = MemoryPolicy::bind; break;
    case kMpolPreferred: state.policy = MemoryPolicy::prefer; break;
    default: state.policy = MemoryPolicy::none; break;
  }
  if (state.policy != MemoryPolicy::none)
    for (int n = 0; n < kMaxNodes; ++n)
      if (mask[static_cast<std::size_t>(n / kBitsPerWord)] & (1UL << (n % kBitsPerWord)))
        state.nodes.push_back(n);
  return state;
}

AffinityResult apply_placement(const InstancePlacement& instance, MemoryPolicy policy) {
  AffinityResult pin = pin_current_thread(instance.cpus);
  AffinityResult mem = set_memory_policy(policy, instance.memory_nodes);
  if (pin.ok && mem.ok) return {true, {}};
  std::string error = pin.error;
  if (!mem.ok) error += (error.empty() ? "" : "; ") + mem.error;
  return {false, error};
}

std::optional<std::vector<ThreadAffinity>> list_thread_affinities(int pid, std::string* error,
                                                                  const std::string& proc_root) {
  const fs::path task_dir =
      fs::path(proc_root) / (pid == 0 ? std::string("self") : std::to_string(pid)) / "task";
  std::error_code ec;
  fs::directory_iterator it(task_dir, ec);
  if (ec) {
    if (error) *error = "cannot list " + task_dir.string() + ": " + ec.message();
    return std::nullopt;
  }
  std::vector<ThreadAffinity> out;
  for (const auto& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    std::ifstream in(entry.path() / "status");
    if (!in) continue;  // the thread exited between listing and reading
    ThreadAffinity info;
    info.tid = std::stoi(name);
    bool have_cpus = false;
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("Name:", 0) == 0) {
        info.name = line.substr(5);
        info.name.erase(0, info.name.find_first_not_of(" \t"));
      } else if (line.rfind("Cpus_allowed_list:", 0) == 0) {
        try {
          info.cpus = parse_cpulist(line.substr(18));
          have_cpus = true;
        } catch (const std::invalid_argument& e) {
          if (error) *error = (entry.path() / "status").string() + ": " + e.what();
          return std::nullopt;
        }
      }
    }
    if (have_cpus) out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const ThreadAffinity& a, const ThreadAffinity& b) { return a.tid < b.tid; });
  return out;
}

}  // namespace apportion
