// Python skin of the engine: requests that carry Python objects, futures, and a handler that
// runs the model in the worker thread under the GIL.
//
// GIL rules here:
// - Every PyObject* in a PyRequest is touched only with the GIL held.
// - Workers keep one persistent thread state for their whole life (a fresh one per call costs
//   ~7 us; re-acquiring a persistent one ~0.1 us) and hold the GIL only around the model call
//   and the completion that follows it.
// - Anything that waits (a future's result, joining workers, starting instances) releases the GIL.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/typing.h>

#include <tuple>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "apportion/engine.hpp"
#include "apportion/registry.hpp"
#include "bindings/enums.hpp"
#include "bindings/gil.hpp"
#include "bindings/register.hpp"
#include "bindings/stats.hpp"

namespace py = pybind11;

PYBIND11_DECLARE_HOLDER_TYPE(T, apportion::Ref<T>, true)

namespace apportion::bindings {
namespace {

// Exception classes from apportion.errors and the stdlib, resolved once at import. Leaked on
// purpose: their destructors would run after the interpreter is gone.
struct PyTypes {
  PyObject* queue_full;
  PyObject* deadline_exceeded;
  PyObject* runtime_closed;
  PyObject* model_not_found;
  PyObject* apportion_error;
  PyObject* cancelled_error;
  PyObject* pinning_warning;
  PyObject* quota_error;
  PyObject* numbers_real;
};

PyTypes& types() {
  static PyTypes* t = [] {
    auto errors = py::module_::import("apportion.errors");
    auto futures = py::module_::import("concurrent.futures");
    return new PyTypes{
        py::object(errors.attr("QueueFull")).release().ptr(),
        py::object(errors.attr("DeadlineExceeded")).release().ptr(),
        py::object(errors.attr("RuntimeClosed")).release().ptr(),
        py::object(errors.attr("ModelNotFound")).release().ptr(),
        py::object(errors.attr("ApportionError")).release().ptr(),
        py::object(futures.attr("CancelledError")).release().ptr(),
        py::object(errors.attr("PinningWarning")).release().ptr(),
        py::object(errors.attr("QuotaError")).release().ptr(),
        py::object(py::module_::import("numbers").attr("Real")).release().ptr(),
    };
  }();
  return *t;
}

[[noreturn]] void raise(PyObject* type, const std::string& msg) {
  PyErr_SetString(type, msg.c_str());
  throw py::error_already_set();
}

// apportion.errors.QuotaError(reason, model=model, field=field): "model 'm', field 'f': reason".
[[noreturn]] void raise_quota(const std::string& model, const char* field, const std::string& reason) {
  const py::object e = py::reinterpret_borrow<py::object>(types().quota_error)(
      reason, py::arg("model") = model, py::arg("field") = field);
  PyErr_SetObject(types().quota_error, e.ptr());
  throw py::error_already_set();
}

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// The raised exception, normalised and carrying its traceback; clears the error indicator.
PyObject* fetch_exception() {
#if PY_VERSION_HEX >= 0x030C0000
  return PyErr_GetRaisedException();
#else
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb != nullptr && value != nullptr) PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
#endif
}

// Forks of this process seen from the child's side (see after_fork_in_child).
std::atomic<uint64_t> fork_generation{0};

// True in a process forked since `generation` was read (in the parent, it never changes).
bool forked_since(uint64_t generation) noexcept {
  return fork_generation.load(std::memory_order_relaxed) != generation;
}

class PyRequest final : public Request {
 public:
  ~PyRequest() override {
    // Only reachable with the GIL held whenever a Python object is still owned: completion
    // clears input and callbacks, and every owner of a completed request with a value drops
    // its reference under the GIL (Future deallocation, or the worker right after completing).
    Py_XDECREF(input);
    Py_XDECREF(value);
    Py_XDECREF(callbacks);
    Py_XDECREF(self_obj);
    Py_XDECREF(interop);
  }

  PyObject* input = nullptr;      // the model's argument; released at completion
  PyObject* value = nullptr;      // result (ok) or exception (error); released with the request
  PyObject* callbacks = nullptr;  // list of done-callbacks; released at completion
  PyObject* self_obj = nullptr;   // the Future, kept alive while callbacks wait for it
  PyObject* interop = nullptr;    // what concurrent.futures' wait() needs, made on first use
  int64_t timeout_ns = 0;         // the deadline's budget as given (for the expiry message)
  // Forks seen when it was made: in a fork made since, no worker will ever complete it.
  uint64_t fork_generation_made = fork_generation.load(std::memory_order_relaxed);
};

// Completes a claimed request whose payload (value) is already stored. GIL held.
void finish(PyRequest* r, Outcome o, WorkerShard* shard) {
  Py_CLEAR(r->input);
  Model::complete(*r, o, shard);
  if (r->callbacks == nullptr) return;
  // Take the list first: a callback may add callbacks (run at once, the future being done) or
  // release the GIL, so nothing may iterate a list another thread can touch.
  PyObject* cbs = std::exchange(r->callbacks, nullptr);
  PyObject* self = std::exchange(r->self_obj, nullptr);
  const Py_ssize_t n = PyList_GET_SIZE(cbs);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* res = PyObject_CallOneArg(PyList_GET_ITEM(cbs, i), self);
    if (res == nullptr) {
      // As concurrent.futures does: a failing callback is reported, never propagated.
      PyErr_WriteUnraisable(PyList_GET_ITEM(cbs, i));
    }
    Py_XDECREF(res);
  }
  Py_DECREF(cbs);
  Py_DECREF(self);
}

// A model that forked and returned in the child: there its worker is the only thread, and
// serving on ran the parent's queued requests a second time (their side effects twice) and
// never ended the child. The child ends at once, as a forked child must (os._exit): with the
// code of a SystemExit the model raised, else 1, saying why. `in_call`: the fork was made in the
// model's call; else in another piece of code the thread ran (a done-callback, the factory, a
// deadline timer's callback), found before the thread serves anything more. GIL held.
[[noreturn]] void end_forked_child(const std::string& model, PyObject* error, bool in_call = true) {
  int status = 1;
  if (error != nullptr && PyObject_TypeCheck(error, reinterpret_cast<PyTypeObject*>(PyExc_SystemExit))) {
    PyObject* code = PyObject_GetAttrString(error, "code");
    if (code == Py_None) {
      status = 0;
    } else if (code != nullptr && PyLong_Check(code)) {
      status = static_cast<int>(PyLong_AsLong(code));
    } else if (code != nullptr) {
      PyObject* text = PyObject_Str(code);
      if (text != nullptr) PySys_WriteStderr("%s\n", PyUnicode_AsUTF8(text));
      Py_XDECREF(text);
    }
    Py_XDECREF(code);
  } else if (in_call) {
    PySys_WriteStderr("apportion: model '%s' returned in a process it forked during its call (pid %d): "
                      "that process ends here, status 1; end it inside the model (os._exit)\n",
                      model.c_str(), static_cast<int>(getpid()));
  } else {
    PySys_WriteStderr("apportion: process %d was forked on a thread of model '%s' outside its call (a "
                      "done-callback, its factory or its deadline timer) and went on there: it ends here, "
                      "status 1, before serving anything of the parent's; end it where it was forked "
                      "(os._exit)\n",
                      static_cast<int>(getpid()), model.c_str());
  }
  PyErr_Clear();
  for (const char* stream : {"stdout", "stderr"}) {
    PyObject* f = PySys_GetObject(stream);  // borrowed
    PyObject* res = f != nullptr && f != Py_None ? PyObject_CallMethod(f, "flush", nullptr) : nullptr;
    Py_XDECREF(res);
    PyErr_Clear();
  }
  _exit(status);
}

// Serialises exiting workers' GIL waits (see PyHandler::stop_worker). Leaked on purpose: a
// worker may exit while static destructors run. Replaced in a forked child, like orphans_mu.
std::mutex* exiting_mu_ptr = new std::mutex;
std::mutex& exiting_mu() { return *exiting_mu_ptr; }

struct WorkerState {
  PyGILState_STATE gil{};
  PyThreadState* ts = nullptr;
  PyObject* fn = nullptr;
  bool holding = false;   // the GIL, kept from the previous call (see PyHandler::leave)
  bool batching = false;  // the instance takes a list of inputs (fixed when it was built)
  uint32_t streak = 0;    // calls made since the GIL was taken
  int64_t held_since = 0;
};

// The registry whose worker or deadline timer this thread is (0: none), and that thread's
// model: close() or remove_model() from inside a model, or from a done-callback the thread
// runs, would join the thread it runs on. current_counters (workers and deadline timers): a
// wait for a request of the thread's own model may wait for itself (a worker), or for a
// deadline only this thread would expire (the timer).
thread_local uint64_t current_registry = 0;
thread_local const ModelCounters* current_counters = nullptr;
thread_local std::string current_model;
constexpr const char* kTimerRole = "the deadline timer";
thread_local const char* current_role = "a worker";  // or kTimerRole

