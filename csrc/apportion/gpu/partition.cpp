#include "apportion/gpu/partition.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <utility>

#include "apportion/gpu/format.hpp"

namespace apportion::gpu {

namespace {

std::string quoted(const std::string& s) { return "'" + s + "'"; }

std::string share_text(double share) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", share);
  return buf;
}

void validate(const GpuQuota& q, std::set<std::string>& seen) {
  auto bad = [&](const char* field, const std::string& why) {
    const char* sep = why.starts_with("=") ? "" : " ";
    throw GpuQuotaError(q.model, field,
                        "model " + quoted(q.model) + ": gpu." + field + sep + why);
  };
  if (q.model.empty()) throw GpuQuotaError(q.model, "model", "GPU quota without a model name");
  if (!seen.insert(q.model).second) bad("model", "appears twice; each model has one GPU quota");
  if (q.device < 0) bad("device", "=" + std::to_string(q.device) + " must be >= 0");
  if (q.streams < 1 || q.streams > kMaxStreams) {
    bad("streams", "=" + std::to_string(q.streams) + " must be in 1.." +
                       std::to_string(kMaxStreams));
  }
  // NaN fails both comparisons, so it is caught as out of range.
  if (q.sm_share != 0.0 && !(q.sm_share > 0.0 && q.sm_share <= 1.0)) {
    bad("sm_share", "=" + share_text(q.sm_share) + " must be in (0, 1]");
  }
  if (q.sm_count < 0) bad("sm_count", "=" + std::to_string(q.sm_count) + " must be >= 1");
  if (q.sm_share != 0.0 && q.sm_count != 0) {
    bad("sm_share", "and gpu.sm_count are both set; give one");
  }
}

int resolve_priority(const GpuPriority& p, const DeviceInfo& d, bool& clamped) {
  const int least = std::max(d.priority_least, d.priority_greatest);
  const int greatest = std::min(d.priority_least, d.priority_greatest);
  clamped = false;
  switch (p.cls) {
    case PriorityClass::high: return greatest;
    case PriorityClass::low: return least;
    case PriorityClass::normal: return least + (greatest - least) / 2;
    case PriorityClass::value: break;
  }
  const int v = std::clamp(p.value, greatest, least);
  clamped = v != p.value;
  return v;
}

std::string unit_list(const std::vector<int>& units) {
  if (units.empty()) return "";
  std::string s;
  std::size_t i = 0;
  while (i < units.size()) {
    std::size_t j = i;
    while (j + 1 < units.size() && units[j + 1] == units[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(units[i]);
    if (j > i) s += "-" + std::to_string(units[j]);
    i = j + 1;
  }
  return s;
}

std::string pad(std::string s, std::size_t width) {
  s.append(s.size() < width ? width - s.size() : 1, ' ');
  return s;
}

}  // namespace

std::string GpuPriority::to_string() const {
  switch (cls) {
    case PriorityClass::high: return "high";
    case PriorityClass::normal: return "normal";
    case PriorityClass::low: return "low";
    case PriorityClass::value: break;
  }
  return std::to_string(value);
}

const ModelGpuPlan* GpuPlan::find(std::string_view model) const noexcept {
  for (const auto& m : models) {
    if (m.model == model) return &m;
  }
  return nullptr;
}

const DeviceGpuPlan* GpuPlan::device(int ordinal) const noexcept {
  for (const auto& d : devices) {
    if (d.info.ordinal == ordinal) return &d;
  }
  return nullptr;
}

GpuPlan plan_gpus(std::span<const GpuQuota> quotas, std::span<const DeviceInfo> devices) {
  std::set<std::string> seen;
  for (const auto& q : quotas) validate(q, seen);

  GpuPlan plan;
  for (const auto& info : devices) {
    DeviceGpuPlan d;
    d.info = info;
    d.granularity = info.sm_granularity();
    d.units = info.sm_units();
    d.sm_unassigned = info.sm_count;
    d.memory_capacity = info.free_memory > 0 ? info.free_memory : info.total_memory;
    plan.devices.push_back(std::move(d));
  }
  auto device_of = [&](const GpuQuota& q) -> DeviceGpuPlan& {
    for (auto& d : plan.devices) {
      if (d.info.ordinal == q.device) return d;
    }
    std::string have = "no GPU is present";
    if (!plan.devices.empty()) {
      have = "the devices are";
      for (const auto& d : plan.devices) have += " " + std::to_string(d.info.ordinal);
    }
    throw GpuPlacementError(q.model, "model " + quoted(q.model) + " asks for GPU " +
                                         std::to_string(q.device) + " but " + have);
  };

  auto index_of = [&](int ordinal) {
    return static_cast<std::size_t>(plan.device(ordinal) - plan.devices.data());
  };

  // Per device: who holds each unit (first exclusive owner), in plan.models order.
  std::vector<std::vector<std::string>> owners(plan.devices.size());
  for (std::size_t i = 0; i < plan.devices.size(); ++i) {
    owners[i].assign(static_cast<std::size_t>(plan.devices[i].units), std::string());
  }

  plan.models.reserve(quotas.size());
  for (const auto& q : quotas) {
    DeviceGpuPlan& d = device_of(q);
    ModelGpuPlan m;
    m.model = q.model;
    m.device = q.device;
    m.streams = q.streams;
    m.priority_asked = q.priority.to_string();
    m.priority = resolve_priority(q.priority, d.info, m.priority_clamped);
    m.memory = q.memory;
    m.allow_overlap = q.allow_overlap;
    m.strict = q.strict;
    if (m.priority_clamped) {
      plan.notes.push_back("model " + quoted(q.model) + ": priority " + m.priority_asked +
                           " is outside device " + std::to_string(q.device) + "'s range [" +
                           std::to_string(d.info.priority_least) + ", " +
                           std::to_string(d.info.priority_greatest) + "]; clamped to " +
                           std::to_string(m.priority));
    }
    if (q.sm_count > 0) {
      m.sm_asked = q.sm_count;
    } else if (q.sm_share > 0.0) {
      // The epsilon keeps shares such as 0.25 of 132 (33.0000001 after rounding error) at 33.
      m.sm_asked = static_cast<int>(std::ceil(q.sm_share * d.info.sm_count - 1e-9));
      m.sm_asked = std::max(m.sm_asked, 1);
    }
    if (m.sm_asked > d.info.sm_count) {
      throw GpuPlacementError(q.model, "model " + quoted(q.model) + " asks for " +
                                           std::to_string(m.sm_asked) + " SMs on device " +
                                           std::to_string(q.device) + " (" + d.info.name +
                                           "), which has " +
                                           std::to_string(d.info.sm_count));
    }
    plan.models.push_back(std::move(m));
  }

  // Memory: non-overlapping budgets must fit together; an overlapping one only on its own.
  for (const auto& m : plan.models) {
    if (m.memory == 0) continue;
    DeviceGpuPlan& d = plan.devices[index_of(m.device)];
    const std::uint64_t left = d.memory_capacity - d.memory_assigned;
    const std::uint64_t need = m.memory;
    if (need > (m.allow_overlap ? d.memory_capacity : left)) {
      std::string holders;
      for (const auto& o : plan.models) {
        if (&o == &m) break;
        if (o.device == m.device && o.memory > 0 && !o.allow_overlap) {
          holders += (holders.empty() ? "" : ", ") + o.model + " " + format_bytes(o.memory);
        }
      }
      throw GpuPlacementError(
          m.model, "model " + quoted(m.model) + " asks for " + format_bytes(need) +
                       " of GPU memory on device " + std::to_string(m.device) + " but only " +
                       format_bytes(m.allow_overlap ? d.memory_capacity : left) + " is left of " +
                       format_bytes(d.memory_capacity) +
                       (holders.empty() ? std::string() : " (held: " + holders + ")") +
                       "; lower gpu.memory or set allow_overlap=True");
    }
    if (!m.allow_overlap) d.memory_assigned += need;
  }

  // SM groups: exclusive ones first (quota order), overlapping ones after, so an overlapping
  // model never takes a unit an exclusive one needed.
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& m : plan.models) {
      if (m.sm_asked == 0 || m.allow_overlap != (pass == 1)) continue;
      const std::size_t di = index_of(m.device);
      DeviceGpuPlan& d = plan.devices[di];
      const std::string who = "model " + quoted(m.model);
      if (!d.info.green_contexts) {
        if (m.strict) {
          throw GpuPlacementError(
              m.model, who + " needs an SM group of " + std::to_string(m.sm_asked) +
                           " SMs (strict=True) but device " + std::to_string(m.device) + " (" +
                           d.info.name + ", driver " +
                           format_driver_version(d.info.driver_version) +
                           ") cannot build green contexts (CUDA 12.4+ needed)");
        }
        plan.notes.push_back(who + ": device " + std::to_string(m.device) +
                             " has no green contexts (driver " +
                             format_driver_version(d.info.driver_version) +
                             "); it gets priority-only streams on the whole GPU");
        continue;
      }
      const int g = d.granularity;
      int units = (m.sm_asked + g - 1) / g;
      if (units > d.units) {
        if (m.strict) {
          throw GpuPlacementError(
              m.model, who + " asks for " + std::to_string(m.sm_asked) + " SMs (strict=True) but " +
                           "the largest SM group device " + std::to_string(m.device) +
                           " can build is " + std::to_string(d.units * g) + " SMs");
        }
        units = d.units;
      }
      auto& own = owners[di];
      std::vector<int> picked;
      for (int u = 0; u < d.units && static_cast<int>(picked.size()) < units; ++u) {
        if (own[static_cast<std::size_t>(u)].empty()) picked.push_back(u);
      }
      if (static_cast<int>(picked.size()) < units) {
        if (!m.allow_overlap) {
          std::string holders;
          for (const auto& o : plan.models) {
            if (o.device == m.device && o.sm_count > 0 && !o.allow_overlap) {
              holders += (holders.empty() ? "" : ", ") + o.model + " " +
                         std::to_string(o.sm_count);
            }
          }
          throw GpuPlacementError(
              m.model, who + " asks for " + std::to_string(m.sm_asked) + " SMs (" +
                           std::to_string(units * g) + " in units of " + std::to_string(g) +
                           ") on device " + std::to_string(m.device) + " but only " +
                           std::to_string(static_cast<int>(picked.size()) * g) + " of " +
                           std::to_string(d.units * g) + " groupable SMs are left (held: " +
                           holders + "); lower gpu.sm_share/sm_count or set allow_overlap=True");
        }
        // Overlap: top up from units already held, lowest first.
        for (int u = 0; u < d.units && static_cast<int>(picked.size()) < units; ++u) {
          if (!own[static_cast<std::size_t>(u)].empty()) {
            picked.push_back(u);
            m.sm_overlaps = true;
          }
        }
        std::sort(picked.begin(), picked.end());
      }
      for (int u : picked) {
        auto& o = own[static_cast<std::size_t>(u)];
        if (o.empty()) {
          o = m.model;
          // An overlapping model's spare units still count as grouped: nobody else gets them.
          d.sm_grouped += g;
        }
      }
      m.sm_units = std::move(picked);
      m.sm_count = units * g;
      m.sm_rounded = m.sm_count != m.sm_asked;
      if (m.sm_rounded) {
        plan.notes.push_back(who + ": asked for " + std::to_string(m.sm_asked) + " SMs, gets " +
                             std::to_string(m.sm_count) + " (device " + std::to_string(m.device) +
                             " groups SMs in units of " + std::to_string(g) + ")");
      }
      if (m.sm_overlaps) {
        plan.notes.push_back(who + ": its SM group overlaps other models' (allow_overlap=True)");
      }
    }
  }

