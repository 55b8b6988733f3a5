#include "apportion/placement.hpp"

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <tuple>
#include <utility>

namespace apportion {

std::string_view to_string(Isolation isolation) noexcept {
  return isolation == Isolation::exclusive ? "exclusive" : "shared";
}

std::string_view to_string(MemoryPolicy policy) noexcept {
  switch (policy) {
    case MemoryPolicy::bind: return "bind";
    case MemoryPolicy::prefer: return "prefer";
    case MemoryPolicy::none: break;
  }
  return "none";
}

namespace {
template <class E, std::size_t N>
std::optional<E> parse_word(std::string_view word, const std::array<E, N>& all) noexcept {
  for (E e : all) {
    if (to_string(e) == word) return e;
  }
  return std::nullopt;
}
}  // namespace

std::optional<Isolation> parse_isolation(std::string_view word) noexcept { return parse_word(word, kIsolations); }

std::optional<MemoryPolicy> parse_memory_policy(std::string_view word) noexcept {
  return parse_word(word, kMemoryPolicies);
}

std::string_view to_string(Locality locality) noexcept {
  switch (locality) {
    case Locality::l3: return "l3";
    case Locality::node: return "node";
    case Locality::machine: break;
  }
  return "machine";
}

PlacementError::PlacementError(PlacementErrorKind kind, std::string model, std::string field,
                               const std::string& message)
    : std::runtime_error("model '" + model + "', field '" + field + "': " + message),
      kind_(kind),
      model_(std::move(model)),
      field_(std::move(field)) {}

namespace {

constexpr int kFree = -1;

int kind_rank(CoreKind kind) noexcept {
  // Latency-bound inference wants the fast cores; efficiency cores are the fallback.
  return kind == CoreKind::efficiency ? 1 : 0;
}

std::string plural(std::size_t n, const char* word) {
  return std::to_string(n) + " " + word + (n == 1 ? "" : "s");
}

std::string describe(const Quota& q) {
  std::string s = q.cpus.empty() ? "cores=" + std::to_string(q.cores)
                                 : "cpus=\"" + format_cpulist(q.cpus) + "\"";
  s += ", isolation=" + std::string(to_string(q.isolation));
  s += ", numa=" + (q.numa < 0 ? std::string("auto") : std::to_string(q.numa));
  s += q.smt ? ", smt=True" : ", smt=False";
  return s;
}

class Planner {
 public:
  Planner(const Topology& t, const std::vector<Quota>& quotas) : t_(t), quotas_(quotas) {
    int max_cpu = 0;
    for (const auto& cpu : t_.cpus) max_cpu = std::max(max_cpu, cpu.id);
    cpu_owner_.assign(static_cast<std::size_t>(max_cpu) + 1, kFree);
    held_idle_.assign(static_cast<std::size_t>(max_cpu) + 1, false);
    core_owner_.assign(t_.cores.size(), kFree);
    core_touched_.assign(t_.cores.size(), false);
    core_load_.assign(t_.cores.size(), 0);
    for (const auto& core : t_.cores)
      if (!core.usable.empty()) usable_cores_.push_back(core.index);
  }

  Plan run() {
    validate();
    std::vector<std::size_t> order(quotas_.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return sort_key(quotas_[a]) < sort_key(quotas_[b]);
    });

    Plan plan;
    plan.usable = t_.usable;
    plan.models.resize(quotas_.size());
    int position = 0;
    for (std::size_t i : order) {
      const Quota& q = quotas_[i];
      if (q.isolation == Isolation::shared && !pool_built_) build_pool(q);
      ModelPlacement& m = plan.models[i];
      m.name = q.name;
      m.isolation = q.isolation;
      m.memory_policy = q.memory_policy;
      m.order = position++;
      std::vector<std::vector<int>> units;  // per physical core, the CPUs this model runs on
      if (q.isolation == Isolation::exclusive)
        units = q.cpus.empty() ? place_exclusive_count(q, static_cast<int>(i), m)
                               : place_explicit(q, static_cast<int>(i), true, m);
      else
        units = q.cpus.empty() ? place_shared_count(q) : place_explicit(q, static_cast<int>(i), false, m);
      finish(q, units, m);
    }
    if (!pool_built_) build_pool_cpus();
    plan.shared_pool = pool_;
    return plan;
  }