class PyHandler final : public ModelHandler {
 public:
  /// `batching`: the model is called with a list of inputs and returns a list of results (for
  /// the instances built from now on: a live move may change it with the factory).
  PyHandler(py::object make_instance, uint64_t registry, bool batching, std::string model)
      : make_instance_(std::move(make_instance)), registry_(registry), model_(std::move(model)), batching_(batching) {}

  ~PyHandler() override {
    // The last reference may drop on any thread, with or without the GIL: a registry close()
    // racing remove_model() holds the entry last, without the GIL. The members are Python
    // objects, so they are released here under the GIL (leaked if the interpreter is going).
    if (interpreter_finalizing()) {
      (void)make_instance_.release();
      (void)error_.release();
      return;
    }
    py::gil_scoped_acquire gil;
    make_instance_ = py::object();
    error_ = py::object();
  }

  bool start_worker(Worker& w) override {
    auto* st = new WorkerState;
    st->gil = PyGILState_Ensure();
    current_registry = registry_;
    current_counters = w.model->counters().get();
    current_model = w.model->name();
    PyObject* index = PyLong_FromUnsignedLong(w.index);
    PyObject* fn = index ? PyObject_CallOneArg(make_instance_.ptr(), index) : nullptr;
    Py_XDECREF(index);
    if (fn == nullptr) {
      PyObject* exc = fetch_exception();
      if (!error_) error_ = py::reinterpret_steal<py::object>(exc);
      else Py_XDECREF(exc);
      PyGILState_Release(st->gil);
      delete st;
      return false;
    }
    st->fn = fn;
    st->batching = batching_;
    w.user = st;
    st->ts = PyEval_SaveThread();
    return true;
  }

  void run(Worker& w, Request* const* batch, std::size_t n) override {
    auto* st = static_cast<WorkerState*>(w.user);
    if (interpreter_finalizing()) return;  // never touch a dying interpreter; leak instead
    enter(*st);
    if (forked_since(made_fork_generation_)) {
      end_forked_child(w.model->name(), nullptr, false);  // forked since: not the model's call
    }
    if (st->batching) {
      run_batch(w, *st, batch, n);
    } else {
      auto* r = static_cast<PyRequest*>(batch[0]);
      PyObject* res = PyObject_CallOneArg(st->fn, r->input);
      Outcome o = Outcome::ok;
      if (res != nullptr) {
        r->value = res;
      } else {
        r->value = fetch_exception();
        o = Outcome::error;
      }
      if (forked_since(made_fork_generation_)) {
        end_forked_child(w.model->name(), o == Outcome::error ? r->value : nullptr);
      }
      finish(r, o, &w.shard);
      Request::release(r);  // may be the last reference: still under the GIL
    }
    leave(w, *st);
  }

  void abandon(Worker* w, Request* req, Outcome why) override {
    auto* r = static_cast<PyRequest*>(req);
    if (interpreter_finalizing()) return;
    if (w != nullptr) {
      auto* st = static_cast<WorkerState*>(w->user);
      enter(*st);
      finish(r, why, nullptr);
      Request::release(r);
      leave(*w, *st);
    } else {
      py::gil_scoped_acquire gil;
      finish(r, why, nullptr);
      Request::release(r);
    }
  }

  void expire(Request* const* expired, std::size_t n, Request* const* others, std::size_t m) override {
    if (interpreter_finalizing()) return;  // never touch a dying interpreter; leak instead
    // The model's own timer thread (it only ever serves this model): a done-callback run here
    // that closes the runtime, removes the model or drops the runtime's last reference must
    // not join this thread from itself.
    current_registry = registry_;
    current_model = model_;
    current_role = kTimerRole;
    // Its model's: a done-callback run here that waits for another of the model's requests
    // would hold every deadline of the model until that request completes (for good, if only
    // an expiry would end it).
    if (n != 0) current_counters = expired[0]->counters.get();
    py::gil_scoped_acquire gil;  // once for the timer's whole batch
    if (forked_since(made_fork_generation_)) {
      end_forked_child(model_, nullptr, false);  // a callback it ran forked: not the parent's to expire
    }
    for (std::size_t i = 0; i < n; ++i) {
      finish(static_cast<PyRequest*>(expired[i]), Outcome::expired, nullptr);
      Request::release(expired[i]);
    }
    for (std::size_t i = 0; i < m; ++i) Request::release(others[i]);
  }

  void stop_worker(Worker& w) override {
    auto* st = static_cast<WorkerState*>(w.user);
    if (st == nullptr || interpreter_finalizing()) return;
    // Exiting workers queue for the GIL one at a time: thousands waiting on it together (a
    // close() of 8 x 1024 instances) each woke every switch interval to ask for it, and the
    // close took up to a minute. Never waited for holding the GIL: that would deadlock.
    if (st->holding) release_gil(*st);
    std::lock_guard one_at_a_time(exiting_mu());
    enter(*st);
    Py_CLEAR(st->fn);
    PyGILState_Release(st->gil);
    delete st;
    w.user = nullptr;
  }

  void release(Request* r) override {
    if (interpreter_finalizing()) return;  // never touch a dying interpreter; leak instead
    py::gil_scoped_acquire gil;  // the last reference frees the request's Python objects
    Request::release(r);
  }

  void idle(Worker& w) override {
    auto* st = static_cast<WorkerState*>(w.user);
    if (st != nullptr && st->holding) release_gil(*st);
  }

  /// The first exception a factory raised, if any (GIL held).
  py::object take_error() { return std::exchange(error_, py::object()); }

  /// Replaces what builds an instance for the workers started from now on (a live move) and
  /// whether those instances take lists, returning the previous pair. GIL held: start_worker
  /// reads both under the GIL.
  std::pair<py::object, bool> swap_factory(py::object make_instance, bool batching) {
    return {std::exchange(make_instance_, std::move(make_instance)), std::exchange(batching_, batching)};
  }

 private:
  // A worker serving requests back to back keeps the GIL from one call to the next: one
  // hand-off per run of queued requests instead of one per request (each contended hand-off
  // costs microseconds). It gives the GIL back when it runs out of work (idle()), and at
  // least every kLingerCalls calls or kLingerNs, so other threads wait no longer than that for
  // it between calls; Python code inside a model call yields it at the switch interval anyway.
  static constexpr uint32_t kLingerCalls = 64;
  static constexpr int64_t kLingerNs = 200'000;

  static void enter(WorkerState& st) {
    if (st.holding) return;
    PyEval_RestoreThread(st.ts);
    st.holding = true;
    st.streak = 0;
    st.held_since = now_ns();
  }

  static void leave(const Worker& w, WorkerState& st) {
    // Keep it only if another request is already queued: a caller waiting for the result just
    // published wants the GIL back at once, and with nothing queued nobody gains by the wait.
    if (w.may_linger && w.model->queued() != 0 && ++st.streak < kLingerCalls &&
        now_ns() - st.held_since < kLingerNs) {
      return;
    }
    release_gil(st);
  }

  static void release_gil(WorkerState& st) {
    st.ts = PyEval_SaveThread();
    st.holding = false;
  }

  // One call with the list of inputs; result i goes to request i. A failing call (or a result
  // that is not one result per request) fails every request of the batch with the same
  // exception object. GIL held.
  void run_batch(Worker& w, WorkerState& st, Request* const* batch, std::size_t n) {
    PyObject* error = nullptr;
    PyObject* items = nullptr;  // a list or tuple of n results
    PyObject* inputs = PyList_New(static_cast<Py_ssize_t>(n));
    if (inputs != nullptr) {
      for (std::size_t i = 0; i < n; ++i) {
        PyObject* x = static_cast<PyRequest*>(batch[i])->input;
        Py_INCREF(x);
        PyList_SET_ITEM(inputs, static_cast<Py_ssize_t>(i), x);
      }
      PyObject* res = PyObject_CallOneArg(st.fn, inputs);
      Py_DECREF(inputs);
      if (forked_since(made_fork_generation_)) {
        end_forked_child(w.model->name(), res == nullptr ? fetch_exception() : nullptr);
      }
      if (res != nullptr) {
        if (PyTuple_Check(res)) {
          items = res;
        } else if (PyList_Check(res)) {
          // A copy: the model may keep its list (and change it while the results are handed
          // out below, from another thread or from a done-callback that runs in between).
          // Read past a list that shrank meanwhile, the loop below crashed the process.
          items = PyList_AsTuple(res);
          Py_DECREF(res);
        } else if (!ordered_sequence(res)) {
          // A set or dict has no order to route by, an iterator or generator would have to
          // be run here, and a string is one result: none maps result i to request i.
          error = batch_error(w.model->name() + "': a batching model must return an ordered "
                              "sequence (list, tuple, array, tensor) with one result per request, "
                              "in order; it returned " + Py_TYPE(res)->tp_name);
          Py_DECREF(res);
        } else {
          // An array or tensor: its own exception, if taking it apart fails, is the error.
          items = PySequence_Fast(res, "");
          Py_DECREF(res);
        }
        if (items != nullptr && error == nullptr &&
            static_cast<std::size_t>(PySequence_Fast_GET_SIZE(items)) != n) {
          error = batch_error(w.model->name() + "': a batch of " + std::to_string(n) +
                              (n == 1 ? " request" : " requests") + " returned " +
                              std::to_string(PySequence_Fast_GET_SIZE(items)) +
                              " results; a batching model must return one result per request, "
                              "in order");
        }
      }
    }
    if (items == nullptr && error == nullptr) error = fetch_exception();
    if (items == nullptr && error == nullptr) error = batch_error(w.model->name() + "': the batch call failed");
    for (std::size_t i = 0; i < n; ++i) {
      auto* r = static_cast<PyRequest*>(batch[i]);
      PyObject* v = error != nullptr ? error : PySequence_Fast_GET_ITEM(items, static_cast<Py_ssize_t>(i));
      Py_INCREF(v);
      r->value = v;
      finish(r, error != nullptr ? Outcome::error : Outcome::ok, &w.shard);
      Request::release(r);
    }
    Py_XDECREF(items);
    Py_XDECREF(error);
  }

