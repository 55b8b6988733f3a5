// Enums cross the binding as bound types whose member names are the Python API's words; a word
// from Python is parsed by the core's own parser (parse_memory_policy, ...), so each enum's
// words are written once, in its to_string.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace apportion::bindings {

/// Binds enum E as a class whose members are named by to_string (e.g. MemoryPolicy.bind).
template <class E, std::size_t N>
pybind11::enum_<E> bind_enum(pybind11::handle scope, const char* name, const std::array<E, N>& all,
                             const char* doc) {
  pybind11::enum_<E> e(scope, name, doc);
  for (E v : all) e.value(std::string(to_string(v)).c_str(), v);
  return e;
}

/// `parsed` (the core parser's answer for `word`), or a ValueError naming `field` and the words
/// it takes.
template <class E, std::size_t N>
E enum_or_raise(std::optional<E> parsed, std::string_view word, const char* field, const std::array<E, N>& all) {
  if (parsed) return *parsed;
  std::string words;
  for (std::size_t i = 0; i < N; ++i) {
    if (i != 0) words += i + 1 == N ? " or " : ", ";
    words += "\"" + std::string(to_string(all[i])) + "\"";
  }
  throw pybind11::value_error(std::string(field) + " must be " + words + ", not \"" + std::string(word) + "\"");
}

}  // namespace apportion::bindings
