// A model's lanes: one bounded MPMC lane per priority level (0 is served first) per lane group
// (one group per NUMA node the model's instances span), plus, with on_timeout=delay, one
// delayed lane shared by all groups and served last. With each group's lanes goes the event
// count its idle workers park on.
//
// A worker serves its own group first and steals from the others only when its own lanes are
// empty; a push wakes a parked worker of its own group first, and one of another group (which
// then steals it) only when none of its own is parked.
//
// The lane set bounds nothing: every lane can hold `capacity` requests, and the owner's
// admission bound over all lanes together keeps a push from ever finding its lane full.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "apportion/event_count.hpp"
#include "apportion/mpmc_queue.hpp"
#include "apportion/placement.hpp"
#include "apportion/request.hpp"

namespace apportion {

class LaneSet {
 public:
  using Lane = MpmcQueue<Request*>;
  /// A group number that names no group: take from every group alike (burst workers, join).
  static constexpr uint32_t kNoGroup = UINT32_MAX;
  /// The lane index that is no lane (the delayed lane without on_timeout=delay).
  static constexpr uint32_t kNoLane = UINT32_MAX;
  /// Priority levels and groups are each bounded so that group x level lane indices, plus the
  /// delayed lane, stay below kNoLane (the Python layer allows 256 levels; a model has fewer
  /// groups than instances, and fewer instances than CPUs).
  static constexpr uint32_t kMaxLevels = 1u << 12;
  static constexpr uint32_t kMaxGroups = 1u << 16;
  static_assert(uint64_t{kMaxLevels} * kMaxGroups + 1 < kNoLane,
                "every lane index, the delayed lane's included, must differ from kNoLane");
  static_assert(kNoGroup >= kMaxGroups, "kNoGroup must name no group");

  LaneSet() = default;
  LaneSet(const LaneSet&) = delete;
  LaneSet& operator=(const LaneSet&) = delete;

  /// (Re)builds the lanes for `groups` groups of `levels` priority lanes holding `capacity`
  /// requests each, with a delayed lane of `delayed_capacity` cells (0: none). Requests already
  /// queued keep their priority and their order within it (a group that no longer exists moves
  /// to the last one); the delayed lane is kept as it is. Not thread-safe: before any worker
  /// runs and with no push in progress. Throws std::invalid_argument beyond kMaxLevels or
  /// kMaxGroups.
  void build(uint32_t groups, uint32_t levels, std::size_t capacity, std::size_t delayed_capacity);
  /// Which group a submission from each CPU goes to (kNoGroup: none, round-robin). Written only
  /// before any submission.
  void set_cpu_groups(std::vector<uint32_t> cpu_group) { cpu_group_ = std::move(cpu_group); }

  /// Pushes into `group`'s lane for `priority` (clamped into range). The caller's admission
  /// guarantees a free cell, so a refusal can only be a consumer's release of that cell not yet
  /// visible here (possible on weakly ordered CPUs): it resolves within moments. Safe from any
  /// thread.
  void push(uint32_t group, uint32_t priority, Request* r) noexcept {
    const uint32_t p = priority < levels_ ? priority : levels_ - 1;
    Lane& lane = *lanes_[group * levels_ + p];
    while (!lane.try_push(r)) cpu_relax();
  }
  /// Pushes into the delayed lane (see push() for why it cannot stay refused). Safe from any
  /// thread; only with a delayed lane.
  void push_delayed(Request* r) noexcept {
    while (!lanes_[delayed_]->try_push(r)) cpu_relax();
  }
  /// Takes from `group`'s lanes (highest priority first), then, when `steal`, from the other
  /// groups' (highest priority first, victims in turn from the next group on), then from the
  /// delayed lane; `lane` receives the index taken from. kNoGroup: every group alike. Counts
  /// what a group's worker takes from another group in stolen(). Safe from any thread.
  bool try_take(uint32_t group, Request*& r, uint32_t& lane, bool steal = true) noexcept;

  /// The group a submission from this thread goes to: the group of the CPU it runs on, else
  /// the next group round-robin (per thread, so submitters share no counter). Safe from any
  /// thread.
  uint32_t route() const noexcept;

  /// The event count `group`'s idle workers park on (group 0's for kNoGroup).
  EventCount& idle(uint32_t group) noexcept {
    return group == 0 || group >= groups_ ? idle0_ : more_idle_[group - 1];
  }
  /// Wakes up to `n` sleepers, `group`'s first (a request pushed there is best served on its
  /// own node), the other groups' only for what that group cannot take: together that is as
  /// many wake-ups as one event count would issue. The event count's handshake holds for each
  /// group's count on its own (every count is looked at, seq_cst, after the push, unless `n`
  /// wake-ups were issued already). Safe from any thread.
  void wake(std::size_t n, uint32_t group) noexcept {
    wake(n, group, [n] { return n; });
  }
  /// wake(n, group), waking no more sleepers than `left()` (see EventCount::notify) says
  /// requests are still queued.
  template <class Left>
  void wake(std::size_t n, uint32_t group, Left&& left) noexcept {
    if (groups_ == 1) {
      idle0_.notify(n, left);
      return;
    }
    const uint32_t first = group < groups_ ? group : 0;
    for (uint32_t k = 0; k < groups_ && n != 0; ++k) n -= idle((first + k) % groups_).notify(n, left);
  }
  /// Wakes every parked worker of every group (shutdown).
  void wake_all() noexcept {
    for (uint32_t g = 0; g < groups_; ++g) idle(g).notify_all();
  }

  uint32_t groups() const noexcept { return groups_; }
  uint32_t levels() const noexcept { return levels_; }
  /// Number of lanes: levels x groups, plus the delayed lane if any.
  std::size_t size() const noexcept { return lanes_.size(); }
  uint32_t delayed_lane() const noexcept { return delayed_; }
  bool has_delayed() const noexcept { return delayed_ != kNoLane; }
  /// Cells of the delayed lane (0 without one).
  std::size_t delayed_capacity() const noexcept {
    return delayed_ == kNoLane ? 0 : lanes_[delayed_]->capacity();
  }
  /// Cells of every lane together (each one cache line). Not while the lanes are rebuilt.
  std::size_t cells() const noexcept {
    std::size_t n = 0;
    for (const auto& lane : lanes_) n += lane->capacity();
    return n;
  }
  /// Requests a group's worker took from another group's lanes.
  uint64_t stolen() const noexcept { return stolen_.load(std::memory_order_relaxed); }

 private:
  // Read by every submitter and worker per request, written only by build(): apart from the
  // lines the workers write when they park (the event counts) and steal.
  std::vector<std::unique_ptr<Lane>> lanes_;  // group g's priority p at g * levels_ + p
  uint32_t delayed_ = kNoLane;
  uint32_t groups_ = 1;
  uint32_t levels_ = 1;
  // CPU number -> the group of the own instance pinned there (kNoGroup: none).
  std::vector<uint32_t> cpu_group_;
  // Group 0's (or the only) event count is inline; groups 1 .. groups_ - 1 fixed by build().
  EventCount idle0_;
  std::unique_ptr<EventCount[]> more_idle_;
  alignas(kCacheLine) std::atomic<uint64_t> stolen_{0};
};

}  // namespace apportion