  // Indexable with a length (sequences, arrays, tensors), not text and not a mapping.
  static bool ordered_sequence(PyObject* o) {
    PyTypeObject* t = Py_TYPE(o);
    const bool indexable = (t->tp_as_sequence != nullptr && t->tp_as_sequence->sq_item != nullptr) ||
                           (t->tp_as_mapping != nullptr && t->tp_as_mapping->mp_subscript != nullptr);
    const bool sized = (t->tp_as_sequence != nullptr && t->tp_as_sequence->sq_length != nullptr) ||
                       (t->tp_as_mapping != nullptr && t->tp_as_mapping->mp_length != nullptr);
    if (!indexable || !sized || PyUnicode_Check(o) || PyBytes_Check(o) || PyByteArray_Check(o) ||
        PyAnySet_Check(o) || PyDict_Check(o)) {
      return false;
    }
    const int keyed = PyObject_HasAttrString(o, "keys");  // a mapping of another type
    return keyed == 0;
  }

  // A new ApportionError("model '<message>"); never null (falls back to the raised error).
  static PyObject* batch_error(const std::string& message) {
    const std::string text = "model '" + message;
    PyObject* e = PyObject_CallFunction(types().apportion_error, "s", text.c_str());
    return e != nullptr ? e : fetch_exception();
  }

  py::object make_instance_;
  const uint64_t registry_;
  const std::string model_;
  bool batching_;  // guarded by the GIL
  // Forks seen when it was made: its worker or timer thread that finds another count is in a
  // fork (a runtime made before a fork starts nothing in the child: check_not_forked).
  const uint64_t made_fork_generation_ = fork_generation.load(std::memory_order_relaxed);
  py::object error_;
};

// `v` as a float when it is a real number: an int, a float or any other numbers.Real (numpy
// scalars), never a bool; nullopt otherwise. An int beyond every float is +-inf.
std::optional<double> as_real(py::handle v) {
  PyObject* o = v.ptr();
  if (PyBool_Check(o)) return std::nullopt;
  if (PyFloat_CheckExact(o)) return PyFloat_AS_DOUBLE(o);
  const bool is_int = PyLong_Check(o);
  if (!is_int) {
    const int real = PyObject_IsInstance(o, types().numbers_real);
    if (real < 0) throw py::error_already_set();
    if (real == 0) return std::nullopt;
  }
  // An int's own value (never an int subclass's __float__), another real's __float__; a value
  // beyond every float raises OverflowError, and reads as +-inf. Any other error is the
  // value's own (its __float__ raised): raised as it is, never swallowed.
  const double d = is_int ? PyLong_AsDouble(o) : PyFloat_AsDouble(o);
  if (d == -1.0 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    const int negative = PyObject_RichCompareBool(o, py::int_(0).ptr(), Py_LT);
    if (negative < 0) throw py::error_already_set();
    return negative != 0 ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
  }
  return d;
}

// A number argument of a request or a model (None: nullopt); QuotaError naming the model and
// the field otherwise, never a binding dump.
std::optional<double> optional_number(const std::string& model, const char* field, py::handle v) {
  if (v.is_none()) return std::nullopt;
  if (auto d = as_real(v)) return d;
  raise_quota(model, field, "must be a number or None, got " + py::repr(v).cast<std::string>());
}

/// `given`: the value as the caller gave it, for the message (an int beyond every float reads
/// as itself, not as inf); empty: `ms` itself. A positive timeout under a nanosecond is one.
int64_t timeout_to_ns(const std::string& model, const char* field, double ms, py::handle given = {}) {
  if (!std::isfinite(ms) || ms <= 0.0) {
    const py::object shown = given ? py::reinterpret_borrow<py::object>(given) : py::object(py::float_(ms));
    raise_quota(model, field,
                "must be a positive, finite number of milliseconds (got " + py::repr(shown).cast<std::string>() + ")");
  }
  const double ns = ms * 1e6;
  return ns >= 9.2e18 ? Request::kNoDeadline : std::max<int64_t>(static_cast<int64_t>(ns), 1);
}

/// `now + timeout_ns`, or kNoDeadline where that sum would pass it (a timeout of centuries on
/// a clock counting from boot).
int64_t deadline_after(int64_t now, int64_t timeout_ns) {
  return timeout_ns >= Request::kNoDeadline - now ? Request::kNoDeadline : now + timeout_ns;
}

// The engine's batching options from an apportion.Batching (None: one request per call).
BatchingOptions batching_options(const py::object& batching) {
  BatchingOptions o;
  if (batching.is_none()) return o;
  o.max_size = batching.attr("max_size").cast<std::size_t>();
  o.max_delay_ns = static_cast<int64_t>(std::min(batching.attr("max_delay_ms").cast<double>(), 1e9) * 1e6);
  const py::object preferred = batching.attr("preferred_sizes");
  if (!preferred.is_none()) o.preferred_sizes = preferred.cast<std::vector<std::size_t>>();
  return o;
}

// A thread closing a runtime nobody waits for: one whose last reference went away inside one
// of its own workers (a worker cannot join itself), or a draining close() that Ctrl-C
// interrupted. `done` is its last step.
struct Orphan {
  std::thread thread;
  std::shared_ptr<std::atomic<uint32_t>> done;
};

// Orphans are joined by join_orphans() (at interpreter exit), and those already finished each
// time another is added: an exited thread keeps its stack mapped until joined, and thousands
// of them exhausted the address space. Leaked on purpose, like PyTypes: nothing may run their
// destructors after the interpreter is gone.
// In a forked child, the parent's threads do not exist and a lock another thread held at the
// fork stays held: after_fork_in_child() replaces these and exiting_mu (leaking the old ones)
// and counts the fork, so that runtimes made before it refuse to serve (fork_generation
// differs from theirs).
std::mutex* orphans_mu_ptr = new std::mutex;
std::vector<Orphan>* orphans_ptr = new std::vector<Orphan>;

std::mutex& orphans_mu() { return *orphans_mu_ptr; }
std::vector<Orphan>& orphans() { return *orphans_ptr; }

void after_fork_in_child() {
  exiting_mu_ptr = new std::mutex;
  orphans_mu_ptr = new std::mutex;
  orphans_ptr = new std::vector<Orphan>;
  fork_generation.fetch_add(1, std::memory_order_relaxed);
}

// Adds an orphan, joining those that finished first (they only have to return); if even that
// fails, the thread is detached rather than destroyed joinable (std::terminate). orphans_mu() held.
void add_orphan(std::thread thread, std::shared_ptr<std::atomic<uint32_t>> done) noexcept {
  try {
    auto& all = orphans();
    std::erase_if(all, [](Orphan& x) {
      if (x.done->load(std::memory_order_acquire) == 0) return false;
      x.thread.join();
      return true;
    });
    all.reserve(all.size() + 1);
  } catch (...) {
    thread.detach();
    return;
  }
  orphans().push_back(Orphan{std::move(thread), std::move(done)});
}

// How often a blocking wait of the public API returns to Python to run its signal handlers
// (Ctrl-C raises KeyboardInterrupt in the waiting thread; the request is not affected).
constexpr int64_t kSignalCheckNs = 50'000'000;
unsigned long main_thread_ident = 0;  // set at import

// From a destructor (GIL held): never throws. The registry's last reference must not drop
// here (its destructor would join this worker from itself): the closing thread drops it.
void close_in_background(std::shared_ptr<Registry> reg) noexcept {
  auto* held = new std::shared_ptr<Registry>(std::move(reg));
  std::shared_ptr<std::atomic<uint32_t>> done;
  std::thread thread;
  try {
    done = std::make_shared<std::atomic<uint32_t>>(0);
    thread = std::thread([held, done] {
      (*held)->close(false);
      {
        py::gil_scoped_acquire gil;  // the entries own Python objects
        delete held;
      }
      done->store(1, std::memory_order_release);
    });
  } catch (const std::exception& e) {
    // No thread to close it on: `held` stays, and its workers (idle once its queue is served)
    // with it, rather than end the process from a destructor.
    PySys_WriteStderr("apportion: a runtime dropped inside its own worker could not be closed (%s); "
                      "its workers stay until the process exits\n", e.what());
    return;
  }
  std::lock_guard lock(orphans_mu());
  add_orphan(std::move(thread), std::move(done));
}

