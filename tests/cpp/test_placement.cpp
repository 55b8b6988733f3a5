#include "apportion/placement.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>

namespace {

using apportion::CoreKind;
using apportion::CpuList;
using apportion::Isolation;
using apportion::Locality;
using apportion::MemoryPolicy;
using apportion::parse_cpulist;
using apportion::Plan;
using apportion::plan_placement;
using apportion::PlacementError;
using apportion::PlacementErrorKind;
using apportion::Quota;
using apportion::read_topology;
using apportion::Topology;

const Topology& fixture(const std::string& name) {
  static std::map<std::string, Topology> cache;
  auto it = cache.find(name);
  if (it == cache.end())
    it = cache.emplace(name, read_topology(std::string(APPORTION_TEST_FIXTURES) + "/topology/" + name)).first;
  return it->second;
}

Quota exclusive(const std::string& name, int cores, bool smt = false, int instances = 1) {
  Quota q;
  q.name = name;
  q.cores = cores;
  q.isolation = Isolation::exclusive;
  q.smt = smt;
  q.instances = instances;
  return q;
}

Quota shared(const std::string& name, int cores = 0) {
  Quota q;
  q.name = name;
  q.cores = cores;
  return q;
}

Quota explicit_cpus(const std::string& name, const char* cpus, bool is_exclusive = true) {
  Quota q;
  q.name = name;
  q.cpus = parse_cpulist(cpus);
  q.isolation = is_exclusive ? Isolation::exclusive : Isolation::shared;
  return q;
}

PlacementError error_of(const Topology& t, const std::vector<Quota>& quotas) {
  try {
    plan_placement(t, quotas);
  } catch (const PlacementError& e) {
    return e;
  }
  ADD_FAILURE() << "plan_placement accepted the quotas";
  return PlacementError(PlacementErrorKind::quota, "", "", "");
}

bool same_plan(const Plan& a, const Plan& b) {
  if (a.models.size() != b.models.size() || a.shared_pool != b.shared_pool) return false;
  for (std::size_t i = 0; i < a.models.size(); ++i) {
    const auto& x = a.models[i];
    const auto& y = b.models[i];
    if (x.name != y.name || x.cpus != y.cpus || x.reserved != y.reserved || x.instances.size() != y.instances.size())
      return false;
    for (std::size_t k = 0; k < x.instances.size(); ++k)
      if (x.instances[k].cpus != y.instances[k].cpus || x.instances[k].threads != y.instances[k].threads ||
          x.instances[k].memory_nodes != y.instances[k].memory_nodes)
        return false;
  }
  return true;
}

// Invariants every plan must satisfy, whatever the quotas.
void check_invariants(const Topology& t, const std::vector<Quota>& quotas, const Plan& plan) {
  std::map<int, std::string> exclusive_owner;
  for (std::size_t i = 0; i < quotas.size(); ++i) {
    const Quota& q = quotas[i];
    const auto& m = plan.models[i];
    ASSERT_EQ(m.name, q.name);
    ASSERT_EQ(static_cast<int>(m.instances.size()), q.instances) << q.name;
    CpuList from_instances;
    for (const auto& inst : m.instances) {
      EXPECT_FALSE(inst.cpus.empty()) << q.name;
      from_instances.insert(from_instances.end(), inst.cpus.begin(), inst.cpus.end());
      EXPECT_FALSE(inst.memory_nodes.empty()) << q.name;
    }
    std::sort(from_instances.begin(), from_instances.end());
    from_instances.erase(std::unique(from_instances.begin(), from_instances.end()), from_instances.end());
    EXPECT_EQ(from_instances, m.cpus) << q.name;
    for (int cpu : m.cpus) EXPECT_TRUE(t.find_cpu(cpu)->usable()) << q.name << " got unusable CPU " << cpu;
    if (q.isolation == Isolation::exclusive) {
      for (int cpu : m.cpus) {
        auto [it, fresh] = exclusive_owner.emplace(cpu, q.name);
        EXPECT_TRUE(fresh) << "CPU " << cpu << " given to " << it->second << " and " << q.name;
      }
      for (int cpu : m.reserved) {
        auto [it, fresh] = exclusive_owner.emplace(cpu, q.name + " (reserved)");
        EXPECT_TRUE(fresh) << "CPU " << cpu << " reserved twice";
      }
      if (q.cpus.empty()) {
        EXPECT_EQ(m.cores, q.cores) << q.name;
        std::set<int> cores;
        for (int cpu : m.cpus) cores.insert(t.find_cpu(cpu)->core);
        EXPECT_EQ(static_cast<int>(cores.size()), q.cores) << q.name;
        if (!q.smt) {
          EXPECT_EQ(m.cpus.size(), cores.size()) << q.name << " used SMT siblings with smt=False";
        }
      } else {
        EXPECT_EQ(m.cpus, q.cpus) << q.name;
      }
    } else {
      for (int cpu : m.cpus)
        EXPECT_TRUE(std::binary_search(plan.shared_pool.begin(), plan.shared_pool.end(), cpu))
            << q.name << " shared model outside the pool: " << cpu;
    }
  }
  for (int cpu : plan.shared_pool) EXPECT_FALSE(exclusive_owner.count(cpu)) << "pool holds exclusive CPU " << cpu;
}

// --- basic behaviour --------------------------------------------------------------------------

TEST(Placement, DefaultSharedModelGetsThePoolOneCpuPerCore) {
  const Topology& t = fixture("server_2s128t");
  const Plan plan = plan_placement(t, {shared("m")});
  ASSERT_EQ(plan.models.size(), 1u);
  EXPECT_EQ(plan.shared_pool.size(), 128u);
  const auto& m = plan.models[0];
  EXPECT_EQ(m.cpus, parse_cpulist("0-63"));  // smt=False: the first thread of each core
  ASSERT_EQ(m.instances.size(), 1u);
  EXPECT_EQ(m.instances[0].threads, 64);
  EXPECT_EQ(m.instances[0].memory_nodes, (std::vector<int>{0, 1}));
  EXPECT_EQ(m.locality, Locality::machine);
}

TEST(Placement, ExclusiveModelStaysInOneL3DomainWithoutSiblings) {
  const Topology& t = fixture("server_2s128t");
  const Plan plan = plan_placement(t, {exclusive("a", 8), shared("rest")});
  const auto& a = plan.models[0];
  EXPECT_EQ(a.cpus, parse_cpulist("0-7"));
  EXPECT_EQ(a.reserved, parse_cpulist("64-71"));  // siblings idle, not in the pool
  EXPECT_EQ(a.locality, Locality::l3);
  EXPECT_EQ(a.instances[0].memory_nodes, (std::vector<int>{0}));
  EXPECT_EQ(plan.shared_pool.size(), 112u);
  for (int cpu : parse_cpulist("0-7,64-71"))
    EXPECT_FALSE(std::binary_search(plan.shared_pool.begin(), plan.shared_pool.end(), cpu));
  check_invariants(t, {exclusive("a", 8), shared("rest")}, plan);
}

TEST(Placement, SmtModelTakesSiblingsAndTightestL3Fit) {
  const Topology& t = fixture("server_2s128t");
  // a fills most of CCX 0; b (3 cores) fits in CCX 0's remaining 4 cores: the tightest fit.
  const std::vector<Quota> quotas{exclusive("a", 4), exclusive("b", 3, true)};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, parse_cpulist("0-3"));
  EXPECT_EQ(plan.models[1].cpus, parse_cpulist("4-6,68-70"));
  EXPECT_TRUE(plan.models[1].reserved.empty());
  EXPECT_EQ(plan.models[1].locality, Locality::l3);
  check_invariants(t, quotas, plan);
}

