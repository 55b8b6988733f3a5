// Python skin of the metrics: histogram snapshots (buckets, windows, quantiles) and model
// snapshots as read-only types, so Python reads fields by name instead of dict keys. Every call
// here is microseconds: the GIL is held throughout.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/typing.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "apportion/histogram.hpp"
#include "bindings/register.hpp"
#include "bindings/stats.hpp"

namespace py = pybind11;

namespace apportion::bindings {
namespace {

using Snapshot = LogHistogram::Snapshot;

// A histogram Python can record into (tests and callers who keep their own latencies); its
// snapshots carry an origin of their own.
struct RecordingHistogram {
  LogHistogram hist;
  const uint64_t origin = LogHistogram::new_origins(1);

  Snapshot snapshot() const {
    Snapshot s;
    hist.snapshot_into(s);
    s.origin = origin;
    return s;
  }
};

double checked_q(double q) {
  if (!(q >= 0.0 && q <= 1.0)) {  // also refuses NaN
    throw py::value_error("quantile: q must be in [0, 1] (0.99 is p99), got " + py::repr(py::float_(q)).cast<std::string>());
  }
  return q;
}

using IntTuple = py::typing::Tuple<py::int_, py::ellipsis>;

// Bucket bounds are the same for every snapshot: built once (leaked, like every cached Python
// object here: nothing may release it after the interpreter is gone).
IntTuple upper_bounds() {
  static const py::tuple* bounds = [] {
    auto* t = new py::tuple(LogHistogram::kBuckets);
    for (std::size_t i = 0; i < LogHistogram::kBuckets; ++i) {
      (*t)[i] = py::int_(LogHistogram::bucket_high(i));
    }
    return t;
  }();
  return py::reinterpret_borrow<IntTuple>(*bounds);
}

IntTuple counts_of(const Snapshot& s) {
  py::tuple out(LogHistogram::kBuckets);
  for (std::size_t i = 0; i < LogHistogram::kBuckets; ++i) out[i] = py::int_(s.counts[i]);
  return py::reinterpret_steal<IntTuple>(out.release());
}

}  // namespace

void register_stats(py::module_& m) {
  py::class_<Snapshot>(
      m, "HistogramSnapshot",
      "The buckets of a log-bucket histogram at one moment (or of a window: a later snapshot minus\n"
      "an earlier one). Values are integers in the histogram's unit: nanoseconds for latencies,\n"
      "requests for batch sizes. Bucket i holds the values in (upper_bounds[i-1], upper_bounds[i]];\n"
      "32 buckets per power of two, so a quantile is within ~3% of the truth. Immutable.")
      .def_property_readonly("count", [](const Snapshot& s) { return s.total; },
                             "Values recorded (the sum of counts).")
      .def_property_readonly("sum", [](const Snapshot& s) { return s.sum; },
                             "Sum of the values recorded, in the histogram's unit (exact).")
      .def_property_readonly("max", [](const Snapshot& s) { return s.max; },
                             "Largest value recorded, in the histogram's unit; 0 when empty. For a window: exact when\n"
                             "the maximum grew in it, else the top of its highest non-empty bucket (capped at the\n"
                             "later snapshot's max).")
      .def_property_readonly("mean", &Snapshot::mean, "sum / count in the histogram's unit; 0.0 when empty.")
      .def_property_readonly("counts", &counts_of,
                             "Values per bucket, one per upper bound (built on each access).")
      .def_property_readonly(
          "upper_bounds", [](const Snapshot&) { return upper_bounds(); },
          "The largest value each bucket holds, in the histogram's unit, ascending (the same for every\n"
          "snapshot); the last bucket also holds every value clamped into it (2**64 - 1).")
      .def_property_readonly("origin", [](const Snapshot& s) { return s.origin; },
                             "Which histogram this is a snapshot of (0: not said); windows need equal origins.")
      .def("quantile", [](const Snapshot& s, double q) { return s.quantile(checked_q(q)); }, py::arg("q"),
           "The value at quantile q in [0, 1] (0.99: p99), in the histogram's unit: the midpoint of the\n"
           "bucket holding rank round(q * count), never above max; 0 when empty. Raises ValueError for q\n"
           "outside [0, 1].")
      .def("subtract", &Snapshot::subtract, py::arg("earlier"),
           "What was recorded between `earlier` and this snapshot of the same histogram (a window):\n"
           "counts and sum are differences, so quantiles are the window's own. Raises ValueError when\n"
           "the two are snapshots of different histograms or `earlier` holds more in some bucket (it\n"
           "was taken later, or the arguments are swapped).")
      .def("__repr__",
           [](const Snapshot& s) {
             return "<HistogramSnapshot count=" + std::to_string(s.total) + " sum=" + std::to_string(s.sum) +
                    " max=" + std::to_string(s.max) + ">";
           })
      .def(py::pickle(
          [](const Snapshot& s) {
            std::vector<uint64_t> counts(s.counts.begin(), s.counts.end());
            return py::make_tuple(counts, s.sum, s.max, s.origin);
          },
          [](const py::tuple& t) {
            if (t.size() != 4) throw py::value_error("HistogramSnapshot: bad pickled state");
            auto counts = t[0].cast<std::vector<uint64_t>>();
            if (counts.size() != LogHistogram::kBuckets) {
              throw py::value_error("HistogramSnapshot: pickled with " + std::to_string(counts.size()) +
                                    " buckets, this build has " + std::to_string(LogHistogram::kBuckets));
            }
            Snapshot s;
            for (std::size_t i = 0; i < counts.size(); ++i) {
              s.counts[i] = counts[i];
              s.total += counts[i];
            }
            s.sum = t[1].cast<uint64_t>();
            s.max = t[2].cast<uint64_t>();
            s.origin = t[3].cast<uint64_t>();
            return s;
          }));

  py::class_<RecordingHistogram>(
      m, "LogHistogram",
      "A log-bucket histogram of non-negative integers (the engine's latency histogram): record()\n"
      "values, snapshot() the buckets. One writer at a time; snapshots may be taken meanwhile.")
      .def(py::init<>())
      .def("record", [](RecordingHistogram& h, uint64_t v) { h.hist.record(v); }, py::arg("value"),
           "Record one value (an integer >= 0, e.g. nanoseconds).")
      .def("snapshot", &RecordingHistogram::snapshot, "The buckets now.");

  py::class_<ModelStatsSnapshot>(
      m, "ModelSnapshot",
      "One model's counters and histograms at one moment (apportion.ModelStats is built from it).\n"
      "Counters count requests since the model was added; latency histograms are in nanoseconds.")
      .def_readonly("name", &ModelStatsSnapshot::name)
      .def_readonly("instances", &ModelStatsSnapshot::instances, "Worker instances (burst instances excluded).")
      .def_readonly("max_queue", &ModelStatsSnapshot::max_queue, "Admission bound, in requests.")
      .def_readonly("lane_groups", &ModelStatsSnapshot::lane_groups,
                    "Queues the model keeps (one per NUMA node its instances span; at least 1).")
      .def_readonly("moves", &ModelStatsSnapshot::moves,
                    "Live moves (Runtime.apply) that moved the model while it served.")
#define AP_COUNTER(field, doc) \
  .def_property_readonly(#field, [](const ModelStatsSnapshot& s) { return s.snapshot.field; }, doc)
      AP_COUNTER(submitted, "Requests submitted, admitted or refused.")
      AP_COUNTER(completed, "Requests that returned a result.")
      AP_COUNTER(failed, "Requests that raised the model's exception (or whose worker crashed).")
      AP_COUNTER(rejected, "Submissions refused (queue full, or the model or runtime closing).")
      AP_COUNTER(expired, "Requests whose deadline passed before they started.")
      AP_COUNTER(cancelled, "Requests cancelled before they started.")
      AP_COUNTER(queued, "Queue slots taken now: requests waiting, plus cancelled or expired ones beyond the spare room.")
      AP_COUNTER(delayed, "Requests moved behind the others by on_timeout=\"delay\".")
      AP_COUNTER(burst_served, "Requests served by burst workers on the shared pool.")
      AP_COUNTER(stolen, "Requests an instance took from another NUMA node's queue.")
      AP_COUNTER(direct, "Requests served by their callers directly (Runtime.call on a process model).")
      AP_COUNTER(running_calls, "Model calls the model's workers are in now (a batch's call counts once).")
      AP_COUNTER(oldest_call_ns, "How long the oldest of those calls has run, in nanoseconds (0: none).")
#undef AP_COUNTER
      .def_property_readonly("pool_calls", [](const ModelStatsSnapshot& s) { return s.snapshot.pool_grants; },
                             "Model calls granted shared-pool units.")
      .def_property_readonly("pool_time_ns",
                             [](const ModelStatsSnapshot& s) { return s.snapshot.pool_busy_unit_ns; },
                             "Shared-pool time those calls held, in nanoseconds x units (call duration x\n"
                             "intra-op threads, summed).")
#define AP_HISTOGRAM(field, doc)                                                                         \
  .def_property_readonly(                                                                                \
      #field, [](const ModelStatsSnapshot& s) -> const Snapshot& { return s.snapshot.field; }, \
      py::return_value_policy::reference_internal, doc)
      AP_HISTOGRAM(queue_wait, "Time from admission to the start of the call, in nanoseconds.")
      AP_HISTOGRAM(compute, "Duration of the model call that served each request, in nanoseconds.")
      AP_HISTOGRAM(end_to_end, "Time from admission to completion, in nanoseconds.")
      AP_HISTOGRAM(batch_size, "Requests per model call (one value per call).")
#undef AP_HISTOGRAM
      .def("__repr__", [](const ModelStatsSnapshot& s) {
        return "<ModelSnapshot " + s.name + " submitted=" + std::to_string(s.snapshot.submitted) + ">";
      });
}

}  // namespace apportion::bindings
