#include "apportion/affinity.hpp"

#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

namespace {

namespace fs = std::filesystem;
using apportion::CpuList;
using apportion::MemoryPolicy;

// Every pinning test runs on a fresh thread so the gtest main thread keeps its full mask.
template <class F>
auto on_fresh_thread(F&& f) {
  auto task = std::async(std::launch::async, std::forward<F>(f));
  EXPECT_EQ(task.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "pinning test hung";
  return task.get();
}

CpuList allowed_now() {
  auto cpus = apportion::current_thread_affinity();
  EXPECT_TRUE(cpus.has_value());
  return cpus.value_or(CpuList{});
}

int gettid_now() { return static_cast<int>(::syscall(SYS_gettid)); }

TEST(Affinity, PinsTheCallingThreadToEachAllowedCpuAndReadsItBack) {
  const CpuList all = allowed_now();
  ASSERT_FALSE(all.empty());
  for (int cpu : all) {
    const CpuList seen = on_fresh_thread([cpu] {
      const auto r = apportion::pin_current_thread({cpu});
      EXPECT_TRUE(r.ok) << r.error;
      EXPECT_TRUE(r.error.empty());
      return allowed_now();
    });
    EXPECT_EQ(seen, CpuList{cpu});
  }
  EXPECT_EQ(allowed_now(), all) << "pinning a worker must not change the caller";
}

TEST(Affinity, ThreadsCreatedAfterPinningInheritTheMask) {
  const CpuList all = allowed_now();
  const CpuList target{all.back()};
  const CpuList child = on_fresh_thread([&] {
    EXPECT_TRUE(apportion::pin_current_thread(target).ok);
    return on_fresh_thread([] { return allowed_now(); });
  });
  EXPECT_EQ(child, target);
}

TEST(Affinity, RefusedPinReturnsTheReasonInsteadOfThrowing) {
  const auto before = allowed_now();
  const auto r = on_fresh_thread([] { return apportion::pin_current_thread({4000}); });
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("4000"), std::string::npos) << r.error;
  EXPECT_NE(r.error.find("errno"), std::string::npos) << r.error;
  const auto empty = apportion::pin_current_thread({});
  EXPECT_FALSE(empty.ok);
  EXPECT_FALSE(apportion::pin_current_thread({-1}).ok);
  EXPECT_EQ(allowed_now(), before);
}

TEST(Affinity, MemoryPolicyBindPreferAndDefaultReadBack) {
  on_fresh_thread([] {
    auto bind = apportion::set_memory_policy(MemoryPolicy::bind, {0});
    ASSERT_TRUE(bind.ok) << bind.error;
    auto state = apportion::current_memory_policy();
    ASSERT_TRUE(state.has_value());
    EXPECT_EQ(state->policy, MemoryPolicy::bind);
    EXPECT_EQ(state->nodes, (std::vector<int>{0}));

    ASSERT_TRUE(apportion::set_memory_policy(MemoryPolicy::prefer, {0}).ok);
    state = apportion::current_memory_policy();
    ASSERT_TRUE(state.has_value());
    EXPECT_EQ(state->policy, MemoryPolicy::prefer);
    EXPECT_EQ(state->nodes, (std::vector<int>{0}));

    ASSERT_TRUE(apportion::set_memory_policy(MemoryPolicy::none, {0}).ok);
    state = apportion::current_memory_policy();
    ASSERT_TRUE(state.has_value());
    EXPECT_EQ(state->policy, MemoryPolicy::none);
    EXPECT_TRUE(state->nodes.empty());
  });
}

TEST(Affinity, MemoryPolicyOnAMissingNodeFailsWithTheReason) {
  const auto r = on_fresh_thread([] { return apportion::set_memory_policy(MemoryPolicy::bind, {1000}); });
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("set_mempolicy(bind, nodes 1000)"), std::string::npos) << r.error;
  const auto range = apportion::set_memory_policy(MemoryPolicy::bind, {5000});
  EXPECT_FALSE(range.ok);
  EXPECT_NE(range.error.find("out of range"), std::string::npos) << range.error;
}

