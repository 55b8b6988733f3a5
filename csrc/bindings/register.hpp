// One register function per area; module.cpp only calls them (see STYLE.md).
#pragma once

#include <pybind11/pybind11.h>

namespace apportion::bindings {

void register_engine(pybind11::module_& m);
void register_topology(pybind11::module_& m);
void register_placement(pybind11::module_& m);
void register_gpu(pybind11::module_& m);
void register_process(pybind11::module_& m);
void register_stats(pybind11::module_& m);

}  // namespace apportion::bindings
