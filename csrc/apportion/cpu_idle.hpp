// Whether another CPU of this thread's set has been idle lately: what tells a busy host (every
// CPU taken) from a moment in which the scheduler put two threads on one CPU of an idle one.
#pragma once

namespace apportion {

/// True when a CPU of the calling thread's affinity set other than `cpu` spent time idle in the
/// last sampling interval (/proc/stat, read at most every 20 ms per thread; between reads the
/// last answer stands). True where that cannot be read, and on a thread's first call: spinning
/// stays the default until a sample says every other CPU is busy.
bool other_cpu_idle(int cpu) noexcept;

/// Tests only: replaces the probe (nullptr: the real one).
using IdleProbe = bool (*)(int cpu);
void set_idle_probe_for_tests(IdleProbe probe) noexcept;

}  // namespace apportion