void join_orphans() {
  for (;;) {
    std::vector<Orphan> all;
    {
      std::lock_guard lock(orphans_mu());
      all.swap(orphans());
    }
    if (all.empty()) return;
    without_gil([&] {
      for (auto& o : all) o.thread.join();
    });
  }
}

[[noreturn]] void raise_own_wait();

class RuntimeCore {
 public:
  RuntimeCore() : pid_(getpid()), generation_(fork_generation.load(std::memory_order_relaxed)) { types(); }
  /// True in a process forked from the one that made this runtime: its workers do not exist
  /// here.
  bool forked() const noexcept { return forked_since(generation_); }

  void check_not_forked() const {
    if (!forked()) return;
    raise(types().runtime_closed,
          "this runtime was made in process " + std::to_string(pid_) + "; process " + std::to_string(getpid()) +
              " is a fork of it, where the runtime's worker threads do not exist: make a new "
              "apportion.Runtime in the child after fork (or use the \"spawn\" start method)");
  }

  RuntimeCore(const RuntimeCore&) = delete;
  const Registry& registry() const noexcept { return *reg_; }
  RuntimeCore& operator=(const RuntimeCore&) = delete;

  ~RuntimeCore() {
    // Collected while still open: cancel what is queued rather than leave threads behind.
    if (interpreter_finalizing() || forked()) {
      // Threads may be gone already and the GIL cannot be handed over: leave everything as is.
      new std::shared_ptr<Registry>(std::move(reg_));
      return;
    }
    if (current_registry == reg_->id()) {
      // Dropped inside one of its own workers (a done-callback, or a garbage collection during
      // a model call): that worker cannot join itself, so another thread closes the runtime.
      close_in_background(std::move(reg_));
      return;
    }
    PyThreadState* state = PyEval_SaveThread();
    reg_->close(false);
    if (interpreter_finalizing() && PyThread_get_thread_ident() != main_thread_ident) {
      // A daemon thread, with Python exiting meanwhile: taking the GIL back would end the
      // thread with a forced unwind, which out of this (noexcept) destructor is std::terminate.
      // The process is exiting: this thread waits for that, holding nothing.
      new std::shared_ptr<Registry>(std::move(reg_));
      for (;;) pause();
    }
    PyEval_RestoreThread(state);
    reg_.reset();  // under the GIL: the entries own Python objects
  }