TEST(Placement, ModelLargerThanAnL3StaysInOneNode) {
  const Topology& t = fixture("server_2s128t");
  const std::vector<Quota> quotas{exclusive("big", 20)};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].locality, Locality::node);
  EXPECT_EQ(plan.models[0].cpus, parse_cpulist("0-19"));
  EXPECT_EQ(plan.models[0].instances[0].memory_nodes, (std::vector<int>{0}));
}

TEST(Placement, ModelLargerThanANodeSpansTheFewestDomains) {
  const Topology& t = fixture("server_2s128t");
  const Plan plan = plan_placement(t, {exclusive("huge", 40, false, 2)});
  const auto& m = plan.models[0];
  EXPECT_EQ(m.locality, Locality::machine);
  EXPECT_EQ(m.cpus, parse_cpulist("0-39"));
  // Two instances of 20 cores: the first lies wholly in node 0, the second spans both.
  EXPECT_EQ(m.instances[0].cpus, parse_cpulist("0-19"));
  EXPECT_EQ(m.instances[0].memory_nodes, (std::vector<int>{0}));
  EXPECT_EQ(m.instances[1].cpus, parse_cpulist("20-39"));
  EXPECT_EQ(m.instances[1].memory_nodes, (std::vector<int>{0, 1}));
}

