// The simulated device's controls (FASTLOSS_CUDA=SIMULATE builds only): the thread schedule and the
// counters the tests read. Other builds bind nothing here.
#include <pybind11/pybind11.h>

#if defined(FASTLOSS_CUDA_SIMULATED)
#include <string>

#include "sim/sim_core.h"
#endif

namespace py = pybind11;

void bind_simulator(py::module_& m) {
#if defined(FASTLOSS_CUDA_SIMULATED)
  m.def(
      "sim_set_schedule",
      [](const std::string& name, uint64_t seed) {
        fl_sim::Schedule schedule;
        if (!fl_sim::parse_schedule(name, &schedule))
          throw py::value_error("fastloss simulator: schedule must be forward, reverse, random or warp-major, got '" +
                                name + "'");
        fl_sim::set_schedule(schedule, seed);
      },
      py::arg("name"), py::arg("seed") = 0,
      "Sets the order in which the simulated threads of a block (and the blocks of a grid) run.");
  m.def("sim_schedule", [] { return std::string(fl_sim::schedule_name(fl_sim::schedule())); });
  m.def("sim_stats", [] {
    const fl_sim::Stats& s = fl_sim::stats();
    py::dict out;
    out["launches"] = s.launches;
    out["blocks"] = s.blocks;
    out["threads"] = s.threads;
    out["context_switches"] = s.context_switches;
    out["sync_calls"] = s.sync_calls;
    out["host_polls"] = s.host_polls;
    return out;
  });
#else
  (void)m;
#endif
}