  /// Registers the model of `spec` (an apportion.ModelSpec, validated by its constructor:
  /// only translated here). `placement`, `memory_policy` and `groups` come from the plan;
  /// `pooled`: every call draws on the scheduled shared pool.
  void add_model(const py::object& spec, py::object make_instance,
                 const std::vector<std::tuple<std::vector<int>, std::vector<int>, int>>& placement,
                 const std::string& memory_policy, const std::vector<uint32_t>& groups, bool pooled) {
    const auto name = spec.attr("name").cast<std::string>();
    check_not_forked();
    check_not_own_worker("add_model()");
    if (reg_->closed()) raise(types().runtime_closed, "runtime is closed: cannot add model '" + name + "'");
    if (reg_->find(name) != nullptr) raise_exists(name);
    ModelOptions opts;
    opts.name = name;
    opts.instances = spec.attr("instances").cast<uint32_t>();
    opts.max_queue = spec.attr("max_queue").cast<std::size_t>();
    opts.spin_ns = static_cast<int64_t>(spec.attr("spin_us").cast<double>() * 1000.0);
    const auto priority_levels = spec.attr("priority_levels").cast<uint32_t>();
    opts.priority_levels = std::max<uint32_t>(priority_levels, 1);
    if (spec.attr("on_timeout").cast<std::string>() == "delay") opts.on_timeout = OnTimeout::delay;
    if (spec.attr("admission").cast<std::string>() == "deadline") opts.admission = Admission::deadline;
    const py::object batching = spec.attr("batching");
    opts.batching = batching_options(batching);
    const auto burst = spec.attr("burst_instances").cast<uint32_t>();
    if (pooled || burst != 0) {
      const py::object weight = spec.attr("weight"), priority_class = spec.attr("priority_class");
      opts.pool = pool_;
      opts.weight = weight.is_none() ? 1.0 : weight.cast<double>();
      opts.priority_class = priority_class.is_none() ? 0 : priority_class.cast<int32_t>();
      opts.pool_units = 1;
      // Pooled: every worker draws on the pool. Burst: only the extra workers do.
      opts.burst_instances = pooled ? 0 : burst;
    }
    // A Batching(max_size=1) model still receives lists: the model's calling convention
    // follows whether batching was asked for, not the size.
    auto handler = std::make_shared<PyHandler>(std::move(make_instance), reg_->id(), !batching.is_none(), name);
    int64_t default_timeout = Request::kNoDeadline;
    if (const py::object t = spec.attr("timeout_ms"); !t.is_none()) {
      default_timeout = timeout_to_ns(name, "timeout_ms", t.cast<double>());
    }
    std::shared_ptr<Model> model;
    try {
      model = std::make_shared<Model>(opts, handler);
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, ("model '" + name + "': no memory for its queue (max_queue=" +
                                          std::to_string(opts.max_queue) + ", its cells are allocated when the model "
                                          "is added): a smaller max_queue, or more memory (ulimit -v)")
                                             .c_str());
      throw py::error_already_set();
    }
    auto e = std::make_shared<ModelEntry>(std::move(model), handler, default_timeout, priority_levels);
    apply_placement(*e->model, placement, memory_policy, groups);  // refused groups: not registered
    const RegistryStatus s = without_gil([&] { return reg_->add(e); });
    switch (s) {
      case RegistryStatus::ok: break;
      case RegistryStatus::exists: raise_exists(name);
      case RegistryStatus::closed:
        raise(types().runtime_closed, reg_->find(name) ? "runtime was closed while model '" + name + "' started"
                                                       : "runtime is closed: cannot add model '" + name + "'");
      case RegistryStatus::start_failed: raise_start_failure(*e);
      default: raise_nested("add_model()");
    }
    warn_pin_errors(*e);
  }

  void start() {
    check_not_forked();
    if (reg_->closed()) raise(types().runtime_closed, "runtime is closed: cannot start it again");
    if (reg_->started()) return;
    check_not_own_worker("start()");
    std::vector<std::shared_ptr<ModelEntry>> failed;
    const RegistryStatus s = without_gil([&] { return reg_->start(&failed); });
    if (s == RegistryStatus::closed) raise(types().runtime_closed, "runtime is closed: cannot start it again");
    if (s == RegistryStatus::nested) raise_nested("start()");
    for (const auto& name : reg_->names()) {
      if (auto e = reg_->find(name)) warn_pin_errors(*e);
    }
    // Every model started even if one failed: the first failure is raised now, with a note
    // naming each other model that failed (each is removed, its queued requests cancelled).
    if (failed.empty()) return;
    const py::object first = start_error(*failed.front());
    for (std::size_t i = 1; i < failed.size(); ++i) {
      first.attr("add_note")("model '" + failed[i]->name() + "' failed to start too and was removed: " +
                             py::str(start_error(*failed[i])).cast<std::string>());
    }
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(first.ptr())), first.ptr());
    throw py::error_already_set();
  }

  void remove_model(const std::string& name, bool drain) {
    check_not_forked();
    check_not_own_worker("remove_model()");
    std::shared_ptr<ModelEntry> removed;  // released below, under the GIL
    const RegistryStatus s = without_gil([&] { return reg_->remove(name, drain, &removed); });
    if (s == RegistryStatus::not_found) raise_not_found(name);
    if (s == RegistryStatus::nested) raise_nested("remove_model()");
  }

  /// submit() for a caller that waits for the result at once (call(), infer()): refused before
  /// admission where that wait could not end (see refuse_own_call), in one call from Python.
  Ref<PyRequest> submit_to_wait(py::str model, py::object input, py::object timeout_ms, py::object priority) {
    refuse_own_call(model);
    return submit(std::move(model), std::move(input), std::move(timeout_ms), std::move(priority));
  }

  Ref<PyRequest> submit(py::str model, py::object input, py::object timeout_ms, py::object priority) {
    auto e = lookup(model);
    Ref<PyRequest> r(new PyRequest);
    prepare(*e, *r, timeout_ms, priority);
    r->input = input.release().ptr();
    r->add_ref();  // the queue's reference
    const Admit a = e->model->submit(r.get());
    if (a != Admit::ok) {
      Py_CLEAR(r->input);
      r->try_claim(RequestState::claimed);
      Request::release(r.get());
      raise_admission(*e, a, 1);
    }
    return r;
  }

  /// A direct call may start now (see Model::direct_allowed): returns its start time, or 0
  /// when the caller must submit instead. Checks the arguments as submit() does; a deadline
  /// cannot pass, since the call starts at once.
  int64_t direct_begin(py::str model, py::object timeout_ms, py::object priority) {
    auto e = lookup(model);
    checked_args(*e, timeout_ms, priority);
    return e->model->direct_allowed() ? now_ns() : 0;
  }

  /// Model::cancel_queued() of `model` (none: nothing to do).
  void cancel_queued(const std::string& model) {
    if (auto e = reg_->find(model)) without_gil([&] { e->model->cancel_queued(); });
  }

  /// Counts a finished direct call. A model removed meanwhile (remove_model waits for the call)
  /// has no stats left to count it in: nothing to do then.
  void direct_end(const std::string& model, bool ok, int64_t start_ns) {
    if (auto e = reg_->find(model)) e->model->count_direct(ok ? Outcome::ok : Outcome::error, start_ns);
  }

  py::list submit_many(py::str model, py::iterable inputs, py::object timeout_ms, py::object priority) {
    // Take every input first: iterating may run any Python code (a generator), including code
    // that removes this model or closes the runtime; the model is looked up afterwards.
    std::vector<py::object> items;
    if (py::isinstance<py::sequence>(inputs)) items.reserve(py::len(inputs));
    for (py::handle x : inputs) items.push_back(py::reinterpret_borrow<py::object>(x));
    auto e = lookup(model);
    std::vector<Ref<PyRequest>> reqs;
    reqs.reserve(items.size());
    for (auto& x : items) {
      Ref<PyRequest> r(new PyRequest);
      prepare(*e, *r, timeout_ms, priority);
      r->input = x.release().ptr();
      reqs.push_back(std::move(r));
    }
    std::vector<Request*> raw;
    raw.reserve(reqs.size());
    for (auto& r : reqs) {
      r->add_ref();  // the queue's reference
      raw.push_back(r.get());
    }
    const Admit a = e->model->submit_n(raw.data(), raw.size());
    if (a != Admit::ok) {
      for (auto& r : reqs) {
        Py_CLEAR(r->input);
        r->try_claim(RequestState::claimed);
        Request::release(r.get());
      }
      raise_admission(*e, a, reqs.size());
    }
    py::list out(reqs.size());
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      out[i] = py::cast(std::move(reqs[i]));
    }
    return out;
  }

  // call() and infer() of model `model` from its own worker (or a done-callback it runs) would
  // wait for it: refused before anything is admitted. Refused after, as result() does, the
  // request still ran (and a model calling itself once per request did so for ever).
  void refuse_own_call(const py::str& model) const {
    if (current_registry == reg_->id() && current_counters != nullptr &&
        model.cast<std::string>() == current_counters->name) {
      raise_own_wait();
    }
  }

  void close(bool drain) {
    if (forked()) return;  // nothing of it runs here; the parent's copy is the one to close
    check_not_own_worker("close()");
    if (!drain || reg_->in_lifecycle() || PyThread_get_thread_ident() != main_thread_ident) {
      // From a callback inside another close() of this runtime: returns at once.
      without_gil([&] { reg_->close(drain); });
      return;
    }
    // A draining close may wait as long as the queued work takes: from the main thread it runs
    // on a thread of its own, so that Ctrl-C interrupts the wait (KeyboardInterrupt; the close
    // goes on and is joined at interpreter exit, or by the next close()).
    auto done = std::make_shared<std::atomic<uint32_t>>(0);
    std::thread closer;
    try {
      closer = std::thread([reg = reg_, done, drain]() mutable {
        reg->close(drain);
        // Dropped before `done`: should this be the last reference (the runtime itself dropped
        // after Ctrl-C), its destructor takes the GIL, and a finished orphan is joined with it held.
        reg.reset();
        done->store(1, std::memory_order_release);
        park_wake(*done);
      });
    } catch (const std::system_error&) {
      // No thread left to wait on: close here (Ctrl-C waits for it), rather than not at all.
      without_gil([&] { reg_->close(drain); });
      return;
    }
    for (;;) {
      without_gil([&] {
        if (done->load(std::memory_order_acquire) == 0) park_wait(*done, 0, kSignalCheckNs);
      });
      if (done->load(std::memory_order_acquire) != 0) break;
      if (PyErr_CheckSignals() != 0) {
        std::lock_guard lock(orphans_mu());
        add_orphan(std::move(closer), done);
        throw py::error_already_set();
      }
    }
    without_gil([&] { closer.join(); });
  }

  /// Placement of a model whose workers have not started: per instance (cpus, memory nodes,
  /// threads), applied by each worker to itself before its factory runs; per own instance its
  /// lane group (empty: one group).
  void set_placement(const std::string& name,
                     const std::vector<std::tuple<std::vector<int>, std::vector<int>, int>>& instances,
                     const std::string& memory_policy, const std::vector<uint32_t>& groups) {
    auto e = reg_->find(name);
    if (e == nullptr) raise_not_found(name);
    apply_placement(*e->model, instances, memory_policy, groups);
  }

  /// Moves a registered model while it serves (before start: changes what it will start
  /// with): `spec` gives its instances, max_queue and batching, `placement` (per instance:
  /// cpus, memory nodes, threads), `memory_policy` and `groups` where they run, and
  /// `make_instance` builds (and warms) each new instance in its worker. Raises the first
  /// exception a new instance's build raised (the old instances still serve), ValueError for a
  /// shape the model cannot take live (nothing moved), ModelNotFound, RuntimeClosed.
  void reshape(const py::object& spec, py::object make_instance,
               const std::vector<std::tuple<std::vector<int>, std::vector<int>, int>>& placement,
               const std::string& memory_policy, const std::vector<uint32_t>& groups) {
    const auto name = spec.attr("name").cast<std::string>();
    check_not_forked();
    check_not_own_worker("apply()");
    auto e = reg_->find(name);
    if (e == nullptr) {
      if (reg_->closed()) raise(types().runtime_closed, "runtime is closed: cannot move model '" + name + "'");
      raise_not_found(name);
    }
    Model::Shape shape;
    shape.instances = spec.attr("instances").cast<uint32_t>();
    shape.max_queue = spec.attr("max_queue").cast<std::size_t>();
    const py::object batching = spec.attr("batching");
    shape.batching = batching_options(batching);
    if (!placement.empty() && placement.size() != shape.instances) {
      PyErr_Format(PyExc_ValueError, "model '%s': placement has %zu instances, the model %u", name.c_str(),
                   placement.size(), shape.instances);
      throw py::error_already_set();
    }
    for (const auto& [cpus, nodes, threads] : placement) {
      shape.placement.push_back(InstancePlacement{cpus, threads, nodes});
    }
    shape.memory_policy =
        enum_or_raise(parse_memory_policy(memory_policy), memory_policy, "memory_policy", kMemoryPolicies);
    shape.instance_group = groups;
    auto& handler = static_cast<PyHandler&>(*e->handler);
    auto previous = handler.swap_factory(std::move(make_instance), !batching.is_none());
    RegistryStatus s = RegistryStatus::ok;
    try {
      s = without_gil([&] { return reg_->reshape(name, std::move(shape)); });
    } catch (...) {
      handler.swap_factory(std::move(previous.first), previous.second);
      throw;  // std::invalid_argument: ValueError, nothing moved
    }
    if (s != RegistryStatus::ok) handler.swap_factory(std::move(previous.first), previous.second);
    switch (s) {
      case RegistryStatus::ok: break;
      case RegistryStatus::not_found: raise_not_found(name);
      case RegistryStatus::closed: raise(types().runtime_closed, "runtime is closed: cannot move model '" + name + "'");
      case RegistryStatus::start_failed: raise_start_failure(*e);
      default: raise_nested("apply()");
    }
    warn_pin_errors(*e);
  }

  /// Sets model `name`'s admission bound alone (see Model::set_max_queue): ValueError beyond
  /// the size its queue was made with, ModelNotFound, RuntimeClosed.
  void set_max_queue(const std::string& name, std::size_t max_queue) {
    check_not_forked();
    RegistryStatus s = reg_->set_max_queue(name, max_queue);  // std::invalid_argument: ValueError
    if (s == RegistryStatus::not_found) raise_not_found(name);
    if (s == RegistryStatus::closed) raise(types().runtime_closed, "runtime is closed: cannot change model '" + name + "'");
  }

  /// Moves model `name` to another class of the scheduled shared pool (see
  /// Model::set_priority_class): ValueError when it does not draw on one or the pool has class
  /// reservations, ModelNotFound, RuntimeClosed.
  void set_priority_class(const std::string& name, int32_t priority_class) {
    check_not_forked();
    RegistryStatus s = reg_->set_priority_class(name, priority_class);  // std::invalid_argument: ValueError
    if (s == RegistryStatus::not_found) raise_not_found(name);
    if (s == RegistryStatus::closed) raise(types().runtime_closed, "runtime is closed: cannot change model '" + name + "'");
  }

  /// Raises ApportionError when called from a worker of this runtime: `what` would wait for
  /// the thread it runs on.
  void check_admin(const std::string& what) const { check_not_own_worker(what.c_str()); }

  bool closed() const { return reg_->closed(); }
  bool started() const { return reg_->started(); }
  std::vector<std::string> model_names() const { return reg_->names(); }

  ModelStatsSnapshot model_stats(const std::string& name) {
    auto e = reg_->find(name);
    if (e == nullptr) raise_not_found(name);
    const Model& m = *e->model;
    return ModelStatsSnapshot{name, m.snapshot(), m.instances(), m.max_queue(), m.groups(), m.moves()};
  }

  /// Model `name`'s class on the scheduled shared pool now; None when it does not draw on one.
  std::optional<int32_t> priority_class(const std::string& name) {
    auto e = reg_->find(name);
    if (e == nullptr) raise_not_found(name);
    return e->model->priority_class();
  }

  /// The shared pool's capacity in units (intra-op threads): one per shared-pool CPU.
  void set_pool_capacity(uint32_t capacity) { pool_->set_capacity(capacity); }
  void set_pool_reserve(const std::vector<std::pair<int32_t, uint32_t>>& reserve, int nice) {
    std::vector<SharedPool::Reservation> r;
    r.reserve(reserve.size());
    for (const auto& [cls, units] : reserve) r.push_back({cls, units});
    pool_->set_reserve(std::move(r), nice);
  }
  uint32_t pool_capacity() const { return pool_->capacity(); }

 private:
  std::shared_ptr<ModelEntry> lookup(py::str model) {
    check_not_forked();
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(model.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    const std::string_view name(data, static_cast<std::size_t>(size));
    auto e = reg_->find(name);
    if (e == nullptr) {
      if (reg_->closed()) raise(types().runtime_closed, "runtime is closed");
      raise_not_found(std::string(name));
    }
    return e;
  }

  [[noreturn]] void raise_not_found(const std::string& name) {
    std::string known;
    for (const auto& n : model_names()) known += (known.empty() ? "'" : ", '") + n + "'";
    // ModelNotFound(message, model=name): .model names what was asked for.
    const py::object e = py::reinterpret_borrow<py::object>(types().model_not_found)(
        "no model named '" + name + "' (registered: " + (known.empty() ? "none" : known) + ")",
        py::arg("model") = name);
    PyErr_SetObject(types().model_not_found, e.ptr());
    throw py::error_already_set();
  }

  [[noreturn]] static void raise_exists(const std::string& name) {
    raise_quota(name, "name", "a model of that name is already registered");
  }

  [[noreturn]] static void raise_nested(const char* what) {
    raise(types().apportion_error,
          std::string(what) + " called from a done-callback that runs inside close(), "
                              "remove_model() or start() of this runtime on the same thread would "
                              "wait for itself; call it from another thread");
  }

  // Why the model failed to start (GIL held): a thread the OS refused, else the first
  // exception its factory raised, else a generic error. Takes both: asked once per failure.
  static py::object start_error(ModelEntry& e) {
    py::object err = static_cast<PyHandler&>(*e.handler).take_error();
    const py::object apportion_error = py::reinterpret_borrow<py::object>(types().apportion_error);
    if (const std::string refused = e.model->take_thread_error(); !refused.empty()) {
      // The root cause: the workers that did start may have failed only for being stopped.
      return apportion_error("model '" + e.name() + "' could not start: " + refused);
    }
    return err ? err : apportion_error("model '" + e.name() + "': an instance failed to start");
  }

  [[noreturn]] static void raise_start_failure(ModelEntry& e) {
    const py::object err = start_error(e);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    throw py::error_already_set();
  }

  // A refused pin is not fatal (the model serves, less isolated than planned): say why.
  static void warn_pin_errors(const ModelEntry& e) {
    for (const auto& why : e.model->pin_errors()) {
      const std::string msg = "model '" + e.name() + "' " + why;
      if (PyErr_WarnEx(types().pinning_warning, msg.c_str(), 1) != 0) throw py::error_already_set();
    }
  }

  [[noreturn]] void raise_admission(const ModelEntry& e, Admit a, std::size_t n) {
    const auto& name = e.name();
    if (a == Admit::closed) {
      raise(types().runtime_closed, reg_->closed() ? "runtime is closed: model '" + name +
                                                         "' accepts no requests"
                                                   : "model '" + name + "' is closed and accepts no requests");
    }
    if (a == Admit::late) {
      const double pace_ms = static_cast<double>(e.model->drain_ns()) / 1e6;
      const double call_ms = static_cast<double>(e.model->expected_wait_ns(0)) / 1e6;  // with its slow margin
      const std::size_t ahead = e.model->queued() + e.model->held();
      const double late_ms = static_cast<double>(e.model->overrun_ns()) / 1e6;
      char detail[300];
      std::snprintf(detail, sizeof detail,
                    "%zu queued or in calls ahead at %.3g ms each while backlogged, then a %.3g ms call: ~%.3g ms, "
                    "and recent requests ran %.3g ms past such estimates",
                    ahead, pace_ms, call_ms, static_cast<double>(e.model->expected_wait_ns(ahead + n - 1)) / 1e6,
                    late_ms);
      raise(types().queue_full, "model '" + name + "': would wait past its deadline (admission=\"deadline\"; " +
                                    detail + "); " + std::to_string(n) +
                                    (n == 1 ? " request" : " requests") + " rejected");
    }
    raise(types().queue_full,
          "model '" + name + "': queue full (max_queue=" +
              std::to_string(e.model->max_queue()) + ", queued=" +
              std::to_string(e.model->queued()) + "); " + std::to_string(n) +
              (n == 1 ? " request" : " requests") + " rejected");
  }

  /// A request's timeout (ns, or kNoDeadline) and priority class.
  struct RequestArgs {
    int64_t timeout_ns;
    std::optional<uint32_t> priority;
  };

  /// The request's timeout and priority after checking both arguments (numpy scalars too);
  /// raises QuotaError naming the model and the field.
  static RequestArgs checked_args(const ModelEntry& e, py::handle timeout_ms, py::handle priority) {
    std::optional<int64_t> requested;
    if (auto ms = optional_number(e.name(), "timeout_ms", timeout_ms)) {
      requested = timeout_to_ns(e.name(), "timeout_ms", *ms, timeout_ms);
    }
    std::optional<uint32_t> level;
    if (!priority.is_none()) {
      int overflow = 0;
      long long p = -1;
      PyObject* o = priority.ptr();
      if (PyLong_Check(o) && !PyBool_Check(o)) {
        p = PyLong_AsLongLongAndOverflow(o, &overflow);
      } else if (!PyBool_Check(o) && PyIndex_Check(o)) {  // numpy integers; a numpy bool has none
        if (PyObject* i = PyNumber_Index(o)) {
          p = PyLong_AsLongLongAndOverflow(i, &overflow);
          Py_DECREF(i);
        } else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
          PyErr_Clear();  // no integer (a numpy bool): refused below
        } else {
          throw py::error_already_set();  // its __index__ raised: as it is
        }
      }
      if (overflow != 0 || !e.priority_ok(p)) {
        raise_quota(e.name(), "priority",
                    "must be an int in [0, " + std::to_string(e.priority_levels) +
                        ") (0 is highest; the model has priority_levels=" + std::to_string(e.priority_levels) +
                        "), got " + py::repr(priority).cast<std::string>());
      }
      level = static_cast<uint32_t>(p);
    }
    return {e.timeout_ns(requested), level};
  }

  void prepare(const ModelEntry& e, PyRequest& r, py::handle timeout_ms, py::handle priority) {
    const RequestArgs a = checked_args(e, timeout_ms, priority);
    if (a.timeout_ns != Request::kNoDeadline) {
      r.deadline_ns = deadline_after(now_ns(), a.timeout_ns);
      r.timeout_ns = a.timeout_ns;
    }
    if (a.priority) r.priority = *a.priority;
  }

  void check_not_own_worker(const char* what) const {
    if (current_registry == reg_->id()) {
      raise(types().apportion_error, std::string(what) + " called from " + current_role + " of model '" +
                                         current_model +
                                         "' of this runtime would wait for itself; call it "
                                         "from outside the model");
    }
  }

  static void apply_placement(Model& m,
                              const std::vector<std::tuple<std::vector<int>, std::vector<int>, int>>& instances,
                              const std::string& memory_policy, const std::vector<uint32_t>& groups) {
    if (m.started()) {
      PyErr_Format(PyExc_RuntimeError, "model '%s' already started: its placement is fixed", m.name().c_str());
      throw py::error_already_set();
    }
    const uint32_t workers = m.options().instances + m.options().burst_instances;
    if (!instances.empty() && instances.size() != workers) {
      PyErr_Format(PyExc_ValueError, "model '%s': placement has %zu instances, the model %u",
                   m.name().c_str(), instances.size(), workers);
      throw py::error_already_set();
    }
    std::vector<InstancePlacement> placement;
    for (const auto& [cpus, nodes, threads] : instances) {
      placement.push_back(InstancePlacement{cpus, threads, nodes});
    }
    const MemoryPolicy policy =
        enum_or_raise(parse_memory_policy(memory_policy), memory_policy, "memory_policy", kMemoryPolicies);
    m.set_placement(std::move(placement), policy, groups);  // invalid_argument: ValueError
  }

  pid_t pid_;
  uint64_t generation_;
  std::shared_ptr<Registry> reg_ = std::make_shared<Registry>();
  // Capacity is set by the Python layer once the shared pool's CPUs are known (at start).
  std::shared_ptr<SharedPool> pool_ = std::make_shared<SharedPool>();
};

