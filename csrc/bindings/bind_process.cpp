// Python skin of the shared-memory channel used by process-isolated instances, plus the one
// process-control call Python's os module lacks (PR_SET_PDEATHSIG).
//
// GIL: a send that finds room copies under the GIL (a memcpy of at most the message; no
// hand-off that could cost a switch interval); a send that must wait for room, and every
// receive, wait with the GIL released. Large received parts are copied with it released too.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "apportion/shm_channel.hpp"
#include "bindings/gil.hpp"
#include "bindings/register.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

// Copies bigger than this run with the GIL released (dropping and taking it back costs ~1 us).
constexpr std::size_t kCopyWithoutGil = 256 * 1024;

int64_t to_ns(std::optional<double> seconds) {
  if (!seconds) return -1;
  if (!(*seconds >= 0) || std::isinf(*seconds)) throw py::value_error("timeout must be None or a finite number of seconds >= 0");
  return static_cast<int64_t>(*seconds * 1e9);
}

int64_t spin_ns(double spin_us) {
  if (!(spin_us >= 0) || spin_us > 1e6) throw py::value_error("spin_us must be in [0, 1e6]");
  return static_cast<int64_t>(spin_us * 1e3);
}

// Owns the channel; close() drops the mapping early (the object may outlive it in Python).
class PyChannel {
 public:
  explicit PyChannel(std::unique_ptr<ShmChannel> ch) : ch_(std::move(ch)) {}

  ShmChannel& get() {
    if (!ch_) throw py::value_error("the channel is closed");
    return *ch_;
  }
  // What a call that releases the GIL holds: close() from another thread meanwhile drops this
  // handle, and the segment stays mapped until that call returns (it unmapped it under the
  // waiting call: a segfault).
  std::shared_ptr<ShmChannel> hold() {
    if (!ch_) throw py::value_error("the channel is closed");
    return ch_;
  }
  void close() { ch_.reset(); }
  bool closed() const { return !ch_; }

  bool send(const py::list& parts, double spin_us, std::optional<double> timeout) {
    const std::shared_ptr<ShmChannel> held = hold();
    ShmChannel& ch = *held;
    const int64_t spin = spin_ns(spin_us), timeout_ns = to_ns(timeout);
    // Views of the callers' buffers, valid while `views` holds them (the list keeps the
    // objects alive, and the GIL is only released while views hold their buffers).
    struct View {
      Py_buffer b{};
      bool held = false;
      ~View() {
        if (held) PyBuffer_Release(&b);
      }
    };
    std::vector<View> views(parts.size());
    std::vector<std::span<const std::byte>> spans;
    spans.reserve(parts.size());
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (PyObject_GetBuffer(parts[i].ptr(), &views[i].b, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
      views[i].held = true;
      spans.emplace_back(static_cast<const std::byte*>(views[i].b.buf), static_cast<std::size_t>(views[i].b.len));
    }
    ChannelStatus s = ch.send(spans, 0, 0);
    if (s == ChannelStatus::timeout && timeout_ns != 0) {
      s = without_gil([&] { return ch.send(spans, spin, timeout_ns); });
    }
    std::size_t total = 0;
    for (auto sp : spans) total += sp.size();
    if (s == ChannelStatus::no_space) {
      // OSError(errno, text): callers tell this apart by .errno (ENOSPC) and add who sent it.
      const int err = ch.reserve_errno();
      const std::string text = "a message of " + std::to_string(total) + " bytes cannot be backed by segment " +
                               ch.name() + " (" + std::strerror(err) + "; " +
                               std::to_string(ch.free_bytes()) + " bytes free on its filesystem)";
      PyErr_SetObject(PyExc_OSError, py::make_tuple(err, text).ptr());
      throw py::error_already_set();
    }
    if (s == ChannelStatus::too_large) {
      throw py::value_error("a message of " + std::to_string(total) + " bytes in " + std::to_string(spans.size()) +
                            " parts does not fit the channel (at most " +
                            std::to_string(ch.max_message_bytes(spans.size())) + " bytes)");
    }
    return s == ChannelStatus::ok;
  }

  py::object receive(double spin_us, std::optional<double> timeout) {
    const std::shared_ptr<ShmChannel> held = hold();
    ShmChannel& ch = *held;
    const int64_t spin = spin_ns(spin_us), timeout_ns = to_ns(timeout);
    const ChannelStatus s = without_gil([&] { return ch.receive(parts_, spin, timeout_ns); });
    if (s == ChannelStatus::corrupt) {
      throw py::value_error("the ring from the other process holds a frame no sender writes (its memory "
                            "was overwritten)");
    }
    if (s != ChannelStatus::ok) return py::none();
    struct Releaser {
      ShmChannel& ch;
      ~Releaser() { ch.release(); }
    } releaser{ch};
    // Part 0 (the pickle) as bytes; the out-of-band buffers as bytearrays, so arrays rebuilt
    // on them are writable and own their memory after the ring slot is reused.
    py::list out(parts_.size());
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      const auto p = parts_[i];
      const auto n = static_cast<Py_ssize_t>(p.size());
      PyObject* obj = i == 0 ? PyBytes_FromStringAndSize(nullptr, n) : PyByteArray_FromStringAndSize(nullptr, n);
      if (obj == nullptr) throw py::error_already_set();
      char* dst = i == 0 ? PyBytes_AS_STRING(obj) : PyByteArray_AS_STRING(obj);
      if (p.size() >= kCopyWithoutGil) {
        without_gil([&] { std::memcpy(dst, p.data(), p.size()); });
      } else if (n != 0) {
        std::memcpy(dst, p.data(), p.size());
      }
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), obj);
    }
    return out;
  }

 private:
  std::shared_ptr<ShmChannel> ch_;
  std::vector<std::span<const std::byte>> parts_;
};

}  // namespace

