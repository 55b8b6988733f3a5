// Python skin of the GPU layer, in the submodule apportion._core.gpu. The driver status, the
// described devices and the plan work on every build; the spin kernel only when built with CUDA
// (spin_available() says which). apportion.gpu validates quotas before they reach plan_gpus.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "apportion/gpu/device.hpp"
#include "apportion/gpu/driver.hpp"
#include "apportion/gpu/partition.hpp"
#include "apportion/gpu/partitioner.hpp"
#if defined(APPORTION_WITH_CUDA)
#include "apportion/gpu/spin.hpp"
#endif
#include "bindings/register.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

using namespace apportion::gpu;

// Raises an apportion.errors class by name with .model (and .field) set, so callers can tell
// which quota failed without parsing the message.
[[noreturn]] void raise_error(const char* cls_name, const char* what, const std::string& model,
                              const std::string* field) {
  py::object cls;
  try {
    cls = py::module_::import("apportion.errors").attr(cls_name);
  } catch (py::error_already_set&) {
    // Only a broken install lands here; a RuntimeError still carries the message.
    cls = py::reinterpret_borrow<py::object>(PyExc_RuntimeError);
  }
  py::object err = cls(what);
  err.attr("model") = model.empty() ? py::object(py::none()) : py::object(py::str(model));
  if (field) err.attr("field") = *field;
  PyErr_SetObject(cls.ptr(), err.ptr());
  throw py::error_already_set();
}

GpuPriority priority_from(const py::handle& h) {
  if (py::isinstance<py::str>(h)) {
    const auto word = h.cast<std::string>();
    if (word == "high") return GpuPriority::high();
    if (word == "normal") return GpuPriority::normal();
    if (word == "low") return GpuPriority::low();
    throw py::value_error("priority must be \"high\", \"normal\", \"low\" or an int, not \"" +
                          word + "\"");
  }
  return GpuPriority::of(h.cast<int>());
}

GpuQuota quota_from(const py::dict& d) {
  GpuQuota q;
  q.model = d["model"].cast<std::string>();
  auto get = [&](const char* key) -> py::object {
    return d.contains(key) ? py::reinterpret_borrow<py::object>(d[key]) : py::object(py::none());
  };
  if (auto v = get("device"); !v.is_none()) q.device = v.cast<int>();
  if (auto v = get("streams"); !v.is_none()) q.streams = v.cast<int>();
  if (auto v = get("priority"); !v.is_none()) q.priority = priority_from(v);
  if (auto v = get("sm_share"); !v.is_none()) q.sm_share = v.cast<double>();
  if (auto v = get("sm_count"); !v.is_none()) q.sm_count = v.cast<int>();
  if (auto v = get("memory"); !v.is_none()) q.memory = v.cast<std::uint64_t>();
  if (auto v = get("allow_overlap"); !v.is_none()) q.allow_overlap = v.cast<bool>();
  if (auto v = get("strict"); !v.is_none()) q.strict = v.cast<bool>();
  return q;
}

py::dict status_dict(const DriverStatus& st) {
  py::dict d;
  d["available"] = st.available;
  d["reason"] = st.reason;
  d["driver_version"] = st.driver_version;
  d["device_count"] = st.device_count;
  d["green_contexts"] = st.green_contexts;
  d["green_ctx_stream_create"] = st.green_ctx_stream_create;
  d["missing_optional"] = st.missing_optional;
  return d;
}