// --- Future ---------------------------------------------------------------------------------

// A worker (or a done-callback it runs) waiting for its own model's request waits for a
// worker of that model, possibly itself: with one instance it never returns. Raises then, and
// for a request inherited through fork() (below).
[[noreturn]] void raise_own_wait() {
  const bool timer = current_role == kTimerRole;
  raise(types().apportion_error,
        "model '" + current_model + "': " +
            (timer ? std::string("a done-callback run by the model's deadline timer waits for a request to the "
                                 "same model, which only that timer may expire (every deadline of the model "
                                 "would wait meanwhile); ")
                   : std::string("a worker of the model waits for a request to the same model, which may only "
                                 "run on a worker of that model (a deadlock with one instance); ")) +
            "call another model, or submit without waiting (add_done_callback)");
}

void refuse_endless_wait(const PyRequest& r) {
  if (current_counters != nullptr && current_counters == r.counters.get()) raise_own_wait();
  if (forked_since(r.fork_generation_made)) {
    // A pending request inherited through fork(): the workers that would complete it exist
    // only in the process that submitted it. Waiting for it here waited for ever.
    raise(types().runtime_closed,
          "request to model '" + r.counters->name + "' was submitted before process " +
              std::to_string(getpid()) + " was forked from the one that submitted it: it completes "
              "only there (the runtime's worker threads do not exist in a fork)");
  }
}

