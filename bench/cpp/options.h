// Command line of fastloss_bench.
#pragma once

#include <stdexcept>
#include <string>

namespace fl_bench {

struct Options {
  bool quick = false;
  bool help = false;
  std::string json_path;  // empty: no JSON file
  std::string filter;     // substring of a case label ("name/dtype/shape"); empty: all
  bool cpu = true;        // --device cpu|cuda|all
  bool cuda = true;
};

// A malformed command line; main prints the message and the usage, exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

Options parse_options(int argc, char** argv);
const char* usage_text();

}  // namespace fl_bench