TEST(Placement, NumaRequestIsHonouredForCoresAndMemory) {
  const Topology& t = fixture("server_2s128t");
  Quota q = exclusive("n1", 4);
  q.numa = 1;
  q.memory_policy = MemoryPolicy::prefer;
  const Plan plan = plan_placement(t, {q});
  EXPECT_EQ(plan.models[0].cpus, parse_cpulist("32-35"));
  EXPECT_EQ(plan.models[0].instances[0].memory_nodes, (std::vector<int>{1}));
  EXPECT_EQ(plan.models[0].memory_policy, MemoryPolicy::prefer);
}

TEST(Placement, InstancesSplitWholeCoresEvenly) {
  const Topology& t = fixture("server_2s128t");
  const Plan plan = plan_placement(t, {exclusive("m", 5, true, 2)});
  const auto& m = plan.models[0];
  ASSERT_EQ(m.instances.size(), 2u);
  EXPECT_EQ(m.instances[0].cpus, parse_cpulist("0-2,64-66"));  // 3 cores
  EXPECT_EQ(m.instances[1].cpus, parse_cpulist("3-4,67-68"));  // 2 cores
  EXPECT_EQ(m.instances[0].threads, 6);
  EXPECT_EQ(m.instances[1].threads, 4);
}

TEST(Placement, MoreInstancesThanCoresSplitsCpusThenNeedsConsent) {
  const Topology& t = fixture("server_2s128t");
  const Plan plan = plan_placement(t, {exclusive("m", 1, true, 2)});
  EXPECT_EQ(plan.models[0].instances[0].cpus, CpuList{0});
  EXPECT_EQ(plan.models[0].instances[1].cpus, CpuList{64});
  const auto e = error_of(t, {exclusive("m", 1, false, 2)});
  EXPECT_EQ(e.field(), "instances");
  EXPECT_EQ(e.model(), "m");
  Quota ok = exclusive("m", 1, false, 3);
  ok.oversubscribe = true;
  const Plan over = plan_placement(t, {ok});
  for (const auto& inst : over.models[0].instances) EXPECT_EQ(inst.cpus, CpuList{0});
}

TEST(Placement, HybridPrefersPerformanceCoresAndKeepsOneKind) {
  const Topology& t = fixture("hybrid_8p16e");
  const std::vector<Quota> quotas{exclusive("fast", 4, true), exclusive("wide", 10), exclusive("small", 4)};
  const Plan plan = plan_placement(t, quotas);
  // Order: wide (10) first -> E cores (no single P group holds 10); then fast and small on P.
  for (int cpu : plan.models[1].cpus) EXPECT_EQ(t.find_cpu(cpu)->kind, CoreKind::efficiency) << cpu;
  for (int cpu : plan.models[0].cpus) EXPECT_EQ(t.find_cpu(cpu)->kind, CoreKind::performance) << cpu;
  EXPECT_EQ(plan.models[0].cpus.size(), 8u);  // 4 P cores x 2 threads
  for (int cpu : plan.models[2].cpus) EXPECT_EQ(t.find_cpu(cpu)->kind, CoreKind::performance) << cpu;
  check_invariants(t, quotas, plan);
}