  for (auto& d : plan.devices) {
    d.sm_unassigned = d.info.sm_count - d.sm_grouped;
    bool grouped = false;
    for (const auto& m : plan.models) grouped |= (m.device == d.info.ordinal && m.sm_count > 0);
    if (grouped && d.sm_unassigned > 0) {
      const int outside = d.info.sm_count - d.units * d.granularity;
      plan.notes.push_back(
          "device " + std::to_string(d.info.ordinal) + ": " + std::to_string(d.sm_unassigned) +
          " of " + std::to_string(d.info.sm_count) + " SMs are in no group (" +
          std::to_string(d.sm_unassigned - outside) + " in spare units, " +
          std::to_string(outside) +
          " outside any unit); models without an SM group run on every SM");
    }
  }
  return plan;
}

std::string GpuPlan::to_string() const {
  std::string s = "GPU plan\n";
  for (const auto& d : devices) {
    s += "device " + std::to_string(d.info.ordinal) + ": " + d.info.name + ", " +
         std::to_string(d.info.sm_count) + " SMs";
    if (d.info.green_contexts) {
      s += " (" + std::to_string(d.units) + " units of " + std::to_string(d.granularity) + ")";
    } else {
      s += " (no green contexts)";
    }
    s += ", priorities [" + std::to_string(d.info.priority_least) + ", " +
         std::to_string(d.info.priority_greatest) + "], memory " +
         format_bytes(d.memory_capacity) + "\n";
    bool any = false;
    for (const auto& m : models) {
      if (m.device != d.info.ordinal) continue;
      if (!any) {
        s += "  " + pad("model", 16) + pad("streams", 9) + pad("priority", 16) +
             pad("SMs", 22) + "memory\n";
        any = true;
      }
      std::string prio = std::to_string(m.priority) + " (" + m.priority_asked +
                         (m.priority_clamped ? ", clamped" : "") + ")";
      std::string sms = "all (shared)";
      if (m.sm_count > 0) {
        sms = std::to_string(m.sm_count) + " [units " + unit_list(m.sm_units) + "]";
        if (m.sm_overlaps) sms += " overlap";
      } else if (m.sm_asked > 0) {
        sms = "all (asked " + std::to_string(m.sm_asked) + ")";
      }
      s += "  " + pad(m.model, 16) + pad(std::to_string(m.streams), 9) + pad(prio, 16) +
           pad(sms, 22) + (m.memory ? format_bytes(m.memory) : std::string("no budget")) +
           (m.memory && m.allow_overlap ? " (overlap)" : "") + "\n";
    }
    if (any) {
      s += "  in no group: " + std::to_string(d.sm_unassigned) + " SMs; memory left: " +
           format_bytes(d.memory_capacity - d.memory_assigned) + "\n";
    }
  }
  if (!notes.empty()) {
    s += "notes:\n";
    for (const auto& n : notes) s += "  - " + n + "\n";
  }
  return s;
}

}  // namespace apportion::gpu
