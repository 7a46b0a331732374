// fastloss_bench: times every registered case (see registry.h) on the selected
// devices, prints a table and optionally writes JSON. Knows no kernel family:
// a family registers its cases from its own bench_<family>.cpp / .cu.
#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"
#include "options.h"
#include "registry.h"
#include "report.h"

#ifndef FASTLOSS_VERSION_STRING
#define FASTLOSS_VERSION_STRING "unknown"
#endif

namespace fl_bench {
namespace {

struct Selection {
  std::vector<const CaseSpec*> runnable;
  std::vector<SkippedCase> skipped;
  bool failed = false;       // a backend that is present failed to set up
  bool cuda_absent = false;  // CUDA asked for, but the build has none
};

Selection select_cases(const Options& options, const std::vector<CaseSpec>& cases) {
  Selection selection;
  for (const Device device : {Device::Cpu, Device::Cuda}) {
    if (!(device == Device::Cpu ? options.cpu : options.cuda)) continue;
    std::vector<const CaseSpec*> matching;
    for (const CaseSpec& spec : cases) {
      if (spec.device == device && spec.label().find(options.filter) != std::string::npos) matching.push_back(&spec);
    }
    Backend* backend = find_backend(device);
    if (!backend) {  // only CUDA can be missing, and then no CUDA case was compiled either
      selection.cuda_absent = true;
      continue;
    }
    if (matching.empty()) continue;  // nothing to run: do not even probe the device
    std::string reason;
    try {
      reason = backend->unavailable_reason();
    } catch (const std::exception& error) {
      std::fprintf(stderr, "error: setting up %s failed: %s\n", device_name(device), error.what());
      selection.failed = true;
      continue;
    }
    for (const CaseSpec* spec : matching) {
      if (reason.empty()) {
        selection.runnable.push_back(spec);
      } else {
        selection.skipped.push_back(SkippedCase{spec, reason});
      }
    }
  }
  return selection;
}

// Prepares, times and checks one case; throws on any failure.
CaseResult measure(const CaseSpec& spec, const SamplingPlan& plan) {
  Backend& backend = *find_backend(spec.device);
  const std::unique_ptr<PreparedCase> work = spec.prepare(backend.context());
  std::vector<double> samples = collect_samples(plan, [&] { return backend.time_sample(*work); });
  work->verify();
  const Summary summary = summarize(std::move(samples));
  const double gbps = summary.median_s > 0 ? static_cast<double>(spec.bytes) / summary.median_s * 1e-9 : 0.0;
  return CaseResult{&spec, summary, gbps};
}

int run(const Options& options) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<CaseSpec> cases = registered_cases(options.quick);
  Selection selection = select_cases(options, cases);
  bool failed = selection.failed;
  if (selection.cuda_absent) std::printf("note: cuda cases skipped: fastloss_bench was built without CUDA\n");
  if (selection.runnable.empty() && selection.skipped.empty() && !failed &&
      !(selection.cuda_absent && !options.cpu)) {
    std::fprintf(stderr, "fastloss_bench: no case matches --filter '%s'\n", options.filter.c_str());
    return 2;
  }

  RunInfo info{FASTLOSS_VERSION_STRING, utc_now_iso8601(), host_name(), find_backend(Device::Cpu)->description()};
  for (const CaseSpec* spec : selection.runnable) {
    if (spec->device == Device::Cuda) info.device = find_backend(Device::Cuda)->description();
  }
  std::printf("fastloss_bench %s on %s, %s%s\n", info.version.c_str(), info.host.c_str(), info.device.c_str(),
              options.quick ? " (quick)" : "");

  const TablePrinter table(stdout, selection.runnable);
  if (!selection.runnable.empty()) table.header();
  std::vector<CaseResult> results;
  for (const CaseSpec* spec : selection.runnable) {
    try {
      results.push_back(measure(*spec, options.quick ? quick_plan() : default_plan()));
      table.row(results.back());
    } catch (const std::exception& error) {
      std::fprintf(stderr, "error: %s on %s: %s\n", spec->label().c_str(), device_name(spec->device), error.what());
      failed = true;
    }
  }
  // One line per device: every skipped case of a device shares the reason.
  for (const Device device : {Device::Cpu, Device::Cuda}) {
    int count = 0;
    std::string reason;
    for (const SkippedCase& skip : selection.skipped) {
      if (skip.spec->device != device) continue;
      ++count;
      reason = skip.reason;
    }
    if (count) std::printf("skipped %d %s cases: %s\n", count, device_name(device), reason.c_str());
  }

  if (!options.json_path.empty()) {
    try {
      write_json(options.json_path, info, results, selection.skipped);
      std::printf("wrote %s\n", options.json_path.c_str());
    } catch (const std::exception& error) {
      std::fprintf(stderr, "error: %s\n", error.what());
      failed = true;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%zu cases ran, %zu skipped, %s in %.1f s\n", results.size(), selection.skipped.size(),
              failed ? "FAILED" : "ok", seconds);
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace fl_bench

int main(int argc, char** argv) {
  fl_bench::Options options;
  try {
    options = fl_bench::parse_options(argc, argv);
  } catch (const fl_bench::UsageError& error) {
    std::fprintf(stderr, "fastloss_bench: %s\n%s", error.what(), fl_bench::usage_text());
    return 2;
  }
  if (options.help) {
    std::fputs(fl_bench::usage_text(), stdout);
    return 0;
  }
  int status = 1;
  try {
    status = fl_bench::run(options);
  } catch (const std::exception& error) {  // outside any case: registration, metadata
    std::fprintf(stderr, "fastloss_bench: %s\n", error.what());
  }
  fl_bench::shutdown_backends();
  return status;
}
