#include "apportion/lanes.hpp"

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace apportion {

void LaneSet::build(uint32_t groups, uint32_t levels, std::size_t capacity,
                    std::size_t delayed_capacity) {
  if (levels == 0 || levels > kMaxLevels) {
    throw std::invalid_argument("priority_levels " + std::to_string(levels) +
                                " is out of range (1 .. " + std::to_string(kMaxLevels) + ")");
  }
  if (groups == 0 || groups > kMaxGroups) {
    throw std::invalid_argument("lane groups " + std::to_string(groups) + " is out of range (1 .. " +
                                std::to_string(kMaxGroups) + ")");
  }
  std::vector<std::unique_ptr<Lane>> lanes;
  for (uint32_t i = 0; i < groups * levels; ++i) lanes.push_back(std::make_unique<Lane>(capacity));
  if (!lanes_.empty()) {
    // Regrouped with requests already queued: they keep their priority and their order within
    // it; each new lane has room for all of them (the owner's admission bounds them together).
    for (uint32_t i = 0; i < groups_ * levels_; ++i) {
      const uint32_t p = std::min(i % levels_, levels - 1);
      const uint32_t to = std::min(i / levels_, groups - 1) * levels + p;
      Request* r = nullptr;
      while (lanes_[i]->try_pop(r)) {
        if (!lanes[to]->try_push(r)) std::abort();  // single-threaded here: cannot be full
      }
    }
  }
  if (delayed_capacity != 0) {
    if (delayed_ != kNoLane) {
      lanes.push_back(std::move(lanes_[delayed_]));
    } else {
      lanes.push_back(std::make_unique<Lane>(delayed_capacity));
    }
    delayed_ = groups * levels;
  } else {
    delayed_ = kNoLane;
  }
  lanes_ = std::move(lanes);
  // No worker runs yet, so none is parked on a count being replaced.
  more_idle_ = groups > 1 ? std::make_unique<EventCount[]>(groups - 1) : nullptr;
  groups_ = groups;
  levels_ = levels;
}

bool LaneSet::try_take(uint32_t group, Request*& r, uint32_t& lane, bool steal) noexcept {
  const auto pop = [&](uint32_t i) {
    if (!lanes_[i]->try_pop(r)) return false;
    lane = i;
    return true;
  };
  if (groups_ == 1) {  // no groups: every worker serves every lane in order, delayed last
    const auto n = static_cast<uint32_t>(lanes_.size());
    for (uint32_t i = 0; i < n; ++i) {
      if (pop(i)) return true;
    }
    return false;
  }
  const uint32_t levels = levels_;
  const bool own = group < groups_;
  if (own) {
    for (uint32_t p = 0; p < levels; ++p) {
      if (pop(group * levels + p)) return true;
    }
  }
  if (steal || !own) {
    // Victims in turn from the next group on, so that stealers from different groups do not
    // all pile onto group 0.
    const uint32_t first = own ? group + 1 : 0;
    for (uint32_t p = 0; p < levels; ++p) {
      for (uint32_t k = 0; k < groups_; ++k) {
        const uint32_t g = (first + k) % groups_;
        if (g == group) continue;
        if (pop(g * levels + p)) {
          if (own) stolen_.fetch_add(1, std::memory_order_relaxed);
          return true;
        }
      }
    }
  }
  return delayed_ != kNoLane && pop(delayed_);
}

uint32_t LaneSet::route() const noexcept {
#if defined(__linux__)
  const int cpu = sched_getcpu();
  if (cpu >= 0 && static_cast<std::size_t>(cpu) < cpu_group_.size() &&
      cpu_group_[static_cast<std::size_t>(cpu)] < groups_) {
    return cpu_group_[static_cast<std::size_t>(cpu)];
  }
#endif
  // Off every instance's CPUs: spread evenly. Per thread, so submitters share no counter.
  thread_local uint32_t next = 0;
  return next++ % groups_;
}

}  // namespace apportion
