#include <pybind11/pybind11.h>

#include "bindings/register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "apportion native core: engine, queue, metrics, topology, placement, GPU partitioner";
#if defined(APPORTION_WITH_CUDA)
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  apportion::bindings::register_stats(m);
  apportion::bindings::register_engine(m);
  apportion::bindings::register_topology(m);
  apportion::bindings::register_placement(m);
  apportion::bindings::register_gpu(m);
  apportion::bindings::register_process(m);
}