 private:
  std::tuple<int, int, int, std::string> sort_key(const Quota& q) const {
    if (q.isolation == Isolation::shared) return {3, 0, 0, q.name};
    if (!q.cpus.empty()) return {0, 0, 0, q.name};
    return {q.numa >= 0 ? 1 : 2, -q.cores, 0, q.name};
  }

  [[noreturn]] void fail(PlacementErrorKind kind, const Quota& q, const char* field,
                         const std::string& message) const {
    throw PlacementError(kind, q.name, field, message);
  }

  int usable_cores_on(int node) const {
    int n = 0;
    for (int c : usable_cores_)
      if (node < 0 || t_.cores[static_cast<std::size_t>(c)].node == node) ++n;
    return n;
  }

  std::string node_ids() const {
    std::string s;
    for (const auto& n : t_.nodes) {
      if (n.cpus.empty()) continue;
      s += (s.empty() ? "" : ", ") + std::to_string(n.id);
    }
    return s;
  }

  void validate() const {
    std::set<std::string> names;
    for (const Quota& q : quotas_) {
      if (q.name.empty()) fail(PlacementErrorKind::quota, q, "name", "a model needs a non-empty name");
      if (!names.insert(q.name).second)
        fail(PlacementErrorKind::quota, q, "name", "two quotas use this name; names must be unique");
      if (q.cores < 0)
        fail(PlacementErrorKind::quota, q, "cores", "cores=" + std::to_string(q.cores) + " is negative; give a count >= 1");
      if (q.instances < 1)
        fail(PlacementErrorKind::quota, q, "instances",
             "instances=" + std::to_string(q.instances) + "; give a count >= 1");
      if (q.threads < 0)
        fail(PlacementErrorKind::quota, q, "threads",
             "threads=" + std::to_string(q.threads) + " is negative; give a count >= 1 (or 0 for one per CPU)");
      if (q.numa >= 0) {
        const NumaNode* node = t_.find_node(q.numa);
        if (node == nullptr || intersect_usable(node->cpus).empty())
          fail(PlacementErrorKind::quota, q, "numa",
               "NUMA node " + std::to_string(q.numa) + " has no usable CPU on this machine; nodes with CPUs: " +
                   node_ids() + " (or \"auto\")");
      } else if (q.numa != -1) {
        fail(PlacementErrorKind::quota, q, "numa", "numa=" + std::to_string(q.numa) + "; give a node id or \"auto\"");
      }
      if (!q.cpus.empty()) {
        CpuList bad;
        for (int cpu : q.cpus) {
          const Cpu* c = t_.find_cpu(cpu);
          if (c == nullptr || !c->usable()) bad.push_back(cpu);
        }
        if (!bad.empty())
          fail(PlacementErrorKind::quota, q, "cpus",
               "CPUs " + format_cpulist(bad) + " are not usable here (offline, absent or outside the allowed set); usable: " +
                   format_cpulist(t_.usable));
        if (q.numa >= 0) {
          CpuList off_node;
          for (int cpu : q.cpus)
            if (t_.find_cpu(cpu)->node != q.numa) off_node.push_back(cpu);
          if (!off_node.empty())
            fail(PlacementErrorKind::quota, q, "numa",
                 "numa=" + std::to_string(q.numa) + " but CPUs " + format_cpulist(off_node) +
                     " of the cpu list are on another node");
        }
        if (!q.smt) {
          std::map<int, int> seen;
          for (int cpu : q.cpus) {
            auto [it, fresh] = seen.emplace(t_.find_cpu(cpu)->core, cpu);
            if (!fresh)
              fail(PlacementErrorKind::quota, q, "smt",
                   "CPUs " + std::to_string(it->second) + " and " + std::to_string(cpu) +
                       " are SMT siblings of one core but smt=False; list one CPU per core or set smt=True");
          }
        }
      } else if (q.isolation == Isolation::exclusive && q.cores == 0) {
        fail(PlacementErrorKind::quota, q, "cores",
             "an exclusive model needs cores >= 1 or an explicit cpu list");
      } else if (q.cores > 0) {
        const int have = usable_cores_on(q.numa);
        if (q.cores > have)
          fail(PlacementErrorKind::quota, q, "cores",
               "asks " + plural(static_cast<std::size_t>(q.cores), "physical core") + " but " +
                   (q.numa >= 0 ? "node " + std::to_string(q.numa) : std::string("this machine")) + " has only " +
                   std::to_string(have) + " usable (" + describe(q) + ")");
      }
    }
  }