void register_process(py::module_& m) {
  py::class_<PyChannel>(m, "ShmChannel",
                        "Two-way message channel in a POSIX shared-memory segment: one byte ring per\n"
                        "direction, cross-process futex wake-ups. One thread sends and one receives\n"
                        "on each side. Used by process-isolated instances (apportion._private.process).")
      .def_static(
          "create",
          [](const std::string& name, std::size_t ring_bytes) {
            std::string error;
            auto ch = ShmChannel::create(name, ring_bytes, &error);
            if (!ch) {
              PyErr_SetString(PyExc_OSError, error.c_str());
              throw py::error_already_set();
            }
            return std::make_unique<PyChannel>(std::move(ch));
          },
          py::arg("name"), py::arg("ring_bytes"),
          "Create segment `name` (\"/...\"; must not exist) with rings of `ring_bytes` each (sparse:\n"
          "each sender reserves the pages its messages reach before writing them). The creator unlinks the name on unlink()/close().\n"
          "Raises OSError.")
      .def_static(
          "open",
          [](const std::string& name) {
            std::string error;
            auto ch = ShmChannel::open(name, &error);
            if (!ch) {
              PyErr_SetString(PyExc_OSError, error.c_str());
              throw py::error_already_set();
            }
            return std::make_unique<PyChannel>(std::move(ch));
          },
          py::arg("name"), "Map the existing segment `name` as the child side. Raises OSError.")
      .def_property_readonly("name", [](PyChannel& c) { return c.get().name(); })
      .def_property_readonly("ring_bytes", [](PyChannel& c) { return c.get().ring_bytes(); })
      .def_property_readonly("closed", &PyChannel::closed)
      .def_property_readonly(
          "free_bytes", [](PyChannel& c) { return c.get().free_bytes(); },
          "Bytes free on the filesystem holding the segment (/dev/shm); -1 if unknown.")
      .def_property_readonly(
          "reserved_bytes", [](PyChannel& c) { return c.get().reserved_bytes(); },
          "Bytes of this side's outgoing ring backed so far (reserved before a message is written).")
      .def_property_readonly(
          "sent_unread", [](PyChannel& c) { return c.get().sent_unread(); },
          "A sent message the peer has not taken yet (after the peer died: it never saw it).")
      .def(
          "max_message_bytes", [](PyChannel& c, std::size_t parts) { return c.get().max_message_bytes(parts); },
          py::arg("parts"), "The most payload bytes, over `parts` parts, that always fit one message.")
      .def(
          "send", &PyChannel::send, py::arg("parts"), py::arg("spin_us") = 0.0, py::arg("timeout") = py::none(),
          "Send the buffers in `parts` (bytes-like, C-contiguous) as one message. Waits for room\n"
          "(GIL released) up to `timeout` seconds (None: no limit); False if it timed out.\n"
          "ValueError if the message can never fit; OSError (errno ENOSPC, nothing sent) if the\n"
          "shared-memory filesystem cannot back it.")
      .def("receive", &PyChannel::receive, py::arg("spin_us") = 0.0, py::arg("timeout") = py::none(),
           "Wait (GIL released; spin `spin_us` first) up to `timeout` seconds for a message: a list\n"
           "whose first part is bytes and the others bytearrays; None on timeout. ValueError when\n"
           "the ring holds a frame no sender writes (the other process's memory was overwritten).")
      .def(
          "unlink", [](PyChannel& c) { c.get().unlink(); },
          "Remove the segment's name (mappings stay valid). Idempotent; either side.")
      .def("close", &PyChannel::close,
           "Unmap (and, for the creator, unlink); a call in flight on another thread keeps the\n"
           "segment mapped until it returns. Idempotent.");

  m.def(
      "set_parent_death_signal",
      [](int sig) {
#if defined(__linux__)
        return ::prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0;
#else
        (void)sig;
        return false;
#endif
      },
      py::arg("signal"),
      "Ask the kernel to send `signal` to this process when the thread that started it exits\n"
      "(prctl PR_SET_PDEATHSIG). False where unsupported.");
}

}  // namespace apportion::bindings
