// Byte counts for messages people read ("4.0 GiB"), shared by the plan and device descriptions.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace apportion::gpu {

/// Binary units with one decimal; exact byte counts below 1 KiB.
inline std::string format_bytes(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes) / 1024.0;
  int unit = 0;
  while (v >= 1024.0 && unit < 3) {
    v /= 1024.0;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[unit]);
  return buf;
}

}  // namespace apportion::gpu
