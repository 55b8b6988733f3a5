#include "apportion/topology.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <sched.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>

namespace {

namespace fs = std::filesystem;
using apportion::CoreKind;
using apportion::CpuList;
using apportion::format_cpulist;
using apportion::parse_cpulist;
using apportion::read_topology;
using apportion::Topology;

std::string fixture(const std::string& name) {
  return std::string(APPORTION_TEST_FIXTURES) + "/topology/" + name;
}

// A scratch tree under the build's temp dir, removed at scope exit.
class ScratchTree {
 public:
  ScratchTree() {
    root_ = fs::temp_directory_path() /
            ("apportion_topo_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(root_);
  }
  ~ScratchTree() { fs::remove_all(root_); }
  ScratchTree(const ScratchTree&) = delete;
  ScratchTree& operator=(const ScratchTree&) = delete;

  void write(const std::string& rel, const std::string& text) const {
    const fs::path p = root_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text << "\n";
  }
  // A well-formed 2-core machine without SMT, caches or nodes; tests then break one file.
  void basic(int ncpus = 2) const {
    write("sys/devices/system/cpu/present", "0-" + std::to_string(ncpus - 1));
    write("sys/devices/system/cpu/online", "0-" + std::to_string(ncpus - 1));
    for (int c = 0; c < ncpus; ++c) {
      write("sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/physical_package_id", "0");
      write("sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/core_id", std::to_string(c));
    }
  }
  std::string root() const { return root_.string(); }

 private:
  fs::path root_;
  static inline int counter_ = 0;
};

std::string error_of(const std::string& root) {
  try {
    read_topology(root);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

// --- cpulists -------------------------------------------------------------------------------

TEST(CpuList, ParsesRangesSinglesAndWhitespace) {
  EXPECT_EQ(parse_cpulist("0-3,8,10-11\n"), (CpuList{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(parse_cpulist(" 5 "), (CpuList{5}));
  EXPECT_EQ(parse_cpulist(""), CpuList{});
  EXPECT_EQ(parse_cpulist("\n"), CpuList{});
  EXPECT_EQ(parse_cpulist("3,1-2,2"), (CpuList{1, 2, 3}));  // sorted and deduplicated
  EXPECT_EQ(parse_cpulist("7-7"), (CpuList{7}));
}

TEST(CpuList, RejectsMalformedTokensNamingThem) {
  for (const char* bad : {"a", "1-", "-1", "3-1", "1,,2", "1-2-3", "+1", "1 2", "0x3", "1,", "0-3:2"}) {
    try {
      parse_cpulist(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("bad cpulist token"), std::string::npos) << bad;
    }
  }
}

TEST(CpuList, RefusesIdsBeyondAnyKernelsAndShowsOddBytesEscaped) {
  EXPECT_EQ(parse_cpulist("65535").back(), 65535);
  // Ten million ids built for minutes and gigabytes; a NUL or a non-UTF-8 byte in a message
  // cut it short or could not reach Python at all.
  for (const std::string& bad : {std::string("0-9999999"), std::string("65536"), std::string("1\xfd", 2),
                                std::string("0-1\0", 4)}) {
    try {
      parse_cpulist(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("CPU ids are 0 to 65535"), std::string::npos) << msg;
      EXPECT_TRUE(std::all_of(msg.begin(), msg.end(), [](char c) { return c >= 0x20 && c < 0x7f; })) << msg;
    }
  }
}

TEST(CpuList, FormatsLikeTheKernelAndRoundTrips) {
  EXPECT_EQ(format_cpulist({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(format_cpulist({11, 10, 3, 3}), "3,10-11");
  EXPECT_EQ(format_cpulist({}), "");
  const CpuList scattered{1, 3, 4, 9, 14, 15, 16, 64, 127};
  EXPECT_EQ(parse_cpulist(format_cpulist(scattered)), scattered);
}

// --- fixtures ---------------------------------------------------------------------------------

TEST(Topology, Vm2MatchesTheRecordedBuildMachine) {
  const Topology t = read_topology(fixture("vm2"));
  EXPECT_EQ(t.cpus.size(), 2u);
  EXPECT_EQ(t.cores.size(), 2u);
  EXPECT_EQ(t.packages.size(), 1u);
  ASSERT_EQ(t.nodes.size(), 1u);
  EXPECT_EQ(t.nodes[0].memory_bytes, 4024532ull * 1024);
  // index0-2 are L1/L2; the reader must skip to index3.
  ASSERT_EQ(t.l3_domains.size(), 1u);
  EXPECT_EQ(t.l3_domains[0].cpus, (CpuList{0, 1}));
  EXPECT_EQ(t.l3_domains[0].size_bytes, 307200ull * 1024);
  EXPECT_EQ(t.usable, (CpuList{0, 1}));
  EXPECT_TRUE(t.offline.empty());
  EXPECT_FALSE(t.hybrid);  // equal cpu_capacity is not hybrid
  EXPECT_EQ(t.max_threads_per_core(), 1);
  for (const auto& cpu : t.cpus) EXPECT_EQ(cpu.kind, CoreKind::unknown);
}

TEST(Topology, Server2s128tHasSmtPairsTwoNodesAndEightL3Domains) {
  const Topology t = read_topology(fixture("server_2s128t"));
  EXPECT_EQ(t.cpus.size(), 128u);
  EXPECT_EQ(t.usable.size(), 128u);
  ASSERT_EQ(t.cores.size(), 64u);
  EXPECT_EQ(t.packages.size(), 2u);
  ASSERT_EQ(t.nodes.size(), 2u);
  ASSERT_EQ(t.l3_domains.size(), 8u);
  EXPECT_EQ(t.max_threads_per_core(), 2);
  for (const auto& core : t.cores) {
    ASSERT_EQ(core.cpus.size(), 2u);
    EXPECT_EQ(core.cpus[1], core.cpus[0] + 64);  // Linux numbers the second threads after all firsts
    EXPECT_EQ(core.package, core.cpus[0] / 32);
    EXPECT_EQ(core.node, core.package);
    EXPECT_EQ(t.cpus[static_cast<std::size_t>(core.cpus[1])].core, core.index);
  }
  EXPECT_EQ(t.nodes[0].cpus, parse_cpulist("0-31,64-95"));
  EXPECT_EQ(t.nodes[1].cpus, parse_cpulist("32-63,96-127"));
  EXPECT_EQ(t.nodes[1].memory_bytes, 128ull << 30);
  EXPECT_EQ(t.l3_domains[0].cpus, parse_cpulist("0-7,64-71"));
  EXPECT_EQ(t.l3_domains[7].cpus, parse_cpulist("56-63,120-127"));
  EXPECT_EQ(t.l3_domains[7].id, 7);
  for (const auto& cpu : t.cpus) EXPECT_EQ(t.l3_domains[static_cast<std::size_t>(cpu.l3)].id, (cpu.id % 64) / 8);
}

TEST(Topology, HybridDesktopKnowsPerformanceAndEfficiencyCores) {
  const Topology t = read_topology(fixture("hybrid_8p16e"));
  EXPECT_TRUE(t.hybrid);
  EXPECT_EQ(t.cpus.size(), 32u);
  ASSERT_EQ(t.cores.size(), 24u);
  int p = 0, e = 0;
  for (const auto& core : t.cores) {
    if (core.kind == CoreKind::performance) {
      ++p;
      EXPECT_EQ(core.cpus.size(), 2u);
      EXPECT_LT(core.cpus[1], 16);
    } else {
      ++e;
      EXPECT_EQ(core.kind, CoreKind::efficiency);
      EXPECT_EQ(core.cpus.size(), 1u);
    }
  }
  EXPECT_EQ(p, 8);
  EXPECT_EQ(e, 16);
  EXPECT_EQ(t.cores[0].cpus, (CpuList{0, 1}));
  EXPECT_EQ(t.cores[0].core_id, 0);
  EXPECT_EQ(t.cores[1].core_id, 4);
  EXPECT_EQ(t.l3_domains.size(), 1u);
}

TEST(Topology, ArmBigLittleKindsComeFromCpuCapacity) {
  const Topology t = read_topology(fixture("arm_big_little"));
  EXPECT_TRUE(t.hybrid);
  for (const auto& cpu : t.cpus)
    EXPECT_EQ(cpu.kind, cpu.id >= 4 ? CoreKind::performance : CoreKind::efficiency) << cpu.id;
}

TEST(Topology, ContainerAllowedSetIsStatusIntersectedWithCgroup) {
  const Topology t = read_topology(fixture("container_scattered"));
  EXPECT_EQ(t.cpus.size(), 16u);
  EXPECT_EQ(t.online.size(), 16u);
  // status says 1,3-4,9,14; the cgroup adds 12; only the intersection is allowed.
  EXPECT_EQ(t.allowed, (CpuList{1, 3, 4, 9, 14}));
  EXPECT_EQ(t.usable, t.allowed);
  EXPECT_FALSE(t.find_cpu(12)->allowed);
  // Cores keep all siblings but only the allowed ones are usable: core 1 = {1, 9}.
  const auto& core1 = t.cores[static_cast<std::size_t>(t.find_cpu(1)->core)];
  EXPECT_EQ(core1.cpus, (CpuList{1, 9}));
  EXPECT_EQ(core1.usable, (CpuList{1, 9}));
  const auto& core0 = t.cores[static_cast<std::size_t>(t.find_cpu(0)->core)];
  EXPECT_TRUE(core0.usable.empty());
  EXPECT_EQ(t.cores[static_cast<std::size_t>(t.find_cpu(4)->core)].usable, (CpuList{4}));
}

TEST(Topology, MissingNodeAndCacheDirectoriesFallBack) {
  const Topology t = read_topology(fixture("container_scattered"));
  ASSERT_EQ(t.nodes.size(), 1u);
  EXPECT_EQ(t.nodes[0].id, 0);
  EXPECT_EQ(t.nodes[0].cpus.size(), 16u);
  EXPECT_EQ(t.nodes[0].memory_bytes, 32ull << 30);  // from proc/meminfo
  ASSERT_EQ(t.l3_domains.size(), 1u);               // one per package
  EXPECT_EQ(t.l3_domains[0].id, -1);
  EXPECT_EQ(t.l3_domains[0].cpus.size(), 16u);
}

TEST(Topology, OfflineCpuIsPresentButNeverUsable) {
  const Topology t = read_topology(fixture("offline_cpu"));
  EXPECT_EQ(t.cpus.size(), 8u);
  EXPECT_EQ(t.offline, (CpuList{5}));
  EXPECT_EQ(t.usable, parse_cpulist("0-4,6-7"));
  const auto* cpu5 = t.find_cpu(5);
  ASSERT_NE(cpu5, nullptr);
  EXPECT_FALSE(cpu5->online);
  EXPECT_FALSE(cpu5->usable());
  EXPECT_EQ(cpu5->core, -1);
  EXPECT_EQ(cpu5->l3, -1);
  ASSERT_EQ(t.cores.size(), 4u);
  // Core 1 lost its second thread: only CPU 1 remains.
  EXPECT_EQ(t.cores[1].cpus, (CpuList{1}));
  EXPECT_EQ(t.cores[0].cpus, (CpuList{0, 4}));
  EXPECT_EQ(t.nodes[0].cpus, parse_cpulist("0-4,6-7"));
}

TEST(Topology, ReadingIsDeterministic) {
  for (const char* name : {"vm2", "server_2s128t", "hybrid_8p16e", "container_scattered", "offline_cpu",
                           "arm_big_little"}) {
    const Topology a = read_topology(fixture(name));
    const Topology b = read_topology(fixture(name));
    ASSERT_EQ(a.cores.size(), b.cores.size()) << name;
    for (std::size_t i = 0; i < a.cores.size(); ++i) EXPECT_EQ(a.cores[i].cpus, b.cores[i].cpus) << name;
    EXPECT_EQ(a.usable, b.usable) << name;
    // Every usable CPU belongs to exactly one core, node and L3 domain.
    std::set<int> in_cores, in_l3;
    for (const auto& core : a.cores) in_cores.insert(core.cpus.begin(), core.cpus.end());
    for (const auto& d : a.l3_domains) in_l3.insert(d.cpus.begin(), d.cpus.end());
    for (int cpu : a.usable) {
      EXPECT_TRUE(in_cores.count(cpu)) << name << " cpu " << cpu;
      EXPECT_TRUE(in_l3.count(cpu)) << name << " cpu " << cpu;
      EXPECT_GE(a.find_cpu(cpu)->node, 0) << name;
    }
  }
}

TEST(Topology, RestrictedToIntersectsTheAllowedSet) {
  const Topology t = read_topology(fixture("container_scattered"));
  const Topology r = t.restricted_to({3, 4, 5, 9});
  EXPECT_EQ(r.usable, (CpuList{3, 4, 9}));  // 5 was never allowed
  EXPECT_EQ(r.cores[static_cast<std::size_t>(r.find_cpu(1)->core)].usable, CpuList{9});
  EXPECT_EQ(t.usable, (CpuList{1, 3, 4, 9, 14}));  // the original is untouched
  EXPECT_THROW(t.restricted_to({99}), std::invalid_argument);
}

TEST(Topology, LiveMachineUsesTheProcessAffinity) {
  const Topology t = read_topology("/");
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  CpuList expected;
  for (int i = 0; i < CPU_SETSIZE; ++i)
    if (CPU_ISSET(i, &set)) expected.push_back(i);
  CpuList usable_allowed;
  for (int cpu : expected)
    if (t.find_cpu(cpu) && t.find_cpu(cpu)->online) usable_allowed.push_back(cpu);
  EXPECT_EQ(t.usable, usable_allowed);
  EXPECT_FALSE(t.cores.empty());
  EXPECT_FALSE(t.nodes.empty());
}

// --- malformed trees ----------------------------------------------------------------------------

TEST(TopologyErrors, MissingCoreIdNamesTheFile) {
  ScratchTree tree;
  tree.basic();
  fs::remove(fs::path(tree.root()) / "sys/devices/system/cpu/cpu1/topology/core_id");
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("cpu1/topology/core_id"), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing"), std::string::npos) << msg;
}

TEST(TopologyErrors, NonIntegerPackageIdNamesTheFileAndValue) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/cpu/cpu0/topology/physical_package_id", "zero");
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("cpu0/topology/physical_package_id"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'zero'"), std::string::npos) << msg;
}

TEST(TopologyErrors, ANonUtf8ValueIsShownEscaped) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/cpu/cpu0/topology/core_id", std::string("0\xfd", 2));
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("cpu0/topology/core_id"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'0\\xfd'"), std::string::npos) << msg;
}

TEST(TopologyErrors, MalformedOnlineListNamesTheFile) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/cpu/online", "0-x");
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("cpu/online"), std::string::npos) << msg;
  EXPECT_NE(msg.find("malformed cpulist"), std::string::npos) << msg;
}

TEST(TopologyErrors, MalformedL3SharedListAndMissingOne) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/cpu/cpu0/cache/index3/level", "3");
  tree.write("sys/devices/system/cpu/cpu0/cache/index3/shared_cpu_list", "0;1");
  EXPECT_NE(error_of(tree.root()).find("index3/shared_cpu_list"), std::string::npos);
  fs::remove(fs::path(tree.root()) / "sys/devices/system/cpu/cpu0/cache/index3/shared_cpu_list");
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("missing required file"), std::string::npos) << msg;
}

TEST(TopologyErrors, NodeDirectoryWithoutCpulistOrWithBadMeminfo) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/node/node0/meminfo", "Node 0 MemTotal: lots kB");
  EXPECT_NE(error_of(tree.root()).find("node0/cpulist"), std::string::npos);
  tree.write("sys/devices/system/node/node0/cpulist", "0-1");
  const std::string msg = error_of(tree.root());
  EXPECT_NE(msg.find("node0/meminfo"), std::string::npos) << msg;
  EXPECT_NE(msg.find("MemTotal"), std::string::npos) << msg;
}

TEST(TopologyErrors, CpuInNoNodeOrInTwoNodes) {
  ScratchTree tree;
  tree.basic();
  tree.write("sys/devices/system/node/node0/cpulist", "0");
  EXPECT_NE(error_of(tree.root()).find("online CPU 1 is in no NUMA node"), std::string::npos);
  tree.write("sys/devices/system/node/node1/cpulist", "0-1");
  EXPECT_NE(error_of(tree.root()).find("CPU 0 is listed by two NUMA nodes"), std::string::npos);
}

TEST(TopologyErrors, EmptyTreeAndNothingUsable) {
  ScratchTree tree;
  tree.write("README", "not a sysfs tree");
  EXPECT_NE(error_of(tree.root()).find("no CPUs found"), std::string::npos);
  tree.basic();
  tree.write("proc/self/status", "Cpus_allowed_list:\t7");
  EXPECT_NE(error_of(tree.root()).find("no CPU under"), std::string::npos);
  tree.write("proc/self/status", "Name:\tx");
  EXPECT_NE(error_of(tree.root()).find("no Cpus_allowed_list line"), std::string::npos);
}

TEST(TopologyFallbacks, NoPresentFileMeansScanCpuDirectoriesAndPerCpuOnline) {
  ScratchTree tree;
  tree.basic(3);
  fs::remove(fs::path(tree.root()) / "sys/devices/system/cpu/present");
  fs::remove(fs::path(tree.root()) / "sys/devices/system/cpu/online");
  tree.write("sys/devices/system/cpu/cpu2/online", "0");
  tree.write("sys/devices/system/cpu/cpu1/online", "1");
  const Topology t = read_topology(tree.root());
  EXPECT_EQ(t.cpus.size(), 3u);
  EXPECT_EQ(t.online, (CpuList{0, 1}));  // cpu0 has no online file: always online
  EXPECT_EQ(t.offline, (CpuList{2}));
  ASSERT_EQ(t.nodes.size(), 1u);
  EXPECT_EQ(t.nodes[0].memory_bytes, 0u);  // no meminfo anywhere: unknown, not an error
}

TEST(TopologyFallbacks, CgroupAloneRestrictsTheAllowedSet) {
  ScratchTree tree;
  tree.basic(4);
  tree.write("sys/fs/cgroup/cpuset.cpus.effective", "1-2");
  EXPECT_EQ(read_topology(tree.root()).usable, (CpuList{1, 2}));
}

}  // namespace