// result()'s and exception()'s `timeout`: seconds (any real number but NaN; <= 0 does not
// wait) or None; QuotaError naming the model and the field otherwise, never a binding dump.
std::optional<double> wait_timeout(const PyRequest& r, py::handle timeout_s) {
  const std::optional<double> t = optional_number(r.counters->name, "timeout", timeout_s);
  if (t && std::isnan(*t)) raise_quota(r.counters->name, "timeout", "must be a number of seconds or None, got nan");
  return t;
}

bool wait_for(PyRequest& r, std::optional<double> timeout_s) {
  if (r.done()) return true;
  refuse_endless_wait(r);
  int64_t ns = -1;
  if (timeout_s) {
    if (std::isnan(*timeout_s)) throw py::value_error("timeout must be a number or None");
    ns = *timeout_s <= 0 ? 0 : static_cast<int64_t>(std::min(*timeout_s, 1e9) * 1e9);
  }
  // In slices of kSignalCheckNs, running Python's signal handlers between them (only the main
  // thread has any to run): Ctrl-C interrupts the wait, not the request.
  const int64_t deadline = ns < 0 ? -1 : now_ns() + ns;
  int64_t spin = 50'000;
  for (;;) {
    const int64_t slice = deadline < 0 ? kSignalCheckNs : std::min(kSignalCheckNs, std::max<int64_t>(deadline - now_ns(), 0));
    if (without_gil([&] { return r.wait_done(slice, spin); })) return true;
    if (deadline >= 0 && now_ns() >= deadline) return false;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    spin = 0;  // not imminent: park between checks
  }
}

[[noreturn]] void raise_outcome(PyRequest& r) {
  switch (r.outcome()) {
    case Outcome::error:
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(r.value)), r.value);
      throw py::error_already_set();
    case Outcome::cancelled:
      raise(types().cancelled_error, "request to model '" + r.counters->name + "' was cancelled");
    case Outcome::expired: {
      const double waited_ms = static_cast<double>(r.start_ns - r.submit_ns) / 1e6;
      // The budget as given: the deadline was set a moment before admission stamped submit_ns.
      const double budget_ms = static_cast<double>(r.timeout_ns) / 1e6;
      char buf[320];
      if (r.start_ns <= r.deadline_ns) {
        // A batching worker judged that no batch could finish in time (its measured call time).
        std::snprintf(buf, sizeof buf,
                      "model '%s': deadline of %.3f ms could not be met: after %.3f ms in the "
                      "queue, less time was left than the model's measured call time; the "
                      "request was not run",
                      r.counters->name.c_str(), budget_ms, waited_ms);
      } else {
        std::snprintf(buf, sizeof buf,
                      "model '%s': deadline of %.3f ms passed after %.3f ms in the queue; the "
                      "request was not run",
                      r.counters->name.c_str(), budget_ms, waited_ms);
      }
      raise(types().deadline_exceeded, buf);
    }
    default:
      raise(types().apportion_error, "request has no error");
  }
}

// The collector's view of a Future. result() raises the stored exception itself, so its
// traceback holds the caller's frame, and that frame the Future: a cycle the collector never
// saw, which kept the caller's locals (a server's request body, a runtime) for good. Only a
// completed request's objects are shown: until completion the engine owns the request too (it
// reads input, runs callbacks, and self_obj keeps the Future alive for them), which the
// collector cannot see. Completion happens under the GIL, as collection does. (Tracking every
// Future did not measurably change the round trip: RESULTS, "Futures the collector sees".)
void future_gc(PyHeapTypeObject* heap) {
  PyTypeObject* type = &heap->ht_type;
  type->tp_flags |= Py_TPFLAGS_HAVE_GC;
  type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
    Py_VISIT(Py_TYPE(self));
    if (!py::detail::is_holder_constructed(self)) return 0;
    auto& r = py::cast<PyRequest&>(py::handle(self));
    if (!r.done()) return 0;
    Py_VISIT(r.value);
    Py_VISIT(r.interop);
    return 0;
  };
  type->tp_clear = [](PyObject* self) -> int {
    if (!py::detail::is_holder_constructed(self)) return 0;
    auto& r = py::cast<PyRequest&>(py::handle(self));
    if (!r.done()) return 0;
    // None, not null: a finalizer that revives the Future reads an odd result, not a crash.
    if (r.value != nullptr) Py_SETREF(r.value, Py_NewRef(Py_None));
    Py_CLEAR(r.interop);
    return 0;
  };
}

[[noreturn]] void raise_timeout(const PyRequest& r, double timeout) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", timeout);
  const std::string model = r.counters ? r.counters->name : std::string("?");
  raise(PyExc_TimeoutError, "request to model '" + model + "' not done within " + buf + " s");
}

}  // namespace

