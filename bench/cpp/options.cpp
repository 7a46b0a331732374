// Parsing of the command line; both "--json PATH" and "--json=PATH" are accepted.
#include "options.h"

#include <cstring>

namespace fl_bench {

const char* usage_text() {
  return "usage: fastloss_bench [--quick] [--json PATH] [--filter SUBSTRING] [--device cpu|cuda|all]\n"
         "  --quick       small shapes and few samples (CI smoke run, seconds)\n"
         "  --json PATH   also write the results as JSON to PATH\n"
         "  --filter S    only cases whose label name/dtype/shape contains S,\n"
         "                e.g. 'zloss/fwd/', 'bfloat16', '/64x32768'\n"
         "  --device D    cpu, cuda or all (default all); CUDA cases are skipped\n"
         "                when the build has no CUDA or no GPU is visible\n"
         "exit status: 0 all selected cases ran (or were skipped), 1 a case or the\n"
         "JSON output failed, 2 bad command line\n";
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    // Reads the value of "--name VALUE" or "--name=VALUE"; false when `arg` is another flag.
    auto value_of = [&](const char* name, std::string* value) {
      const size_t length = std::strlen(name);
      if (arg == name) {
        if (i + 1 >= argc) throw UsageError(std::string(name) + " needs a value");
        *value = argv[++i];
        return true;
      }
      if (arg.compare(0, length, name) == 0 && arg.size() > length && arg[length] == '=') {
        *value = arg.substr(length + 1);
        return true;
      }
      return false;
    };
    std::string device;
    if (arg == "--quick") {
      options.quick = true;
    } else if (arg == "--help" || arg == "-h") {
      options.help = true;
    } else if (value_of("--json", &options.json_path)) {
      if (options.json_path.empty()) throw UsageError("--json needs a non-empty path");
    } else if (value_of("--filter", &options.filter)) {
      // any string, the empty one included (matches every case)
    } else if (value_of("--device", &device)) {
      if (device != "cpu" && device != "cuda" && device != "all") {
        throw UsageError("--device must be cpu, cuda or all, got '" + device + "'");
      }
      options.cpu = device != "cuda";
      options.cuda = device != "cpu";
    } else {
      throw UsageError("unknown argument '" + arg + "'");
    }
  }
  return options;
}

}  // namespace fl_bench
