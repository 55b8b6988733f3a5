// Python skin of topology (sysfs reader) and affinity (pinning syscalls). Nothing here blocks,
// so the GIL is held throughout; every call is microseconds to a few milliseconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "apportion/affinity.hpp"
#include "apportion/topology.hpp"
#include "bindings/enums.hpp"
#include "bindings/register.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

MemoryPolicy policy_from(const std::string& word) {
  return enum_or_raise(parse_memory_policy(word), word, "policy", kMemoryPolicies);
}

[[noreturn]] void raise_os_error(const std::string& message) {
  PyErr_SetString(PyExc_OSError, message.c_str());
  throw py::error_already_set();
}

}  // namespace

void register_topology(py::module_& m) {
  m.def(
      "parse_cpulist",
      [](const std::string& text) {
        try {
          return parse_cpulist(text);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("text"),
      "Parse a kernel cpulist such as \"0-3,8,10-11\" into a sorted list of CPU ids.\n"
      "Raises ValueError naming the bad token.");
  m.def("format_cpulist", &format_cpulist, py::arg("cpus"),
        "Format CPU ids the way the kernel does (\"0-3,8,10-11\").");

  bind_enum(m, "CoreKind", kCoreKinds, "What kind of core a hybrid part puts a CPU on (unknown: homogeneous).");
  bind_enum(m, "MemoryPolicy", kMemoryPolicies,
            "A thread's NUMA memory policy: bind (only its nodes), prefer (its first node first), none.");

  py::class_<Cpu>(m, "Cpu", "One logical CPU (hardware thread). Offline CPUs have core, package and l3 -1.")
      .def_readonly("id", &Cpu::id)
      .def_readonly("core", &Cpu::core, "Index into Topology.cores; -1 when offline.")
      .def_readonly("package", &Cpu::package, "physical_package_id.")
      .def_readonly("node", &Cpu::node, "NUMA node id.")
      .def_readonly("l3", &Cpu::l3, "Index into Topology.l3_domains; -1 when offline.")
      .def_readonly("kind", &Cpu::kind)
      .def_readonly("online", &Cpu::online)
      .def_readonly("allowed", &Cpu::allowed, "In the process's allowed set.");
  py::class_<Core>(m, "Core", "One physical core: its online SMT siblings, and those this process may use.")
      .def_readonly("index", &Core::index, "Position in Topology.cores.")
      .def_readonly("package", &Core::package)
      .def_readonly("die", &Core::die)
      .def_readonly("core_id", &Core::core_id, "The kernel's core_id (unique only within a package/die).")
      .def_readonly("node", &Core::node)
      .def_readonly("l3", &Core::l3)
      .def_readonly("kind", &Core::kind)
      .def_readonly("cpus", &Core::cpus, "Online siblings, ascending.")
      .def_readonly("usable", &Core::usable, "The siblings this process may run on.");
  py::class_<Package>(m, "Package", "One CPU package (socket).")
      .def_readonly("id", &Package::id)
      .def_readonly("cpus", &Package::cpus, "Online CPUs.");
  py::class_<NumaNode>(m, "NumaNode", "One NUMA node.")
      .def_readonly("id", &NumaNode::id)
      .def_readonly("memory_bytes", &NumaNode::memory_bytes, "MemTotal in bytes; 0 when unknown.")
      .def_readonly("cpus", &NumaNode::cpus, "Online CPUs (none for a memory-only node).");
  py::class_<L3Domain>(m, "L3Domain", "CPUs sharing one L3 cache (one per package without cache information).")
      .def_readonly("index", &L3Domain::index)
      .def_readonly("id", &L3Domain::id, "The cache's sysfs id; -1 when unknown or synthesised.")
      .def_readonly("size_bytes", &L3Domain::size_bytes, "Cache size in bytes; 0 when unknown or synthesised.")
      .def_readonly("cpus", &L3Domain::cpus);

  py::class_<Topology>(m, "Topology",
                       "A snapshot of the machine read from sysfs (immutable; safe to share between "
                       "threads). apportion.topology wraps it in dataclasses.")
      .def_readonly("root", &Topology::root, "The root the tree was read from.")
      .def_readonly("cpus", &Topology::cpus, "Every present CPU, ascending by id.")
      .def_readonly("cores", &Topology::cores)
      .def_readonly("packages", &Topology::packages)
      .def_readonly("nodes", &Topology::nodes, "By id.")
      .def_readonly("l3_domains", &Topology::l3_domains)
      .def_readonly("usable", &Topology::usable, "Online CPUs in the allowed set.")
      .def_readonly("allowed", &Topology::allowed, "The process's allowed CPU set.")
      .def_readonly("online", &Topology::online)
      .def_readonly("offline", &Topology::offline)
      .def_readonly("hybrid", &Topology::hybrid, "True when performance and efficiency cores differ.")
      .def(
          "restricted_to",
          [](const Topology& t, const CpuList& cpus) {
            try {
              return t.restricted_to(cpus);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("cpus"),
          "A copy whose allowed set is intersected with `cpus`. Raises ValueError for a CPU that is "
          "not present.");

  m.def(
      "read_topology", [](const std::string& root) { return read_topology(root); }, py::arg("root") = "/",
      "Read CPUs, cores, SMT siblings, packages, NUMA nodes, L3 domains, core kinds and the allowed\n"
      "set under `root` (\"/\" for this machine). Raises RuntimeError naming the file for a malformed tree.");

  m.def(
      "pin_current_thread",
      [](const CpuList& cpus) {
        const auto r = pin_current_thread(cpus);
        return std::make_tuple(r.ok, r.error);
      },
      py::arg("cpus"),
      "Pin the calling thread to `cpus` (pthread_setaffinity_np). Returns (ok, reason); never raises\n"
      "for an OS refusal. Threads created afterwards inherit the mask.");
  m.def(
      "set_memory_policy",
      [](const std::string& policy, const std::vector<int>& nodes) {
        const auto r = set_memory_policy(policy_from(policy), nodes);
        return std::make_tuple(r.ok, r.error);
      },
      py::arg("policy"), py::arg("nodes"),
      "Set the calling thread's NUMA policy: \"bind\", \"prefer\" (first node) or \"none\" (default).\n"
      "Returns (ok, reason); never raises for an OS refusal.");
  m.def(
      "current_thread_affinity",
      []() {
        std::string error;
        auto cpus = current_thread_affinity(&error);
        if (!cpus) raise_os_error(error);
        return *cpus;
      },
      "The calling thread's allowed CPUs. Raises OSError when the OS refuses to say.");
  m.def(
      "current_memory_policy",
      []() {
        std::string error;
        auto state = current_memory_policy(&error);
        if (!state) raise_os_error(error);
        return std::make_tuple(state->policy, state->nodes);
      },
      "The calling thread's NUMA policy as (MemoryPolicy, nodes).");
  m.def(
      "thread_affinities",
      [](int pid, const std::string& proc_root) {
        std::string error;
        auto threads = list_thread_affinities(pid, &error, proc_root);
        if (!threads) raise_os_error(error);
        std::vector<std::tuple<int, py::str, CpuList>> out;
        for (auto& t : *threads) {
          // A name is bytes, not UTF-8: a worker's is cut to 15 bytes, possibly inside a
          // character of the model's name (and any thread may name itself anything).
          // Undecodable bytes become surrogates, as worker_name() in Python decodes them.
          PyObject* raw = PyUnicode_DecodeUTF8(t.name.data(), static_cast<Py_ssize_t>(t.name.size()),
                                               "surrogateescape");
          if (raw == nullptr) throw py::error_already_set();
          out.emplace_back(t.tid, py::reinterpret_steal<py::str>(raw), std::move(t.cpus));
        }
        return out;
      },
      py::arg("pid") = 0, py::arg("proc_root") = "/proc",
      "Every thread of process `pid` (0: this one) as (tid, name, allowed CPUs), by tid.\n"
      "Raises OSError when the task directory cannot be read.");
}

}  // namespace apportion::bindings
