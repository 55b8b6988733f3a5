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
#include "bindings/register.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

MemoryPolicy policy_from(const std::string& word) {
  if (word == "bind") return MemoryPolicy::bind;
  if (word == "prefer") return MemoryPolicy::prefer;
  if (word == "none") return MemoryPolicy::none;
  throw py::value_error("policy must be \"bind\", \"prefer\" or \"none\", not \"" + word + "\"");
}

py::dict topology_as_dict(const Topology& t) {
  py::list cpus, cores, packages, nodes, l3;
  for (const auto& c : t.cpus) {
    py::dict d;
    d["id"] = c.id;
    d["core"] = c.core;
    d["package"] = c.package;
    d["node"] = c.node;
    d["l3"] = c.l3;
    d["kind"] = std::string(to_string(c.kind));
    d["online"] = c.online;
    d["allowed"] = c.allowed;
    cpus.append(d);
  }
  for (const auto& c : t.cores) {
    py::dict d;
    d["index"] = c.index;
    d["package"] = c.package;
    d["die"] = c.die;
    d["core_id"] = c.core_id;
    d["node"] = c.node;
    d["l3"] = c.l3;
    d["kind"] = std::string(to_string(c.kind));
    d["cpus"] = c.cpus;
    d["usable"] = c.usable;
    cores.append(d);
  }
  for (const auto& p : t.packages) {
    py::dict d;
    d["id"] = p.id;
    d["cpus"] = p.cpus;
    packages.append(d);
  }
  for (const auto& n : t.nodes) {
    py::dict d;
    d["id"] = n.id;
    d["memory_bytes"] = n.memory_bytes;
    d["cpus"] = n.cpus;
    nodes.append(d);
  }
  for (const auto& l : t.l3_domains) {
    py::dict d;
    d["index"] = l.index;
    d["id"] = l.id;
    d["size_bytes"] = l.size_bytes;
    d["cpus"] = l.cpus;
    l3.append(d);
  }
  py::dict out;
  out["root"] = t.root;
  out["cpus"] = cpus;
  out["cores"] = cores;
  out["packages"] = packages;
  out["nodes"] = nodes;
  out["l3_domains"] = l3;
  out["online"] = t.online;
  out["offline"] = t.offline;
  out["allowed"] = t.allowed;
  out["usable"] = t.usable;
  out["hybrid"] = t.hybrid;
  return out;
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

  py::class_<Topology>(m, "Topology",
                       "A snapshot of the machine read from sysfs (immutable; safe to share between "
                       "threads). apportion.topology wraps it in dataclasses.")
      .def_readonly("root", &Topology::root, "The root the tree was read from.")
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
          "not present.")
      .def("as_dict", &topology_as_dict,
           "Everything as plain lists and dicts (cpus, cores, packages, nodes, l3_domains, ...).");

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
        return std::make_tuple(std::string(to_string(state->policy)), state->nodes);
      },
      "The calling thread's NUMA policy as (\"bind\" | \"prefer\" | \"none\", nodes).");
  m.def(
      "thread_affinities",
      [](int pid, const std::string& proc_root) {
        std::string error;
        auto threads = list_thread_affinities(pid, &error, proc_root);
        if (!threads) raise_os_error(error);
        std::vector<std::tuple<int, std::string, CpuList>> out;
        for (auto& t : *threads) out.emplace_back(t.tid, std::move(t.name), std::move(t.cpus));
        return out;
      },
      py::arg("pid") = 0, py::arg("proc_root") = "/proc",
      "Every thread of process `pid` (0: this one) as (tid, name, allowed CPUs), by tid.\n"
      "Raises OSError when the task directory cannot be read.");
}

}  // namespace apportion::bindings