  CpuList intersect_usable(const CpuList& cpus) const {
    CpuList out;
    std::set_intersection(cpus.begin(), cpus.end(), t_.usable.begin(), t_.usable.end(),
                          std::back_inserter(out));
    return out;
  }

  const Core& core(int index) const { return t_.cores[static_cast<std::size_t>(index)]; }

  bool core_free(int c) const {
    return core_owner_[static_cast<std::size_t>(c)] == kFree && !core_touched_[static_cast<std::size_t>(c)];
  }

  std::vector<std::vector<int>> place_explicit(const Quota& q, int model, bool exclusive, ModelPlacement& m) {
    std::map<int, std::vector<int>> by_core;  // ordered by core index = by lowest CPU
    CpuList clash;
    int clash_owner = kFree;
    for (int cpu : q.cpus) {
      const int owner = cpu_owner_[static_cast<std::size_t>(cpu)];
      if (owner != kFree) {
        clash.push_back(cpu);
        clash_owner = owner;
      }
      by_core[t_.find_cpu(cpu)->core].push_back(cpu);
    }
    if (!clash.empty()) {
      bool idle = false;
      for (int cpu : clash) idle = idle || held_idle_[static_cast<std::size_t>(cpu)];
      fail(PlacementErrorKind::capacity, q, "cpus",
           "CPUs " + format_cpulist(clash) + " already belong to exclusive model '" +
               quotas_[static_cast<std::size_t>(clash_owner)].name + "'" +
               (idle ? " (SMT siblings of its CPUs, held idle since it has smt=False)" : "") + "; " +
               (exclusive ? "exclusive models never share a CPU" : "a shared model runs only on the shared pool") +
               "; the shared pool is " + (pool_built_ ? "\"" + format_cpulist(pool_) + "\"" : std::string("not yet known")));
    }
    // Without smt, the listed CPUs' siblings stay idle, as for a count of cores: no other model
    // shares a physical core with an exclusive one.
    CpuList siblings;
    if (exclusive && !q.smt) {
      CpuList taken;
      int taken_owner = kFree;
      for (const auto& [c, cpus] : by_core)
        for (int cpu : core(c).usable) {
          if (std::find(cpus.begin(), cpus.end(), cpu) != cpus.end()) continue;
          const int owner = cpu_owner_[static_cast<std::size_t>(cpu)];
          if (owner != kFree) {
            taken.push_back(cpu);
            taken_owner = owner;
          }
          siblings.push_back(cpu);
        }
      if (!taken.empty())
        fail(PlacementErrorKind::capacity, q, "cpus",
             "CPUs " + format_cpulist(taken) + ", SMT siblings of the listed CPUs, already belong to exclusive "
             "model '" + quotas_[static_cast<std::size_t>(taken_owner)].name +
                 "'; with smt=False an exclusive model keeps its cores' siblings idle, so no other model shares "
                 "its physical cores: name CPUs of other cores, or set smt=True on both to share them");
    }
    std::vector<std::vector<int>> units;
    for (auto& [c, cpus] : by_core) {
      if (exclusive) {
        core_touched_[static_cast<std::size_t>(c)] = true;
        for (int cpu : cpus) cpu_owner_[static_cast<std::size_t>(cpu)] = model;
      } else {
        ++core_load_[static_cast<std::size_t>(c)];
      }
      units.push_back(cpus);
    }
    for (int cpu : siblings) {
      cpu_owner_[static_cast<std::size_t>(cpu)] = model;
      held_idle_[static_cast<std::size_t>(cpu)] = true;
    }
    m.reserved.insert(m.reserved.end(), siblings.begin(), siblings.end());
    std::sort(m.reserved.begin(), m.reserved.end());
    return units;
  }

