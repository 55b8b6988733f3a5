// Pinning the calling thread and its NUMA memory policy with plain Linux syscalls (no libnuma).
//
// Nothing here throws for a refusal by the OS: a container may forbid set_mempolicy, a cpuset
// may exclude a CPU the plan chose. The engine turns each failure into a Python warning.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "apportion/placement.hpp"
#include "apportion/topology.hpp"

namespace apportion {

/// Outcome of one OS call: ok, or the reason (errno text and what was attempted).
struct AffinityResult {
  bool ok = false;
  std::string error;
  explicit operator bool() const noexcept { return ok; }
};

/// Pins the calling thread to `cpus` (pthread_setaffinity_np). Threads it creates afterwards
/// inherit the mask, which is how framework pools end up confined. Affects only the caller.
AffinityResult pin_current_thread(const CpuList& cpus);

/// Sets the calling thread's NUMA memory policy (set_mempolicy): MPOL_BIND or MPOL_PREFERRED
/// to `nodes` (prefer uses the first node), or MPOL_DEFAULT for MemoryPolicy::none or an empty
/// `nodes`. Applies to the caller's future allocations and is inherited by threads it creates.
AffinityResult set_memory_policy(MemoryPolicy policy, const std::vector<int>& nodes);

/// The calling thread's CPU affinity, or std::nullopt (with `error` filled when given).
std::optional<CpuList> current_thread_affinity(std::string* error = nullptr);

/// The calling thread's NUMA policy and nodes (get_mempolicy), or std::nullopt.
struct MemoryPolicyState {
  MemoryPolicy policy = MemoryPolicy::none;  ///< none = MPOL_DEFAULT (or a mode we don't set)
  std::vector<int> nodes;
};
std::optional<MemoryPolicyState> current_memory_policy(std::string* error = nullptr);

/// Applies one instance's placement to the calling thread: CPUs first, then memory.
/// Both are attempted even if the first fails; `error` joins the reasons.
AffinityResult apply_placement(const InstancePlacement& instance, MemoryPolicy policy);

/// One thread of a process as /proc/<pid>/task/<tid>/status reports it.
struct ThreadAffinity {
  int tid = -1;
  std::string name;
  CpuList cpus;  ///< Cpus_allowed_list
};

/// Every thread of process `pid` (0 = this process) with its allowed CPUs, ascending by tid.
/// Threads that exit while being read are skipped. Reads `proc_root`/<pid>/task, so tests may
/// point it at a fake tree. std::nullopt (and `error`) when the task directory can't be listed.
std::optional<std::vector<ThreadAffinity>> list_thread_affinities(int pid = 0,
                                                                  std::string* error = nullptr,
                                                                  const std::string& proc_root = "/proc");

}  // namespace apportion