void bind_spin(py::module_& g) {
#if defined(APPORTION_WITH_CUDA)
  g.def("spin_available", [] { return spin_device_count() > 0; },
        "True when built with CUDA and the CUDA runtime sees a device.");
  auto check = [](int code, const char* what) {
    if (code != 0) throw std::runtime_error(std::string(what) + ": " + spin_error_string(code));
  };
  g.def(
      "launch_spin",
      [check](std::uintptr_t stream_ptr, double micros, int blocks, std::uintptr_t sm_ids_ptr,
              int threads, int device) {
        check(launch_spin(stream_ptr, micros, blocks, reinterpret_cast<int*>(sm_ids_ptr),
                          threads, device),
              "launch_spin");
      },
      py::arg("stream_ptr"), py::arg("micros"), py::arg("blocks"), py::arg("sm_ids_ptr") = 0,
      py::arg("threads") = 32, py::arg("device") = 0,
      "Queue a spin kernel (blocks x threads, micros each) on the stream; asynchronous. Block b "
      "writes its SM id to the int at sm_ids_ptr[b] when sm_ids_ptr (a device pointer) is set.");
  g.def(
      "stream_synchronize",
      [check](std::uintptr_t stream_ptr, int device) {
        int r = 0;
        {
          py::gil_scoped_release nogil;
          r = spin_stream_synchronize(stream_ptr, device);
        }
        check(r, "cudaStreamSynchronize");
      },
      py::arg("stream_ptr"), py::arg("device") = 0);
  g.def(
      "time_spins",
      [](std::uintptr_t stream_ptr, double micros, int blocks, int threads, int iterations,
         int device) {
        py::gil_scoped_release nogil;
        SpinTimes t = time_spins(stream_ptr, micros, blocks, threads, iterations, device);
        return std::make_pair(std::move(t.micros), std::move(t.sm_ids));
      },
      py::arg("stream_ptr"), py::arg("micros"), py::arg("blocks"), py::arg("threads") = 32,
      py::arg("iterations") = 100, py::arg("device") = 0,
      "Run spin kernels one after another; returns (latency of each in us, SM ids used).");
  py::class_<SpinBuffer>(g, "SpinBuffer", "Zeroed device ints, freed with the object.")
      .def(py::init<std::size_t, int>(), py::arg("count"), py::arg("device") = 0)
      .def_property_readonly("ptr",
                             [](const SpinBuffer& b) {
                               return reinterpret_cast<std::uintptr_t>(b.data());
                             })
      .def("__len__", &SpinBuffer::size)
      .def("read", &SpinBuffer::read, py::call_guard<py::gil_scoped_release>())
      .def("clear", &SpinBuffer::clear);
  py::class_<SpinFlood>(g, "SpinFlood",
                        "Keeps a stream saturated with spin kernels from a C++ thread.")
      .def(py::init<std::uintptr_t, double, int, int, int>(), py::arg("stream_ptr"),
           py::arg("micros"), py::arg("blocks"), py::arg("threads") = 1024, py::arg("device") = 0)
      .def("stop", &SpinFlood::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("kernels", &SpinFlood::kernels)
      .def("sm_ids", &SpinFlood::sm_ids, py::call_guard<py::gil_scoped_release>());
#else
  g.def("spin_available", [] { return false; },
        "False: this build has no CUDA (APPORTION_WITH_CUDA=OFF), so no spin kernel.");
#endif
}

}  // namespace

