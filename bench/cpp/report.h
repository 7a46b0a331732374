// Output of fastloss_bench: the table on stdout, printed row by row as cases
// finish, and the JSON file that CI and the Python tooling read.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "harness.h"

namespace fl_bench {

struct CaseResult {
  const CaseSpec* spec;
  Summary summary;
  double gbps;  // spec->bytes / median
};

struct SkippedCase {
  const CaseSpec* spec;
  std::string reason;
};

struct RunInfo {
  std::string version;
  std::string date;    // ISO-8601 UTC
  std::string host;
  std::string device;  // the GPU name when CUDA cases ran, else "cpu (N threads)"
};

std::string utc_now_iso8601();
std::string host_name();

// Fixed-width table; widths come from the cases to be printed.
class TablePrinter {
 public:
  TablePrinter(std::FILE* out, const std::vector<const CaseSpec*>& cases);
  void header() const;
  void row(const CaseResult& result) const;

 private:
  std::FILE* out_;
  int name_width_ = 4;
  int shape_width_ = 5;
};

// Throws std::runtime_error when the file cannot be written.
void write_json(const std::string& path, const RunInfo& info, const std::vector<CaseResult>& results,
                const std::vector<SkippedCase>& skipped);

}  // namespace fl_bench