  // Picks the group (set of cores) with the fewest free cores that still holds `need`; ties go to
  // the group whose first core comes first. Returns false when no group fits.
  template <class Key>
  bool tightest_fit(const std::vector<int>& free, int need, Key key, std::vector<int>& out) const {
    std::map<decltype(key(0)), std::vector<int>> groups;
    for (int c : free) groups[key(c)].push_back(c);
    const std::vector<int>* best = nullptr;
    for (const auto& [k, cores] : groups) {
      if (static_cast<int>(cores.size()) < need) continue;
      if (best == nullptr || cores.size() < best->size() ||
          (cores.size() == best->size() && cores.front() < best->front()))
        best = &cores;
    }
    if (best == nullptr) return false;
    out = *best;
    return true;
  }

  std::vector<std::vector<int>> place_exclusive_count(const Quota& q, int model, ModelPlacement& m) {
    std::vector<int> free;
    for (int c : usable_cores_)
      if (core_free(c) && (q.numa < 0 || core(c).node == q.numa)) free.push_back(c);
    const int need = q.cores;
    if (static_cast<int>(free.size()) < need) {
      CpuList left;
      for (int c : free) left.push_back(core(c).usable.front());
      // Which models hold the rest: the largest are placed first, so the model that does not
      // fit may come first in the user's list, and "earlier" alone named none of them.
      std::map<std::string, std::size_t> held;
      for (int c : usable_cores_) {
        if (core_free(c) || (q.numa >= 0 && core(c).node != q.numa)) continue;
        int owner = core_owner_[static_cast<std::size_t>(c)];
        if (owner == kFree && !core(c).usable.empty()) owner = cpu_owner_[static_cast<std::size_t>(core(c).usable.front())];
        if (owner != kFree) ++held["'" + quotas_[static_cast<std::size_t>(owner)].name + "'"];
      }
      std::string holders;
      for (const auto& [name, n] : held) holders += (holders.empty() ? "" : ", ") + name + " " + plural(n, "core");
      fail(PlacementErrorKind::capacity, q, "cores",
           "asks " + plural(static_cast<std::size_t>(need), "exclusive physical core") + " (" + describe(q) +
               ") but " + plural(free.size(), "free core") + " " +
               (q.numa >= 0 ? "on node " + std::to_string(q.numa) + " " : std::string()) + "left after earlier exclusive models" +
               (left.empty() ? std::string() : " (first CPUs \"" + format_cpulist(left) + "\")") +
               (holders.empty() ? std::string() : "; held by " + holders + " (placed largest first)"));
    }

    // Within a group, performance cores first, then by position; across groups in a wider scope,
    // the fullest L3 domains first so the model touches as few domains as possible.
    std::vector<int> chosen;
    const auto by_l3 = [&](int c) { return std::make_pair(core(c).node, core(c).l3); };
    bool found = false;
    if (t_.hybrid) {
      // One core kind inside one L3: a model split over P and E cores runs at the E cores' pace.
      for (int rank = 0; rank < 2 && !found; ++rank) {
        std::vector<int> same_kind;
        for (int c : free)
          if (kind_rank(core(c).kind) == rank) same_kind.push_back(c);
        found = tightest_fit(same_kind, need, by_l3, chosen);
      }
    }
    if (!found) found = tightest_fit(free, need, by_l3, chosen);
    if (!found) found = tightest_fit(free, need, [&](int c) { return core(c).node; }, chosen);
    if (!found) chosen = free;
    order_for_spread(chosen);
    chosen.resize(static_cast<std::size_t>(need));

    std::vector<std::vector<int>> units;
    for (int c : chosen) {
      core_owner_[static_cast<std::size_t>(c)] = model;
      const CpuList& siblings = core(c).usable;
      for (int cpu : siblings) cpu_owner_[static_cast<std::size_t>(cpu)] = model;
      if (q.smt) {
        units.push_back(siblings);
      } else {
        units.push_back({siblings.front()});
        m.reserved.insert(m.reserved.end(), siblings.begin() + 1, siblings.end());
        for (auto it = siblings.begin() + 1; it != siblings.end(); ++it) held_idle_[static_cast<std::size_t>(*it)] = true;
      }
    }
    std::sort(m.reserved.begin(), m.reserved.end());
    return units;
  }

