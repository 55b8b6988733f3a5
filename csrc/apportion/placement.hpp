// Placement: a pure, deterministic function from (topology, quotas) to who runs where.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "apportion/topology.hpp"

namespace apportion {

enum class Isolation : std::uint8_t { exclusive, shared };
enum class MemoryPolicy : std::uint8_t { bind, prefer, none };
inline constexpr std::array<Isolation, 2> kIsolations{Isolation::exclusive, Isolation::shared};
inline constexpr std::array<MemoryPolicy, 3> kMemoryPolicies{MemoryPolicy::bind, MemoryPolicy::prefer,
                                                             MemoryPolicy::none};

/// The words of the Python API: "exclusive" | "shared", "bind" | "prefer" | "none".
std::string_view to_string(Isolation isolation) noexcept;
std::string_view to_string(MemoryPolicy policy) noexcept;
/// The inverse of to_string: the one parser of each enum (nullopt for any other word).
std::optional<Isolation> parse_isolation(std::string_view word) noexcept;
std::optional<MemoryPolicy> parse_memory_policy(std::string_view word) noexcept;

/// The CPU side of one model's quota (mirrors apportion.placement.Quota).
///
/// `cores` counts physical cores. With `smt` the model also runs on their SMT siblings; without
/// it the siblings of an exclusive model's cores stay idle (listed as `reserved`), so no other
/// model shares a physical core with it. `cpus`, when not empty, names logical CPUs explicitly
/// and replaces `cores`. A shared model with neither runs on the whole shared pool.
struct Quota {
  std::string name;
  int cores = 0;       ///< physical cores; 0 = "the whole shared pool" (shared models only)
  CpuList cpus;        ///< explicit logical CPUs; overrides `cores`
  int instances = 1;   ///< concurrent executions; each gets its own slice of the model's CPUs
  int threads = 0;     ///< intra-op threads per instance; 0 = one per CPU of the instance
  Isolation isolation = Isolation::shared;
  int numa = -1;       ///< NUMA node for cores and memory; -1 = choose automatically
  bool smt = false;
  MemoryPolicy memory_policy = MemoryPolicy::bind;
  bool oversubscribe = false;  ///< consent to more threads (or instances) than CPUs
};

/// Where one instance runs.
struct InstancePlacement {
  CpuList cpus;           ///< the worker pins itself to exactly these
  int threads = 0;        ///< intra-op threads for the framework inside this worker
  std::vector<int> memory_nodes;  ///< the nodes of `cpus`, or the requested node; ascending
};

/// How close together a model's CPUs ended up.
enum class Locality : std::uint8_t { l3, node, machine };
std::string_view to_string(Locality locality) noexcept;

struct ModelPlacement {
  std::string name;
  Isolation isolation = Isolation::shared;
  MemoryPolicy memory_policy = MemoryPolicy::bind;
  CpuList cpus;      ///< union of the instances' CPUs
  CpuList reserved;  ///< SMT siblings held idle for an exclusive model without `smt`
  int cores = 0;     ///< physical cores touched by `cpus`
  Locality locality = Locality::machine;
  std::vector<InstancePlacement> instances;
  int order = 0;     ///< position in the placement order (see plan_placement)
};

struct Plan {
  std::vector<ModelPlacement> models;  ///< in the order the quotas were given
  CpuList shared_pool;  ///< usable CPUs no exclusive model owns or reserves
  CpuList usable;       ///< every CPU the topology allowed
};

/// Why placement refused: `quota` for a request that can never work on this machine (unknown
/// node, CPU not usable, threads beyond the CPUs without consent); `capacity` for requests that
/// are each valid but do not fit together (or with what is left).
enum class PlacementErrorKind : std::uint8_t { quota, capacity };

/// Thrown by plan_placement. what() names the model, the field, what was asked and what is left.
class PlacementError : public std::runtime_error {
 public:
  PlacementError(PlacementErrorKind kind, std::string model, std::string field,
                 const std::string& message);
  PlacementErrorKind kind() const noexcept { return kind_; }
  const std::string& model() const noexcept { return model_; }
  const std::string& field() const noexcept { return field_; }

 private:
  PlacementErrorKind kind_;
  std::string model_;
  std::string field_;
};

/// Places every model. Pure and deterministic: the result depends only on the topology and the
/// set of quotas, not on their order in `quotas` (names must be unique).
///
/// Order: exclusive models with explicit CPUs, then exclusive models with a NUMA node, then the
/// other exclusive models, larger `cores` first, ties by name; shared models last, by name.
/// Exclusive models with a count take whole, wholly free physical cores, looking for the tightest
/// fit first inside one L3 domain (one core kind on hybrid parts, performance before efficiency),
/// then one NUMA node, then the machine (fewest domains). Instances split the model's cores in
/// that order into contiguous runs whose sizes differ by at most one core; with fewer cores than
/// instances the CPUs are split instead. Shared models with a count take the pool's least-loaded
/// cores (ties: lowest CPU); without one they take the whole pool.
///
/// Throws PlacementError. Safe from any thread.
Plan plan_placement(const Topology& topology, const std::vector<Quota>& quotas);

}  // namespace apportion
