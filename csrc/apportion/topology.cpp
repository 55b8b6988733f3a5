#include "apportion/topology.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace apportion {
namespace fs = std::filesystem;

namespace {

constexpr long long kMaxCpuId = 65535;

std::string_view trim(std::string_view s) noexcept {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

std::optional<long long> to_integer(std::string_view s) noexcept {
  s = trim(s);
  long long value = 0;
  const auto* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, value);
  if (s.empty() || ec != std::errc{} || ptr != end) return std::nullopt;
  return value;
}

// Missing optional files are normal (older kernels, containers, fixtures that only carry what
// the reader needs), so absence is an empty optional and only unreadable content throws.
std::optional<std::string> read_optional(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("apportion topology: cannot read " + path.string());
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string read_required(const fs::path& path) {
  auto text = read_optional(path);
  if (!text) throw std::runtime_error("apportion topology: missing required file " + path.string());
  return *std::move(text);
}

// `text` for an error message: bytes outside printable ASCII as \xNN (a message must be valid
// UTF-8 to reach Python, and a NUL would cut it short), at most `limit` of them.
std::string shown(std::string_view text, std::size_t limit = 80) {
  std::string out;
  for (const char ch : text.substr(0, limit)) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out += ch;
    } else {
      char esc[5];
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      out += esc;
    }
  }
  if (text.size() > limit) out += "...";
  return out;
}

int read_int(const fs::path& path, const std::string& text) {
  auto value = to_integer(text);
  if (!value || *value < -1 || *value > 1'000'000'000)
    throw std::runtime_error("apportion topology: expected an integer in " +
                             shown(path.string(), std::string_view::npos) + ", found '" + shown(trim(text)) + "'");
  return static_cast<int>(*value);
}

CpuList read_cpulist_file(const fs::path& path, const std::string& text) {
  try {
    return parse_cpulist(text);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("apportion topology: malformed cpulist in " +
                             shown(path.string(), std::string_view::npos) + ": " + e.what());
  }
}

std::optional<CpuList> read_optional_cpulist(const fs::path& path) {
  auto text = read_optional(path);
  if (!text) return std::nullopt;
  return read_cpulist_file(path, *text);
}

// "32768K" / "1M" / "1024" as the kernel writes cache sizes.
std::optional<std::uint64_t> parse_size(std::string_view s) {
  s = trim(s);
  std::uint64_t mult = 1;
  if (!s.empty() && (s.back() == 'K' || s.back() == 'k')) mult = 1024;
  if (!s.empty() && (s.back() == 'M' || s.back() == 'm')) mult = 1024ULL * 1024;
  if (mult != 1) s.remove_suffix(1);
  auto v = to_integer(s);
  if (!v || *v < 0) return std::nullopt;
  return static_cast<std::uint64_t>(*v) * mult;
}

// "Node 0 MemTotal:  4024532 kB" (node meminfo) or "MemTotal:  4024532 kB" (proc/meminfo).
std::optional<std::uint64_t> parse_memtotal(const fs::path& path, const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const auto key = line.find("MemTotal:");
    if (key == std::string::npos) continue;
    std::istringstream rest(line.substr(key + 9));
    long long amount = -1;
    std::string unit;
    rest >> amount;
    if (rest.fail() || amount < 0 || (rest >> unit, !unit.empty() && unit != "kB"))
      throw std::runtime_error("apportion topology: malformed MemTotal line in " +
                               shown(path.string(), std::string_view::npos) + ": '" + shown(line) + "'");
    return static_cast<std::uint64_t>(amount) * (unit.empty() ? 1 : 1024);
  }
  return std::nullopt;
}

