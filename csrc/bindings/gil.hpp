// Running native code without the GIL, safely for a thread still waiting when Python exits.
#pragma once

#include <Python.h>

#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace apportion::bindings {

/// Runs `f()` with the GIL released and returns what it returns (or rethrows what it threw),
/// the GIL held again. The GIL is taken back by a plain call, never from a destructor: a daemon
/// thread that takes it back while the interpreter finalizes is ended by CPython
/// (pthread_exit, a forced unwind), and a forced unwind leaving a noexcept destructor such as
/// pybind11's gil_scoped_release calls std::terminate: the whole process aborted at exit.
template <class F>
decltype(auto) without_gil(F&& f) {
  using R = std::invoke_result_t<F>;
  PyThreadState* state = PyEval_SaveThread();
  std::exception_ptr error;
  if constexpr (std::is_void_v<R>) {
    try {
      std::forward<F>(f)();
    } catch (...) {
      error = std::current_exception();
    }
    PyEval_RestoreThread(state);
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<R> out;
    try {
      out.emplace(std::forward<F>(f)());
    } catch (...) {
      error = std::current_exception();
    }
    PyEval_RestoreThread(state);
    if (error) std::rethrow_exception(error);
    return R(std::move(*out));
  }
}

}  // namespace apportion::bindings
