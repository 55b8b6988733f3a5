// Python skin of placement. Enums cross as the words the Python API uses ("exclusive", "bind",
// ...), parsed by the core's parsers; the enums are bound too (apportion.placement takes its
// valid words from them), so a bad word here is a programming error.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "apportion/placement.hpp"
#include "bindings/enums.hpp"
#include "bindings/register.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

MemoryPolicy memory_policy_from(const std::string& word) {
  return enum_or_raise(parse_memory_policy(word), word, "memory_policy", kMemoryPolicies);
}

Isolation isolation_from(const std::string& word) {
  return enum_or_raise(parse_isolation(word), word, "isolation", kIsolations);
}

py::dict plan_as_dict(const Plan& plan) {
  py::list models;
  for (const auto& m : plan.models) {
    py::list instances;
    for (const auto& inst : m.instances) {
      py::dict d;
      d["cpus"] = inst.cpus;
      d["threads"] = inst.threads;
      d["memory_nodes"] = inst.memory_nodes;
      instances.append(d);
    }
    py::dict d;
    d["name"] = m.name;
    d["isolation"] = std::string(to_string(m.isolation));
    d["memory_policy"] = std::string(to_string(m.memory_policy));
    d["cpus"] = m.cpus;
    d["reserved"] = m.reserved;
    d["cores"] = m.cores;
    d["locality"] = std::string(to_string(m.locality));
    d["order"] = m.order;
    d["instances"] = instances;
    models.append(d);
  }
  py::dict out;
  out["models"] = models;
  out["shared_pool"] = plan.shared_pool;
  out["usable"] = plan.usable;
  return out;
}

// Raises apportion.errors.QuotaError (a request this machine can never satisfy) or
// PlacementError (requests that do not fit together), with .model and .field attributes.
void raise_placement_error(const PlacementError& e) {
  py::object cls;
  try {
    auto errors = py::module_::import("apportion.errors");
    cls = errors.attr(e.kind() == PlacementErrorKind::quota ? "QuotaError" : "PlacementError");
  } catch (py::error_already_set&) {
    // Only a broken install lands here; a ValueError still carries the full message.
    cls = py::reinterpret_borrow<py::object>(PyExc_ValueError);
  }
  py::object err = cls(e.what());
  err.attr("model") = e.model();
  err.attr("field") = e.field();
  err.attr("kind") = e.kind() == PlacementErrorKind::quota ? "quota" : "capacity";
  PyErr_SetObject(cls.ptr(), err.ptr());
}

}  // namespace

void register_placement(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const PlacementError& e) {
      raise_placement_error(e);
    }
  });

  bind_enum(m, "Isolation", kIsolations,
            "How a model holds its CPUs: exclusive (cores of its own) or shared (the shared pool).");

  py::class_<Quota>(m, "Quota",
                    "The CPU side of one model's quota, as placement sees it. Build it through "
                    "apportion.placement.Quota, which validates every field first.")
      .def(py::init([](std::string name, int cores, CpuList cpus, int instances, int threads,
                       const std::string& isolation, int numa, bool smt, const std::string& memory_policy,
                       bool oversubscribe) {
             Quota q;
             q.name = std::move(name);
             q.cores = cores;
             q.cpus = std::move(cpus);
             q.instances = instances;
             q.threads = threads;
             q.isolation = isolation_from(isolation);
             q.numa = numa;
             q.smt = smt;
             q.memory_policy = memory_policy_from(memory_policy);
             q.oversubscribe = oversubscribe;
             return q;
           }),
           py::kw_only(), py::arg("name"), py::arg("cores") = 0, py::arg("cpus") = CpuList{},
           py::arg("instances") = 1, py::arg("threads") = 0, py::arg("isolation") = "shared",
           py::arg("numa") = -1, py::arg("smt") = false, py::arg("memory_policy") = "bind",
           py::arg("oversubscribe") = false)
      .def_readonly("name", &Quota::name)
      .def_readonly("cores", &Quota::cores)
      .def_readonly("cpus", &Quota::cpus)
      .def_readonly("instances", &Quota::instances)
      .def_readonly("threads", &Quota::threads)
      .def_readonly("numa", &Quota::numa)
      .def_readonly("smt", &Quota::smt)
      .def_readonly("oversubscribe", &Quota::oversubscribe)
      .def_property_readonly("isolation", [](const Quota& q) { return std::string(to_string(q.isolation)); })
      .def_property_readonly("memory_policy",
                             [](const Quota& q) { return std::string(to_string(q.memory_policy)); });

  m.def(
      "plan_placement",
      [](const Topology& topology, const std::vector<Quota>& quotas) {
        return plan_as_dict(plan_placement(topology, quotas));
      },
      py::arg("topology"), py::arg("quotas"),
      "Place every quota on the topology (pure and deterministic). Returns a dict: models (in the\n"
      "given order, each with cpus, reserved, cores, locality, order, instances), shared_pool, usable.\n"
      "Raises apportion.errors.QuotaError or PlacementError with .model and .field.");
}

}  // namespace apportion::bindings