TEST(Affinity, ApplyPlacementPinsAndBindsAndJoinsErrors) {
  const CpuList all = allowed_now();
  apportion::InstancePlacement inst;
  inst.cpus = {all.front()};
  inst.memory_nodes = {0};
  const auto [ok, cpus, policy] = on_fresh_thread([&] {
    const auto r = apportion::apply_placement(inst, MemoryPolicy::bind);
    return std::make_tuple(r.ok, allowed_now(), apportion::current_memory_policy()->policy);
  });
  EXPECT_TRUE(ok);
  EXPECT_EQ(cpus, inst.cpus);
  EXPECT_EQ(policy, MemoryPolicy::bind);

  apportion::InstancePlacement bad;
  bad.cpus = {4000};
  bad.memory_nodes = {1000};
  const auto r = on_fresh_thread([&] { return apportion::apply_placement(bad, MemoryPolicy::bind); });
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("4000"), std::string::npos) << r.error;
  EXPECT_NE(r.error.find("; set_mempolicy"), std::string::npos) << r.error;
}

TEST(Affinity, ListsThisProcessThreadsWithTheirMasks) {
  const CpuList all = allowed_now();
  std::atomic<int> tid{0};
  std::atomic<bool> release{false};
  std::thread worker([&] {
    apportion::pin_current_thread({all.back()});
    tid = gettid_now();
    while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (tid == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::string error;
  const auto threads = apportion::list_thread_affinities(0, &error);
  release = true;
  worker.join();
  ASSERT_TRUE(threads.has_value()) << error;
  ASSERT_GE(threads->size(), 2u);
  EXPECT_TRUE(std::is_sorted(threads->begin(), threads->end(),
                             [](const auto& a, const auto& b) { return a.tid < b.tid; }));
  bool saw_worker = false, saw_main = false;
  for (const auto& t : *threads) {
    if (t.tid == tid) {
      saw_worker = true;
      EXPECT_EQ(t.cpus, CpuList{all.back()});
    }
    if (t.tid == gettid_now()) {
      saw_main = true;
      EXPECT_EQ(t.cpus, all);
      EXPECT_FALSE(t.name.empty());
    }
  }
  EXPECT_TRUE(saw_worker);
  EXPECT_TRUE(saw_main);
}

TEST(Affinity, ListingReadsAFakeProcTreeAndReportsErrors) {
  const fs::path root = fs::temp_directory_path() / ("apportion_proc_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "42/task/42");
  fs::create_directories(root / "42/task/43");
  fs::create_directories(root / "42/task/notatid");
  std::ofstream(root / "42/task/42/status") << "Name:\tpython3\nCpus_allowed_list:\t0-3\n";
  std::ofstream(root / "42/task/43/status") << "Name:\tomp worker\nCpus_allowed_list:\t2\n";
  auto threads = apportion::list_thread_affinities(42, nullptr, root.string());
  ASSERT_TRUE(threads.has_value());
  ASSERT_EQ(threads->size(), 2u);
  EXPECT_EQ((*threads)[0].tid, 42);
  EXPECT_EQ((*threads)[0].cpus, (CpuList{0, 1, 2, 3}));
  EXPECT_EQ((*threads)[1].name, "omp worker");
  EXPECT_EQ((*threads)[1].cpus, CpuList{2});

  std::ofstream(root / "42/task/43/status") << "Cpus_allowed_list:\tgarbage\n";
  std::string error;
  EXPECT_FALSE(apportion::list_thread_affinities(42, &error, root.string()).has_value());
  EXPECT_NE(error.find("43/status"), std::string::npos) << error;
  EXPECT_FALSE(apportion::list_thread_affinities(7, &error, root.string()).has_value());
  EXPECT_NE(error.find("cannot list"), std::string::npos) << error;
  fs::remove_all(root);
}

}  // namespace