TEST(Placement, ExplicitCpuListsAreHonouredAndKeptOutOfThePool) {
  const Topology& t = fixture("vm2");
  const std::vector<Quota> quotas{explicit_cpus("pinned", "1"), shared("rest")};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, CpuList{1});
  EXPECT_EQ(plan.models[1].cpus, CpuList{0});
  EXPECT_EQ(plan.shared_pool, CpuList{0});
  check_invariants(t, quotas, plan);
}

TEST(Placement, ContainerOnlyHandsOutAllowedCpus) {
  const Topology& t = fixture("container_scattered");
  // Usable: 1, 9 (one core), 3, 4, 14 (three more cores).
  const std::vector<Quota> quotas{exclusive("a", 2, true), shared("b")};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, (CpuList{1, 3, 9}));  // core {1,9} and core {3}
  EXPECT_EQ(plan.shared_pool, (CpuList{4, 14}));
  check_invariants(t, quotas, plan);
  EXPECT_EQ(error_of(t, {exclusive("x", 5)}).field(), "cores");
}

TEST(Placement, OfflineCpuIsNeverPlaced) {
  const Topology& t = fixture("offline_cpu");
  const std::vector<Quota> quotas{exclusive("a", 2, true), exclusive("b", 2, true)};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, (CpuList{0, 1, 4}));
  EXPECT_EQ(plan.models[1].cpus, (CpuList{2, 3, 6, 7}));
  check_invariants(t, quotas, plan);
  const auto e = error_of(t, {explicit_cpus("x", "5")});
  EXPECT_EQ(e.field(), "cpus");
  EXPECT_NE(std::string(e.what()).find("not usable"), std::string::npos) << e.what();
}

TEST(Placement, SharedModelsWithCountsSpreadOverThePool) {
  const Topology& t = fixture("offline_cpu");  // 4 cores
  const std::vector<Quota> quotas{shared("a", 2), shared("b", 2), shared("c", 1)};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, (CpuList{0, 1}));
  EXPECT_EQ(plan.models[1].cpus, (CpuList{2, 3}));
  EXPECT_EQ(plan.models[2].cpus, (CpuList{0}));  // all loaded once: lowest core
}

// --- errors ---------------------------------------------------------------------------------------