void register_gpu(py::module_& m) {
  py::module_ g = m.def_submodule("gpu", "GPU layer: driver status, devices, plans, partitions");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const GpuQuotaError& e) {
      raise_error("QuotaError", e.what(), e.model(), &e.field());
    } catch (const GpuPlacementError& e) {
      raise_error("PlacementError", e.what(), e.model(), nullptr);
    } catch (const GpuUnavailableError& e) {
      raise_error("PlacementError", (std::string("no usable GPU: ") + e.what()).c_str(), "",
                  nullptr);
    }
  });

  g.def("driver_status", [] { return status_dict(system_driver()->status()); },
        "What loading libcuda.so.1 found (loaded once per process; never raises).");

  py::class_<DeviceInfo>(g, "DeviceInfo", "One GPU, live or described.")
      .def(py::init<>())
      .def_readwrite("ordinal", &DeviceInfo::ordinal)
      .def_readwrite("name", &DeviceInfo::name)
      .def_readwrite("cc_major", &DeviceInfo::cc_major)
      .def_readwrite("cc_minor", &DeviceInfo::cc_minor)
      .def_readwrite("sm_count", &DeviceInfo::sm_count)
      .def_readwrite("priority_least", &DeviceInfo::priority_least)
      .def_readwrite("priority_greatest", &DeviceInfo::priority_greatest)
      .def_readwrite("min_sm_partition", &DeviceInfo::min_sm_partition)
      .def_readwrite("sm_alignment", &DeviceInfo::sm_alignment)
      .def_readwrite("total_memory", &DeviceInfo::total_memory)
      .def_readwrite("free_memory", &DeviceInfo::free_memory)
      .def_readwrite("driver_version", &DeviceInfo::driver_version)
      .def_readwrite("green_contexts", &DeviceInfo::green_contexts)
      .def_property_readonly("sm_granularity", &DeviceInfo::sm_granularity)
      .def_property_readonly("sm_units", &DeviceInfo::sm_units)
      .def("__str__", [](const DeviceInfo& d) { return to_string(d); })
      .def("__repr__", [](const DeviceInfo& d) { return "<DeviceInfo " + to_string(d) + ">"; });

  g.def("described_device_names", &described_device_names);
  g.def(
      "described_device",
      [](const std::string& name, int ordinal) {
        auto d = described_device(name, ordinal);
        if (!d) {
          std::string names;
          for (const auto& n : described_device_names()) names += (names.empty() ? "" : ", ") + n;
          throw py::value_error("no described device \"" + name + "\"; known: " + names);
        }
        return *d;
      },
      py::arg("name"), py::arg("ordinal") = 0);
  g.def(
      "describe_devices",
      [] {
        std::string error;
        auto devices = describe_devices(*system_driver(), error);
        if (devices.empty() && system_driver()->status().available) {
          throw std::runtime_error(error);
        }
        return devices;
      },
      "The live devices; [] when the driver is unavailable.");

  py::class_<ModelGpuPlan>(g, "ModelGpuPlan")
      .def_readonly("model", &ModelGpuPlan::model)
      .def_readonly("device", &ModelGpuPlan::device)
      .def_readonly("streams", &ModelGpuPlan::streams)
      .def_readonly("priority", &ModelGpuPlan::priority)
      .def_readonly("priority_asked", &ModelGpuPlan::priority_asked)
      .def_readonly("priority_clamped", &ModelGpuPlan::priority_clamped)
      .def_readonly("sm_asked", &ModelGpuPlan::sm_asked)
      .def_readonly("sm_count", &ModelGpuPlan::sm_count)
      .def_readonly("sm_rounded", &ModelGpuPlan::sm_rounded)
      .def_readonly("sm_units", &ModelGpuPlan::sm_units)
      .def_readonly("sm_overlaps", &ModelGpuPlan::sm_overlaps)
      .def_readonly("memory", &ModelGpuPlan::memory)
      .def_readonly("allow_overlap", &ModelGpuPlan::allow_overlap)
      .def_readonly("strict", &ModelGpuPlan::strict);
  py::class_<DeviceGpuPlan>(g, "DeviceGpuPlan")
      .def_readonly("info", &DeviceGpuPlan::info)
      .def_readonly("granularity", &DeviceGpuPlan::granularity)
      .def_readonly("units", &DeviceGpuPlan::units)
      .def_readonly("sm_grouped", &DeviceGpuPlan::sm_grouped)
      .def_readonly("sm_unassigned", &DeviceGpuPlan::sm_unassigned)
      .def_readonly("memory_capacity", &DeviceGpuPlan::memory_capacity)
      .def_readonly("memory_assigned", &DeviceGpuPlan::memory_assigned);
  py::class_<GpuPlan>(g, "GpuPlan")
      .def_readonly("models", &GpuPlan::models)
      .def_readonly("devices", &GpuPlan::devices)
      .def_readonly("notes", &GpuPlan::notes)
      .def(
          "find",
          [](const GpuPlan& p, const std::string& model) -> py::object {
            const ModelGpuPlan* found = p.find(model);
            return found ? py::cast(*found) : py::object(py::none());
          },
          py::arg("model"))
      .def(
          "without",
          [](const GpuPlan& p, const std::vector<std::string>& names) {
            GpuPlan out = p;
            std::erase_if(out.models, [&](const ModelGpuPlan& planned) {
              return std::find(names.begin(), names.end(), planned.model) != names.end();
            });
            return out;
          },
          py::arg("models"),
          "A copy without `models` (those that left a running runtime); the others keep their\n"
          "streams, units and budgets as planned (and realised).")
      .def("__str__", &GpuPlan::to_string);

  g.def(
      "plan_gpus",
      [](const py::list& quotas, const std::vector<DeviceInfo>& devices) {
        std::vector<GpuQuota> qs;
        for (const auto& q : quotas) qs.push_back(quota_from(q.cast<py::dict>()));
        return plan_gpus(qs, devices);
      },
      py::arg("quotas"), py::arg("devices"),
      "Plan dict quotas {model, device, streams, priority, sm_share, sm_count, memory, "
      "allow_overlap, strict} over devices. Raises apportion.errors.QuotaError / PlacementError "
      "with .model (and .field).");

  py::class_<ModelStreams>(g, "ModelStreams")
      .def_readonly("model", &ModelStreams::model)
      .def_readonly("device", &ModelStreams::device)
      .def_readonly("priority", &ModelStreams::priority)
      .def_readonly("sm_count", &ModelStreams::sm_count)
      .def_readonly("green_context", &ModelStreams::green_context)
      .def_readonly("context", &ModelStreams::context)
      .def_readonly("streams", &ModelStreams::streams)
      .def_readonly("memory", &ModelStreams::memory);
  py::class_<GpuPartition>(g, "GpuPartition",
                           "Streams and green contexts of a plan on the live driver; close() "
                           "destroys them.")
      .def(py::init([](const GpuPlan& plan) {
             return std::make_unique<GpuPartition>(system_driver(), plan);
           }),
           py::arg("plan"))
      .def("close", &GpuPartition::close)
      .def_property_readonly("closed", &GpuPartition::closed)
      .def_property_readonly("models", &GpuPartition::models)
      .def_property_readonly("warnings", &GpuPartition::warnings)
      .def_property_readonly(
          "plan", [](const GpuPartition& p) { return p.plan(); },
          "A copy of the plan as the driver realised it (its SM counts, fallbacks in notes).")
      .def(
          "find",
          [](const GpuPartition& p, const std::string& model) -> py::object {
            const ModelStreams* found = p.find(model);
            return found ? py::cast(*found) : py::object(py::none());
          },
          py::arg("model"));

  bind_spin(g);
}

}  // namespace apportion::bindings