void register_engine(py::module_& m) {
  main_thread_ident = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  py::class_<PyRequest, Ref<PyRequest>>(m, "Future", R"doc(
A pending request (concurrent.futures-compatible interface).

Completes exactly once: with a result, the model's exception, DeadlineExceeded, or cancellation.
)doc", py::custom_type_setup(future_gc))
      .def(
          "result",
          [](PyRequest& r, const py::typing::Optional<py::float_>& timeout_s) -> py::object {
            const std::optional<double> timeout = wait_timeout(r, timeout_s);
            if (!wait_for(r, timeout)) raise_timeout(r, timeout.value_or(0));
            if (r.outcome() == Outcome::ok) return py::reinterpret_borrow<py::object>(r.value);
            raise_outcome(r);
          },
          py::arg("timeout") = py::none(),
          "The model's result; raises its exception, DeadlineExceeded or CancelledError. "
          "Waits at most `timeout` seconds (TimeoutError), releasing the GIL while it waits.")
      .def(
          "exception",
          [](PyRequest& r, const py::typing::Optional<py::float_>& timeout_s) -> py::object {
            const std::optional<double> timeout = wait_timeout(r, timeout_s);
            if (!wait_for(r, timeout)) raise_timeout(r, timeout.value_or(0));
            switch (r.outcome()) {
              case Outcome::ok: return py::none();
              case Outcome::error: return py::reinterpret_borrow<py::object>(r.value);
              case Outcome::cancelled: raise_outcome(r);
              default:
                try {
                  raise_outcome(r);
                } catch (py::error_already_set& e) {
                  return e.value();
                }
            }
          },
          py::arg("timeout") = py::none(),
          "The exception the request completed with (None on success); raises CancelledError "
          "if it was cancelled.")
      .def("done", &PyRequest::done, "True once the request completed (in any way).")
      .def(
          "_refuse_own_wait",
          [](const PyRequest& r) {
            if (!r.done()) refuse_endless_wait(r);
          },
          "Raises, as result() would, when a wait for this request could not end: ApportionError "
          "when the calling thread is a worker of its model (or a done-callback it runs), "
          "RuntimeClosed in a process forked since it was submitted; nothing once it is done "
          "(for waits that do not go through result(): an event loop run inside the model).")
      .def("running", [](PyRequest& r) { return r.state() == RequestState::running; },
           "True while a worker executes the model for this request.")
      .def("cancelled",
           [](PyRequest& r) { return r.done() && r.outcome() == Outcome::cancelled; },
           "True if the request was cancelled.")
      .def(
          "cancel",
          [](PyRequest& r) {
            if (r.done()) return r.outcome() == Outcome::cancelled;
            if (!Model::claim_queued(&r)) return false;  // its queue slot is free at once
            finish(&r, Outcome::cancelled, nullptr);
            return true;
          },
          "Cancels the request if it is still queued (it is then never run). Returns whether "
          "the request is cancelled.")
      .def(
          "add_done_callback",
          [](py::object self, py::object fn) {
            auto& r = self.cast<PyRequest&>();
            // Nothing that may run Python code comes between the look at done() and the
            // append: finish() (GIL held) takes the list right after it publishes done, so a
            // completion in between would miss the callback for good. Making the list may
            // collect garbage, and a finaliser may release the GIL to a worker that completes
            // the request: so the list is made first and done() looked at after it.
            if (r.callbacks == nullptr && !r.done()) {
              PyObject* list = PyList_New(0);
              if (list == nullptr) throw py::error_already_set();
              if (r.callbacks == nullptr && !r.done()) {
                r.callbacks = list;
                r.self_obj = self.inc_ref().ptr();
              } else {
                Py_DECREF(list);  // empty: frees no object of anyone's
              }
            }
            if (r.done()) {
              // As for a callback run at completion: reported, never raised.
              PyObject* res = PyObject_CallOneArg(fn.ptr(), self.ptr());
              if (res == nullptr) PyErr_WriteUnraisable(fn.ptr());
              Py_XDECREF(res);
              return;
            }
            // Growing the list reallocates its item array only: no collection, no Python code.
            if (PyList_Append(r.callbacks, fn.ptr()) != 0) throw py::error_already_set();
          },
          py::arg("fn"),
          "Calls fn(future) once the request completes (at once if it already has), in the "
          "thread that completes it. Exceptions from fn are reported, not raised.")
      .def_property_readonly(
          "model", [](PyRequest& r) { return r.counters ? r.counters->name : std::string(); },
          "Name of the model this request was submitted to.")
      .def_property_readonly(
          "_interop",
          [](PyRequest& r) { return r.interop ? py::reinterpret_borrow<py::object>(r.interop) : py::none(); },
          "State that apportion.futures keeps for the stdlib's wait()/as_completed() (None until used).")
      .def(
          "_interop_setdefault",
          [](PyRequest& r, py::object v) {
            if (r.interop == nullptr) r.interop = v.inc_ref().ptr();
            return py::reinterpret_borrow<py::object>(r.interop);
          },
          py::arg("state"), "Stores `state` as _interop unless one is stored; returns the stored one.")
      .def("__repr__", [](PyRequest& r) {
        static const char* names[] = {"pending", "finished", "error", "rejected", "expired",
                                      "cancelled"};
        const char* state = r.state() == RequestState::running ? "running"
                            : r.done() ? names[static_cast<int>(r.outcome())]
                                       : "pending";
        return "<apportion.Future model='" + (r.counters ? r.counters->name : std::string()) +
               "' state=" + state + ">";
      });

  m.def(
      "_set_future_class",
      [](py::object cls) {
        // isinstance() honours an instance's __class__: a property in the type's own dict (a
        // setattr on the type would set the type's metaclass instead).
        auto* type = reinterpret_cast<PyTypeObject*>(py::type::of<PyRequest>().ptr());
        py::object prop = py::module_::import("builtins").attr("property")(
            py::cpp_function([cls](py::handle) { return cls; }));
        if (PyDict_SetItemString(type->tp_dict, "__class__", prop.ptr()) != 0) throw py::error_already_set();
        PyType_Modified(type);
      },
      py::arg("cls"), "Makes apportion.Future instances report `cls` as their __class__.");

  py::class_<RuntimeCore>(m, "_Runtime", "Native core of apportion.Runtime.")
      .def(py::init<>())
      .def("_add_model", &RuntimeCore::add_model, py::arg("spec"), py::arg("make_instance"),
           py::arg("placement"), py::arg("memory_policy"), py::arg("groups"), py::arg("pooled"))
      .def("_set_pool_capacity", &RuntimeCore::set_pool_capacity, py::arg("capacity"))
      .def("_set_pool_reserve", &RuntimeCore::set_pool_reserve, py::arg("reserve"), py::arg("nice"),
           "Class reservations on the scheduled pool: (priority_class, units) pairs, and the nice "
           "offset of the workers of lower classes.")
      .def_property_readonly("_pool_capacity", &RuntimeCore::pool_capacity)
      .def("_start", &RuntimeCore::start)
      .def("_check_admin", &RuntimeCore::check_admin, py::arg("what"))
      .def("_submit_to_wait", &RuntimeCore::submit_to_wait, py::arg("model"), py::arg("inputs"),
           py::arg("timeout_ms"), py::arg("priority"),
           "submit() for call() and infer(), which wait for the result at once: first raises "
           "ApportionError when the calling thread is a worker of model `model` (or a "
           "done-callback it runs), where that wait could not end.")
      .def(
          "_worker_tids",
          [](RuntimeCore& rt, const std::string& name) {
            auto e = rt.registry().find(name);
            return e == nullptr ? std::vector<int>{} : e->model->worker_tids();
          },
          py::arg("model"), "Kernel thread ids of the model's running workers (empty: no such model).")
      .def("_check_not_forked", &RuntimeCore::check_not_forked,
           "Raises RuntimeClosed in a process forked from the one that made this runtime.")
      .def_property_readonly("_forked", &RuntimeCore::forked,
                             "True in a process forked from the one that made this runtime.")
      .def("_reshape", &RuntimeCore::reshape, py::arg("spec"), py::arg("make_instance"),
           py::arg("placement"), py::arg("memory_policy"), py::arg("groups"))
      .def("_set_max_queue", &RuntimeCore::set_max_queue, py::arg("name"), py::arg("max_queue"))
      .def("_set_priority_class", &RuntimeCore::set_priority_class, py::arg("name"), py::arg("priority_class"))
      .def("_set_placement", &RuntimeCore::set_placement, py::arg("name"), py::arg("instances"),
           py::arg("memory_policy"), py::arg("groups") = std::vector<uint32_t>{})
      .def("remove_model", &RuntimeCore::remove_model, py::arg("name"), py::kw_only(),
           py::arg("drain") = true,
           "Unregisters a model: new requests get ModelNotFound; queued ones are finished "
           "(drain=True) or cancelled (drain=False); returns once its workers have exited.")
      .def("submit", &RuntimeCore::submit, py::arg("model"), py::arg("inputs"), py::kw_only(),
           py::arg("timeout_ms") = py::none(), py::arg("priority") = py::none(),
           "Queues one request; returns a Future. Raises QueueFull, ModelNotFound, RuntimeClosed.")
      .def("submit_many", &RuntimeCore::submit_many, py::arg("model"), py::arg("inputs"),
           py::kw_only(), py::arg("timeout_ms") = py::none(), py::arg("priority") = py::none(),
           "Queues one request per item, all or none (QueueFull if they do not all fit); "
           "returns a list of Futures.")
      .def("_direct_begin", &RuntimeCore::direct_begin, py::arg("model"), py::arg("timeout_ms"),
           py::arg("priority"))
      .def("_direct_end", &RuntimeCore::direct_end, py::arg("model"), py::arg("ok"), py::arg("start_ns"))
      .def("_close", &RuntimeCore::close, py::arg("drain"))
      .def("_cancel_queued", &RuntimeCore::cancel_queued, py::arg("model"),
           "Completes the model's queued requests, and those its workers take from now on, as "
           "cancelled (what close without drain does first).")
      .def_property_readonly("closed", &RuntimeCore::closed)
      .def_property_readonly("started", &RuntimeCore::started)
      .def("_model_names", &RuntimeCore::model_names)
      .def("_model_stats", &RuntimeCore::model_stats, py::arg("name"))
      .def("_priority_class", &RuntimeCore::priority_class, py::arg("name"));

  m.def("_lane_cells", &lane_cells, py::arg("max_queue"), py::arg("priority_levels"),
        py::arg("groups"), py::arg("delayed_lane"), py::arg("workers"),
        "Queue cells (64 bytes each) a model's lanes take, as the engine makes them: lanes of "
        "2 x max_queue cells (the delayed lane 2 x max_queue + workers), each rounded up to a "
        "power of two.");
  m.def("_join_orphans", &join_orphans,
        "Waits for the background closes of runtimes that were dropped inside one of their own "
        "workers (called at interpreter exit).");
}

}  // namespace apportion::bindings