TEST(PlacementErrors, EveryInvalidQuotaNamesModelAndField) {
  const Topology& t = fixture("server_2s128t");
  struct Case {
    Quota q;
    const char* field;
    PlacementErrorKind kind;
  };
  std::vector<Case> cases;
  Quota q = exclusive("neg", -1);
  cases.push_back({q, "cores", PlacementErrorKind::quota});
  q = exclusive("zero", 0);
  cases.push_back({q, "cores", PlacementErrorKind::quota});
  q = exclusive("toomany", 65);
  cases.push_back({q, "cores", PlacementErrorKind::quota});
  q = exclusive("inst", 2);
  q.instances = 0;
  cases.push_back({q, "instances", PlacementErrorKind::quota});
  q = exclusive("thr", 2);
  q.threads = -2;
  cases.push_back({q, "threads", PlacementErrorKind::quota});
  q = exclusive("thr2", 2);
  q.threads = 3;
  cases.push_back({q, "threads", PlacementErrorKind::quota});
  q = exclusive("node", 2);
  q.numa = 5;
  cases.push_back({q, "numa", PlacementErrorKind::quota});
  q = exclusive("node2", 2);
  q.numa = -7;
  cases.push_back({q, "numa", PlacementErrorKind::quota});
  q = exclusive("nodefull", 33);
  q.numa = 0;
  cases.push_back({q, "cores", PlacementErrorKind::quota});
  q = explicit_cpus("sib", "0,64");
  cases.push_back({q, "smt", PlacementErrorKind::quota});
  q = explicit_cpus("absent", "200");
  cases.push_back({q, "cpus", PlacementErrorKind::quota});
  q = explicit_cpus("offnode", "0,40");
  q.numa = 0;
  cases.push_back({q, "numa", PlacementErrorKind::quota});
  q = shared("");
  cases.push_back({q, "name", PlacementErrorKind::quota});
  for (const auto& c : cases) {
    const auto e = error_of(t, {c.q});
    EXPECT_EQ(e.model(), c.q.name);
    EXPECT_EQ(e.field(), c.field) << e.what();
    EXPECT_EQ(e.kind(), c.kind) << e.what();
    EXPECT_NE(std::string(e.what()).find("model '" + c.q.name + "'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::string("field '") + c.field + "'"), std::string::npos) << e.what();
  }
}

TEST(PlacementErrors, ThreadsBeyondCoresNeedSmtOrConsent) {
  const Topology& t = fixture("server_2s128t");
  Quota q = exclusive("m", 2);
  q.threads = 4;
  EXPECT_EQ(error_of(t, {q}).field(), "threads");
  q.smt = true;  // 2 cores x 2 threads = 4 CPUs
  EXPECT_EQ(plan_placement(t, {q}).models[0].instances[0].threads, 4);
  q.threads = 5;
  EXPECT_EQ(error_of(t, {q}).field(), "threads");
  q.oversubscribe = true;
  EXPECT_EQ(plan_placement(t, {q}).models[0].instances[0].threads, 5);
}

TEST(Placement, ExplicitExclusiveListKeepsItsCoresSiblingsIdleWithoutSmt) {
  const Topology& t = fixture("server_2s128t");  // CPUs 64 and 65 are the siblings of 0 and 1
  const std::vector<Quota> quotas{explicit_cpus("pinned", "0-1"), shared("rest")};
  const Plan plan = plan_placement(t, quotas);
  EXPECT_EQ(plan.models[0].cpus, (CpuList{0, 1}));
  EXPECT_EQ(plan.models[0].reserved, (CpuList{64, 65}));
  for (int cpu : {64, 65}) {
    EXPECT_FALSE(std::binary_search(plan.shared_pool.begin(), plan.shared_pool.end(), cpu)) << cpu;
    EXPECT_EQ(std::count(plan.models[1].cpus.begin(), plan.models[1].cpus.end(), cpu), 0) << cpu;
  }
  check_invariants(t, quotas, plan);
  // A sibling named by another exclusive model: refused, saying why.
  const auto e = error_of(t, {explicit_cpus("a", "0"), explicit_cpus("b", "64")});
  EXPECT_EQ(e.model(), "b");
  EXPECT_EQ(e.field(), "cpus");
  EXPECT_NE(std::string(e.what()).find("CPUs 64 already belong to exclusive model 'a' (SMT siblings of its CPUs, "
                                       "held idle since it has smt=False)"), std::string::npos) << e.what();
  // With smt, the listed CPUs alone are the model's; the sibling stays free for others.
  Quota a = explicit_cpus("a", "0");
  a.smt = true;
  Quota b = explicit_cpus("b", "64");
  b.smt = true;
  const Plan both = plan_placement(t, {a, b});
  EXPECT_TRUE(both.models[0].reserved.empty());
  EXPECT_EQ(both.models[1].cpus, CpuList{64});
}

TEST(PlacementErrors, OverlappingExplicitListsBetweenExclusiveModels) {
  const Topology& t = fixture("server_2s128t");
  const auto e = error_of(t, {explicit_cpus("a", "0-3"), explicit_cpus("b", "3-5")});
  EXPECT_EQ(e.model(), "b");  // explicit lists are placed by name
  EXPECT_EQ(e.field(), "cpus");
  EXPECT_EQ(e.kind(), PlacementErrorKind::capacity);
  EXPECT_NE(std::string(e.what()).find("CPUs 3 already belong to exclusive model 'a'"), std::string::npos) << e.what();
  // A shared model may not name an exclusive model's CPU either.
  const auto s = error_of(t, {explicit_cpus("a", "0-3"), explicit_cpus("s", "2", false)});
  EXPECT_EQ(s.model(), "s");
}

TEST(PlacementErrors, ExclusiveModelsThatDoNotFitTogetherSayWhatIsLeft) {
  const Topology& t = fixture("server_2s128t");
  const auto e = error_of(t, {exclusive("a", 40), exclusive("b", 30)});
  EXPECT_EQ(e.model(), "b");
  EXPECT_EQ(e.field(), "cores");
  EXPECT_EQ(e.kind(), PlacementErrorKind::capacity);
  EXPECT_NE(std::string(e.what()).find("24 free cores"), std::string::npos) << e.what();
}

TEST(PlacementErrors, SharedModelWithNothingLeft) {
  const Topology& t = fixture("vm2");
  const auto e = error_of(t, {exclusive("a", 2), shared("s")});
  EXPECT_EQ(e.model(), "s");
  EXPECT_EQ(e.field(), "isolation");
  EXPECT_NE(std::string(e.what()).find("shared pool is empty"), std::string::npos) << e.what();
  EXPECT_EQ(error_of(t, {exclusive("a", 1), shared("s", 2)}).field(), "cores");
}

TEST(PlacementErrors, DuplicateNames) {
  const auto e = error_of(fixture("vm2"), {shared("m"), shared("m")});
  EXPECT_EQ(e.field(), "name");
}

// --- determinism and invariants under random quotas ------------------------------------------------

TEST(PlacementProperties, RandomQuotasKeepInvariantsAndIgnoreInputOrder) {
  std::mt19937 rng(12345);
  for (const char* name : {"vm2", "server_2s128t", "hybrid_8p16e", "container_scattered", "offline_cpu",
                           "arm_big_little"}) {
    const Topology& t = fixture(name);
    const int ncores = static_cast<int>(std::count_if(t.cores.begin(), t.cores.end(),
                                                      [](const auto& c) { return !c.usable.empty(); }));
    int placed = 0;
    for (int round = 0; round < 200; ++round) {
      std::vector<Quota> quotas;
      const int n = std::uniform_int_distribution<int>(1, 6)(rng);
      for (int i = 0; i < n; ++i) {
        const bool excl = std::uniform_int_distribution<int>(0, 3)(rng) != 0;
        Quota q = excl ? exclusive("m" + std::to_string(i), std::uniform_int_distribution<int>(1, std::max(1, ncores / 2))(rng))
                       : shared("m" + std::to_string(i));
        q.smt = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
        q.instances = std::uniform_int_distribution<int>(1, 2)(rng);
        quotas.push_back(q);
      }
      Plan plan;
      try {
        plan = plan_placement(t, quotas);
      } catch (const PlacementError& e) {
        EXPECT_FALSE(e.model().empty());
        continue;
      }
      ++placed;
      check_invariants(t, quotas, plan);
      std::vector<Quota> reversed(quotas.rbegin(), quotas.rend());
      Plan again = plan_placement(t, reversed);
      std::reverse(again.models.begin(), again.models.end());
      EXPECT_TRUE(same_plan(plan, again)) << name << " round " << round;
      EXPECT_TRUE(same_plan(plan, plan_placement(t, quotas))) << name;
    }
    EXPECT_GT(placed, 20) << name << ": the generator should produce mostly feasible inputs";
  }
}

TEST(Placement, EnumWordsParseBackToTheirEnums) {
  for (auto e : apportion::kIsolations) EXPECT_EQ(apportion::parse_isolation(apportion::to_string(e)), e);
  for (auto e : apportion::kMemoryPolicies) {
    EXPECT_EQ(apportion::parse_memory_policy(apportion::to_string(e)), e);
  }
  EXPECT_EQ(apportion::parse_isolation("exclusive"), Isolation::exclusive);
  EXPECT_EQ(apportion::parse_memory_policy("prefer"), MemoryPolicy::prefer);
  EXPECT_FALSE(apportion::parse_isolation("process").has_value());
  EXPECT_FALSE(apportion::parse_memory_policy("Bind").has_value());
  EXPECT_FALSE(apportion::parse_memory_policy("").has_value());
}

}  // namespace