  // Orders candidate cores so that taking a prefix touches the fewest NUMA nodes and L3 domains:
  // nodes with the most candidates first, inside them L3 domains with the most, then performance
  // before efficiency cores, then position.
  void order_for_spread(std::vector<int>& cores) const {
    std::map<int, int> per_node, per_l3;
    for (int c : cores) {
      ++per_node[core(c).node];
      ++per_l3[core(c).l3];
    }
    std::sort(cores.begin(), cores.end(), [&](int a, int b) {
      const Core& x = core(a);
      const Core& y = core(b);
      return std::make_tuple(-per_node[x.node], x.node, -per_l3[x.l3], x.l3, kind_rank(x.kind), a) <
             std::make_tuple(-per_node[y.node], y.node, -per_l3[y.l3], y.l3, kind_rank(y.kind), b);
    });
  }

  void build_pool_cpus() {
    pool_.clear();
    for (int c : usable_cores_)
      for (int cpu : core(c).usable)
        if (cpu_owner_[static_cast<std::size_t>(cpu)] == kFree &&
            core_owner_[static_cast<std::size_t>(c)] == kFree)
          pool_.push_back(cpu);
    std::sort(pool_.begin(), pool_.end());
  }

  void build_pool(const Quota& first_shared) {
    build_pool_cpus();
    pool_built_ = true;
    if (pool_.empty())
      fail(PlacementErrorKind::capacity, first_shared, "isolation",
           "isolation=\"shared\" but exclusive models take all " + plural(t_.usable.size(), "usable CPU") +
               " (\"" + format_cpulist(t_.usable) + "\"), so the shared pool is empty; give fewer cores to exclusive models");
  }

  std::vector<std::vector<int>> place_shared_count(const Quota& q) {
    // Pool CPUs grouped by physical core, restricted to the requested node.
    std::vector<std::pair<int, CpuList>> pool_cores;
    for (int c : usable_cores_) {
      if (q.numa >= 0 && core(c).node != q.numa) continue;
      CpuList cpus;
      for (int cpu : core(c).usable)
        if (std::binary_search(pool_.begin(), pool_.end(), cpu)) cpus.push_back(cpu);
      if (!cpus.empty()) pool_cores.emplace_back(c, std::move(cpus));
    }
    if (pool_cores.empty())
      fail(PlacementErrorKind::capacity, q, "numa",
           "no shared-pool CPU is on node " + std::to_string(q.numa) + "; the shared pool is \"" + format_cpulist(pool_) + "\"");
    std::size_t take = pool_cores.size();
    if (q.cores > 0) {
      if (static_cast<std::size_t>(q.cores) > pool_cores.size())
        fail(PlacementErrorKind::capacity, q, "cores",
             "asks " + plural(static_cast<std::size_t>(q.cores), "physical core") + " of the shared pool (" + describe(q) +
                 ") but the pool " + (q.numa >= 0 ? "on node " + std::to_string(q.numa) + " " : std::string()) + "has " +
                 plural(pool_cores.size(), "core") + " (\"" + format_cpulist(pool_) + "\")");
      take = static_cast<std::size_t>(q.cores);
      // Spread shared models over the pool: least-loaded cores first.
      std::stable_sort(pool_cores.begin(), pool_cores.end(), [&](const auto& a, const auto& b) {
        return core_load_[static_cast<std::size_t>(a.first)] < core_load_[static_cast<std::size_t>(b.first)];
      });
      pool_cores.resize(take);
      std::sort(pool_cores.begin(), pool_cores.end());
    }
    std::vector<std::vector<int>> units;
    for (auto& [c, cpus] : pool_cores) {
      ++core_load_[static_cast<std::size_t>(c)];
      if (q.smt)
        units.push_back(cpus);
      else
        units.push_back({cpus.front()});
    }
    return units;
  }

