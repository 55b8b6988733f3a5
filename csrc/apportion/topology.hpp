// The machine's CPU topology, read from sysfs under a root path so tests can point it at fake
// trees (tests/fixtures/topology/*). Plain C++20, no Python.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace apportion {

/// A sorted, duplicate-free list of logical CPU ids.
using CpuList = std::vector<int>;

/// Parses a kernel cpulist ("0-3,8,10-11", "" for none, surrounding whitespace ignored).
/// Throws std::invalid_argument naming the offending token for anything else (negative ids,
/// reversed ranges, stray characters). The result is sorted and duplicate-free.
/// Pure; safe from any thread.
CpuList parse_cpulist(std::string_view text);

/// Formats a cpulist the way the kernel does ("0-3,8,10-11"); the input need not be sorted.
/// Pure; safe from any thread.
std::string format_cpulist(const CpuList& cpus);

/// What kind of core a hybrid part puts a CPU on. `unknown` on homogeneous machines.
enum class CoreKind : std::uint8_t { unknown, performance, efficiency };

inline constexpr std::array<CoreKind, 3> kCoreKinds{CoreKind::unknown, CoreKind::performance,
                                                    CoreKind::efficiency};

/// "performance", "efficiency" or "unknown".
std::string_view to_string(CoreKind kind) noexcept;

/// One logical CPU (a hardware thread). Offline CPUs have no topology in sysfs, so their
/// core/package/l3 are -1.
struct Cpu {
  int id = -1;
  int core = -1;     ///< index into Topology::cores, -1 when offline
  int package = -1;  ///< physical_package_id
  int node = -1;     ///< NUMA node id
  int l3 = -1;       ///< index into Topology::l3_domains, -1 when offline
  CoreKind kind = CoreKind::unknown;
  bool online = false;
  bool allowed = false;  ///< in the process's allowed set
  bool usable() const noexcept { return online && allowed; }
};

/// One physical core: every online CPU that shares it (its SMT siblings), usable or not.
struct Core {
  int index = -1;    ///< position in Topology::cores
  int package = -1;
  int die = 0;
  int core_id = -1;  ///< the kernel's core_id (unique only within a package/die)
  int node = -1;
  int l3 = -1;
  CoreKind kind = CoreKind::unknown;
  CpuList cpus;       ///< online siblings, ascending
  CpuList usable;     ///< the siblings this process may run on
};

struct Package {
  int id = -1;
  CpuList cpus;  ///< online CPUs
};

struct NumaNode {
  int id = -1;
  std::uint64_t memory_bytes = 0;  ///< MemTotal from the node's meminfo; 0 when unknown
  CpuList cpus;                    ///< online CPUs (empty for memory-only nodes)
};

/// CPUs that share one last-level (L3) cache. Without L3 information there is one per package.
struct L3Domain {
  int index = -1;
  int id = -1;                  ///< the cache's sysfs id, -1 when unknown or synthesised
  std::uint64_t size_bytes = 0;  ///< 0 when unknown or synthesised
  CpuList cpus;
};

/// A snapshot of the machine. Cores, packages, nodes and L3 domains are sorted by their lowest
/// CPU (nodes by id), so indices are stable for a given tree. Immutable after reading; safe to
/// share between threads.
struct Topology {
  std::string root;
  std::vector<Cpu> cpus;  ///< every present CPU, ascending by id
  std::vector<Core> cores;
  std::vector<Package> packages;
  std::vector<NumaNode> nodes;
  std::vector<L3Domain> l3_domains;
  CpuList online;
  CpuList offline;
  CpuList allowed;  ///< the process's allowed set (may name CPUs that are offline)
  CpuList usable;   ///< online and allowed: the only CPUs placement hands out
  bool hybrid = false;

  /// The CPU with this id, or nullptr when it is not present.
  const Cpu* find_cpu(int id) const noexcept;
  /// The node with this id, or nullptr.
  const NumaNode* find_node(int id) const noexcept;
  /// SMT siblings per core among usable CPUs (max over cores; 1 without SMT, 0 when none usable).
  int max_threads_per_core() const noexcept;

  /// A copy whose allowed (hence usable) set is intersected with `cpus`, e.g. Runtime(cpus=...).
  /// Throws std::invalid_argument when `cpus` names a CPU that is not present.
  Topology restricted_to(const CpuList& cpus) const;
};

/// Reads the topology under `root` ("/" for the live machine).
///
/// Files read, relative to root (sysfs paths under sys/devices/system):
///  - cpu/present (else the cpuN directories) and cpu/online (else every cpuN/online, else all);
///  - cpuN/topology/{physical_package_id,core_id,die_id}: required for online CPUs; cores are
///    keyed by (package, die, core_id);
///  - cpuN/cache/index*/{level,type,shared_cpu_list,id,size}: the level-3 unified/data cache;
///    without one, a CPU's L3 domain is its package;
///  - node/nodeN/{cpulist,meminfo}: without node directories there is one node 0 holding every
///    CPU, with MemTotal from proc/meminfo when that exists;
///  - sys/devices/cpu_core/cpus and sys/devices/cpu_atom/cpus (Intel hybrid), else
///    cpuN/cpu_capacity: when capacities differ, the highest is `performance`, the rest
///    `efficiency`.
///
/// The allowed set: for the live machine (root "/") it is sched_getaffinity of the process's
/// main thread, which the kernel already intersects with the cgroup cpuset. For any other root it
/// is the intersection of whichever of these exist: proc/self/status `Cpus_allowed_list`,
/// sys/fs/cgroup/cpuset.cpus.effective (cgroup v2); when neither exists, every present CPU.
///
/// Throws std::runtime_error naming the file for a malformed or missing required file.
/// Safe from any thread (reads files only).
Topology read_topology(const std::string& root = "/");

}  // namespace apportion