// Directory entries named <prefix><number>, ascending by number.
std::vector<std::pair<int, fs::path>> numbered_dirs(const fs::path& dir, std::string_view prefix) {
  std::vector<std::pair<int, fs::path>> found;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return found;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string_view digits = std::string_view(name).substr(prefix.size());
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    auto n = to_integer(digits);
    if (n && *n <= 1'000'000 && entry.is_directory(ec)) found.emplace_back(static_cast<int>(*n), entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

CpuList intersect(const CpuList& a, const CpuList& b) {
  CpuList out;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

CpuList difference(const CpuList& a, const CpuList& b) {
  CpuList out;
  std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

bool contains(const CpuList& list, int cpu) noexcept {
  return std::binary_search(list.begin(), list.end(), cpu);
}

// The main thread's mask rather than the caller's: a pinned worker asking for the topology must
// still see the whole process's share of the machine.
CpuList live_allowed_set() {
  for (std::size_t ncpus = 1024; ncpus <= (1u << 20); ncpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(ncpus);
    if (set == nullptr) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(ncpus);
    CPU_ZERO_S(bytes, set);
    if (sched_getaffinity(getpid(), bytes, set) == 0) {
      CpuList out;
      for (std::size_t i = 0; i < ncpus; ++i)
        if (CPU_ISSET_S(i, bytes, set)) out.push_back(static_cast<int>(i));
      CPU_FREE(set);
      return out;
    }
    const int err = errno;
    CPU_FREE(set);
    if (err != EINVAL)
      throw std::runtime_error(std::string("apportion topology: sched_getaffinity failed: ") +
                               std::strerror(err));
  }
  throw std::runtime_error("apportion topology: sched_getaffinity failed for every mask size");
}

std::optional<CpuList> status_allowed_list(const fs::path& path) {
  auto text = read_optional(path);
  if (!text) return std::nullopt;
  std::istringstream lines(*text);
  std::string line;
  while (std::getline(lines, line)) {
    constexpr std::string_view key = "Cpus_allowed_list:";
    if (line.compare(0, key.size(), key) == 0)
      return read_cpulist_file(path, line.substr(key.size()));
  }
  throw std::runtime_error("apportion topology: no Cpus_allowed_list line in " + path.string());
}

void refresh_usable(Topology& t) {
  t.usable.clear();
  for (auto& cpu : t.cpus) {
    cpu.allowed = contains(t.allowed, cpu.id);
    if (cpu.usable()) t.usable.push_back(cpu.id);
  }
  for (auto& core : t.cores) core.usable = intersect(core.cpus, t.usable);
}

}  // namespace

CpuList parse_cpulist(std::string_view text) {
  CpuList out;
  text = trim(text);
  if (text.empty()) return out;
  const auto is_digits = [](std::string_view s) {
    return !s.empty() && s.size() <= 5 &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string_view token = trim(text.substr(pos, comma - pos));
    // Only "N" and "N-M": the kernel never writes signs, strides or spaces inside a token.
    const std::size_t dash = token.find('-');
    const std::string_view lo = token.substr(0, dash);
    const std::string_view hi = dash == std::string_view::npos ? lo : token.substr(dash + 1);
    // CPU ids up to kMaxCpuId: more than any kernel numbers (a list such as "0-9999999"
    // would otherwise build ten million entries).
    if (!is_digits(lo) || !is_digits(hi) || *to_integer(hi) < *to_integer(lo) || *to_integer(hi) > kMaxCpuId)
      throw std::invalid_argument("bad cpulist token '" + shown(token) + "' in '" + shown(text) +
                                  "' (CPU ids are 0 to " + std::to_string(kMaxCpuId) + ")");
    for (long long c = *to_integer(lo), last = *to_integer(hi); c <= last; ++c)
      out.push_back(static_cast<int>(c));
    pos = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string format_cpulist(const CpuList& cpus) {
  CpuList sorted = cpus;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::string out;
  for (std::size_t i = 0; i < sorted.size();) {
    std::size_t j = i;
    while (j + 1 < sorted.size() && sorted[j + 1] == sorted[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(sorted[i]);
    if (j > i) out += '-' + std::to_string(sorted[j]);
    i = j + 1;
  }
  return out;
}

std::string_view to_string(CoreKind kind) noexcept {
  switch (kind) {
    case CoreKind::performance: return "performance";
    case CoreKind::efficiency: return "efficiency";
    case CoreKind::unknown: break;
  }
  return "unknown";
}

const Cpu* Topology::find_cpu(int id) const noexcept {
  auto it = std::lower_bound(cpus.begin(), cpus.end(), id,
                             [](const Cpu& c, int v) { return c.id < v; });
  return it != cpus.end() && it->id == id ? &*it : nullptr;
}

const NumaNode* Topology::find_node(int id) const noexcept {
  for (const auto& n : nodes)
    if (n.id == id) return &n;
  return nullptr;
}

int Topology::max_threads_per_core() const noexcept {
  std::size_t best = 0;
  for (const auto& core : cores) best = std::max(best, core.usable.size());
  return static_cast<int>(best);
}

Topology Topology::restricted_to(const CpuList& cpu_ids) const {
  CpuList wanted = cpu_ids;
  std::sort(wanted.begin(), wanted.end());
  wanted.erase(std::unique(wanted.begin(), wanted.end()), wanted.end());
  for (int id : wanted)
    if (find_cpu(id) == nullptr)
      throw std::invalid_argument("CPU " + std::to_string(id) + " is not present on this machine");
  Topology out = *this;
  out.allowed = intersect(allowed, wanted);
  refresh_usable(out);
  return out;
}

Topology read_topology(const std::string& root_text) {
  const fs::path root = root_text.empty() ? fs::path("/") : fs::path(root_text);
  const fs::path cpu_dir = root / "sys/devices/system/cpu";
  const fs::path node_dir = root / "sys/devices/system/node";
  Topology t;
  t.root = root.string();

  // --- which CPUs exist and which are online ------------------------------------------------
  CpuList present;
  if (auto listed = read_optional_cpulist(cpu_dir / "present")) {
    present = *std::move(listed);
  } else {
    for (const auto& [id, path] : numbered_dirs(cpu_dir, "cpu")) present.push_back(id);
  }
  if (present.empty())
    throw std::runtime_error("apportion topology: no CPUs found under " + cpu_dir.string());

  if (auto listed = read_optional_cpulist(cpu_dir / "online")) {
    t.online = intersect(*listed, present);
  } else {
    // cpu0 usually has no per-CPU online file because it cannot be unplugged.
    for (int id : present) {
      const fs::path file = cpu_dir / ("cpu" + std::to_string(id)) / "online";
      auto text = read_optional(file);
      if (!text || read_int(file, *text) != 0) t.online.push_back(id);
    }
  }
  t.offline = difference(present, t.online);
  if (t.online.empty())
    throw std::runtime_error("apportion topology: no online CPU in " + (cpu_dir / "online").string());

  // --- per-CPU topology, caches and capacity ------------------------------------------------
  struct Raw {
    int package = -1, die = 0, core_id = -1;
    std::string l3_key;
    int l3_id = -1;
    std::uint64_t l3_size = 0;
    std::optional<long long> capacity;
  };
  std::map<int, Raw> raw;
  for (int id : t.online) {
    const fs::path dir = cpu_dir / ("cpu" + std::to_string(id));
    Raw r;
    const fs::path pkg = dir / "topology/physical_package_id";
    r.package = read_int(pkg, read_required(pkg));
    const fs::path core = dir / "topology/core_id";
    r.core_id = read_int(core, read_required(core));
    const fs::path die = dir / "topology/die_id";
    if (auto text = read_optional(die)) r.die = read_int(die, *text);

    for (const auto& [index, cache] : numbered_dirs(dir / "cache", "index")) {
      const fs::path level_file = cache / "level";
      auto level = read_optional(level_file);
      if (!level || read_int(level_file, *level) != 3) continue;
      auto type = read_optional(cache / "type");
      if (type && trim(*type) == "Instruction") continue;
      const fs::path shared = cache / "shared_cpu_list";
      CpuList sharing = read_cpulist_file(shared, read_required(shared));
      r.l3_key = "l3:" + format_cpulist(intersect(sharing, t.online));
      const fs::path id_file = cache / "id";
      if (auto text = read_optional(id_file)) r.l3_id = read_int(id_file, *text);
      if (auto text = read_optional(cache / "size")) {
        auto size = parse_size(*text);
        if (!size)
          throw std::runtime_error("apportion topology: malformed cache size in " +
                                   (cache / "size").string());
        r.l3_size = *size;
      }
      break;
    }
    if (r.l3_key.empty()) r.l3_key = "package:" + std::to_string(r.package);

    const fs::path cap = dir / "cpu_capacity";
    if (auto text = read_optional(cap)) r.capacity = read_int(cap, *text);
    raw.emplace(id, std::move(r));
  }

  // --- NUMA nodes ---------------------------------------------------------------------------
  std::map<int, int> node_of;
  const auto node_dirs = numbered_dirs(node_dir, "node");
  if (node_dirs.empty()) {
    NumaNode n;
    n.id = 0;
    n.cpus = t.online;
    const fs::path meminfo = root / "proc/meminfo";
    if (auto text = read_optional(meminfo)) n.memory_bytes = parse_memtotal(meminfo, *text).value_or(0);
    t.nodes.push_back(std::move(n));
    for (int id : present) node_of[id] = 0;
  } else {
    for (const auto& [id, path] : node_dirs) {
      NumaNode n;
      n.id = id;
      const fs::path list = path / "cpulist";
      const CpuList listed = read_cpulist_file(list, read_required(list));
      for (int cpu : listed) {
        if (!contains(present, cpu)) continue;
        if (!node_of.emplace(cpu, id).second)
          throw std::runtime_error("apportion topology: CPU " + std::to_string(cpu) +
                                   " is listed by two NUMA nodes (" + list.string() + ")");
      }
      n.cpus = intersect(listed, t.online);
      const fs::path meminfo = path / "meminfo";
      if (auto text = read_optional(meminfo)) n.memory_bytes = parse_memtotal(meminfo, *text).value_or(0);
      t.nodes.push_back(std::move(n));
    }
    for (int id : t.online)
      if (!node_of.count(id))
        throw std::runtime_error("apportion topology: online CPU " + std::to_string(id) +
                                 " is in no NUMA node's cpulist under " + node_dir.string());
  }

  // --- hybrid core kinds --------------------------------------------------------------------
  std::map<int, CoreKind> kind_of;
  const auto p_cpus = read_optional_cpulist(root / "sys/devices/cpu_core/cpus");
  const auto e_cpus = read_optional_cpulist(root / "sys/devices/cpu_atom/cpus");
  if (p_cpus || e_cpus) {
    for (int id : p_cpus.value_or(CpuList{})) kind_of[id] = CoreKind::performance;
    for (int id : e_cpus.value_or(CpuList{})) kind_of[id] = CoreKind::efficiency;
  } else {
    long long lo = -1, hi = -1;
    bool all_known = true;
    for (const auto& [id, r] : raw) {
      if (!r.capacity) { all_known = false; break; }
      lo = lo < 0 ? *r.capacity : std::min(lo, *r.capacity);
      hi = std::max(hi, *r.capacity);
    }
    if (all_known && lo != hi)
      for (const auto& [id, r] : raw)
        kind_of[id] = *r.capacity == hi ? CoreKind::performance : CoreKind::efficiency;
  }
  t.hybrid = false;
  {
    std::set<CoreKind> kinds;
    for (int id : t.online) kinds.insert(kind_of.count(id) ? kind_of[id] : CoreKind::unknown);
    t.hybrid = kinds.count(CoreKind::performance) && kinds.count(CoreKind::efficiency);
  }

  // --- assemble: CPUs, then cores/packages/L3 domains ordered by their lowest CPU ----------
  for (int id : present) {
    Cpu c;
    c.id = id;
    c.online = contains(t.online, id);
    auto n = node_of.find(id);
    c.node = n == node_of.end() ? -1 : n->second;
    if (c.online) {
      c.package = raw[id].package;
      auto k = kind_of.find(id);
      c.kind = k == kind_of.end() ? CoreKind::unknown : k->second;
    }
    t.cpus.push_back(c);
  }

  std::map<std::tuple<int, int, int>, int> core_index;
  std::map<std::string, int> l3_index;
  std::map<int, int> package_index;
  for (int id : t.online) {
    const Raw& r = raw[id];
    Cpu& cpu = t.cpus[static_cast<std::size_t>(std::lower_bound(present.begin(), present.end(), id) -
                                               present.begin())];
    // t.online is ascending, so the first CPU seen of a core/domain is its lowest.
    auto [ci, new_core] = core_index.emplace(std::make_tuple(r.package, r.die, r.core_id),
                                             static_cast<int>(t.cores.size()));
    if (new_core) {
      Core core;
      core.index = ci->second;
      core.package = r.package;
      core.die = r.die;
      core.core_id = r.core_id;
      core.node = cpu.node;
      core.kind = cpu.kind;
      t.cores.push_back(std::move(core));
    }
    Core& core = t.cores[static_cast<std::size_t>(ci->second)];
    if (core.node != cpu.node)
      throw std::runtime_error("apportion topology: SMT siblings of core " +
                               std::to_string(r.core_id) + " in package " +
                               std::to_string(r.package) + " sit in different NUMA nodes under " +
                               node_dir.string());
    core.cpus.push_back(id);
    cpu.core = core.index;

    auto [li, new_l3] = l3_index.emplace(r.l3_key, static_cast<int>(t.l3_domains.size()));
    if (new_l3) {
      L3Domain d;
      d.index = li->second;
      d.id = r.l3_id;
      d.size_bytes = r.l3_size;
      t.l3_domains.push_back(std::move(d));
    }
    t.l3_domains[static_cast<std::size_t>(li->second)].cpus.push_back(id);
    cpu.l3 = li->second;

    auto [pi, new_pkg] = package_index.emplace(r.package, static_cast<int>(t.packages.size()));
    if (new_pkg) t.packages.push_back(Package{r.package, {}});
    t.packages[static_cast<std::size_t>(pi->second)].cpus.push_back(id);
  }
  for (auto& core : t.cores) {
    // A core's siblings share one L3 by construction of the hardware; taking the first sibling's
    // domain keeps the core a single unit for placement even if a fake tree disagrees.
    core.l3 = t.cpus[static_cast<std::size_t>(
                         std::lower_bound(present.begin(), present.end(), core.cpus.front()) -
                         present.begin())]
                  .l3;
  }

  // --- the allowed set ----------------------------------------------------------------------
  std::error_code canon_ec;
  if (fs::weakly_canonical(root, canon_ec) == fs::path("/")) {
    t.allowed = live_allowed_set();
  } else {
    std::optional<CpuList> allowed;
    if (auto status = status_allowed_list(root / "proc/self/status")) allowed = *std::move(status);
    if (auto cg = read_optional_cpulist(root / "sys/fs/cgroup/cpuset.cpus.effective"))
      allowed = allowed ? intersect(*allowed, *cg) : *std::move(cg);
    t.allowed = allowed ? *std::move(allowed) : present;
  }
  t.allowed = intersect(t.allowed, present);
  refresh_usable(t);
  if (t.usable.empty())
    throw std::runtime_error("apportion topology: no CPU under " + root.string() +
                             " is both online and in this process's allowed set");
  return t;
}

}  // namespace apportion