  void finish(const Quota& q, const std::vector<std::vector<int>>& units, ModelPlacement& m) const {
    for (const auto& u : units) m.cpus.insert(m.cpus.end(), u.begin(), u.end());
    std::sort(m.cpus.begin(), m.cpus.end());
    m.cores = static_cast<int>(units.size());

    std::set<int> nodes, l3s;
    for (int cpu : m.cpus) {
      const Cpu* c = t_.find_cpu(cpu);
      nodes.insert(c->node);
      l3s.insert(c->l3);
    }
    m.locality = l3s.size() == 1 && nodes.size() == 1 ? Locality::l3
                 : nodes.size() == 1                 ? Locality::node
                                                     : Locality::machine;

    const auto instances = static_cast<std::size_t>(q.instances);
    std::vector<CpuList> slices(instances);
    if (units.size() >= instances) {
      // Whole cores per instance keep SMT siblings (which share L1/L2) in one worker.
      std::size_t next = 0;
      for (std::size_t i = 0; i < instances; ++i) {
        const std::size_t n = units.size() / instances + (i < units.size() % instances ? 1 : 0);
        for (std::size_t k = 0; k < n; ++k, ++next)
          slices[i].insert(slices[i].end(), units[next].begin(), units[next].end());
      }
    } else {
      CpuList flat;
      for (const auto& u : units) flat.insert(flat.end(), u.begin(), u.end());
      if (flat.size() >= instances) {
        std::size_t next = 0;
        for (std::size_t i = 0; i < instances; ++i) {
          const std::size_t n = flat.size() / instances + (i < flat.size() % instances ? 1 : 0);
          slices[i].assign(flat.begin() + static_cast<std::ptrdiff_t>(next),
                           flat.begin() + static_cast<std::ptrdiff_t>(next + n));
          next += n;
        }
      } else if (q.oversubscribe) {
        for (std::size_t i = 0; i < instances; ++i) slices[i] = {flat[i % flat.size()]};
      } else {
        fail(PlacementErrorKind::quota, q, "instances",
             "instances=" + std::to_string(q.instances) + " but the model has only " +
                 plural(flat.size(), "CPU") + " (\"" + format_cpulist(flat) +
                 "\"); give it more cores, fewer instances, or oversubscribe=True");
      }
    }

    for (std::size_t i = 0; i < instances; ++i) {
      InstancePlacement inst;
      inst.cpus = std::move(slices[i]);
      std::sort(inst.cpus.begin(), inst.cpus.end());
      const int have = static_cast<int>(inst.cpus.size());
      if (q.threads > have && !q.oversubscribe)
        fail(PlacementErrorKind::quota, q, "threads",
             "threads=" + std::to_string(q.threads) + " per instance but instance " + std::to_string(i) +
                 " has " + plural(static_cast<std::size_t>(have), "CPU") + " (\"" + format_cpulist(inst.cpus) + "\", " +
                 describe(q) + ", instances=" + std::to_string(q.instances) + "); use threads <= " +
                 std::to_string(have) + ", smt=True on an SMT machine, or oversubscribe=True");
      inst.threads = q.threads > 0 ? q.threads : have;
      if (q.numa >= 0) {
        inst.memory_nodes = {q.numa};
      } else {
        std::set<int> inst_nodes;
        for (int cpu : inst.cpus) inst_nodes.insert(t_.find_cpu(cpu)->node);
        inst.memory_nodes.assign(inst_nodes.begin(), inst_nodes.end());
      }
      m.instances.push_back(std::move(inst));
    }
  }

  const Topology& t_;
  const std::vector<Quota>& quotas_;
  std::vector<int> cpu_owner_;    // by CPU id: exclusive model index or kFree
  std::vector<int> core_owner_;   // by core index: exclusive model that took the whole core
  std::vector<bool> core_touched_;  // an explicit exclusive list holds some of its CPUs
  std::vector<bool> held_idle_;     // by CPU id: an SMT sibling held idle for its exclusive owner
  std::vector<int> core_load_;    // shared models running on the core
  std::vector<int> usable_cores_;
  CpuList pool_;
  bool pool_built_ = false;
};

}  // namespace

Plan plan_placement(const Topology& topology, const std::vector<Quota>& quotas) {
  return Planner(topology, quotas).run();
}

}  // namespace apportion
