// The table and the JSON file, plus the run metadata they carry.
#include "report.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <stdexcept>

namespace fl_bench {

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::string host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

TablePrinter::TablePrinter(std::FILE* out, const std::vector<const CaseSpec*>& cases) : out_(out) {
  for (const CaseSpec* spec : cases) {
    name_width_ = std::max(name_width_, static_cast<int>(spec->name.size()));
    shape_width_ = std::max(shape_width_, static_cast<int>(spec->shape().size()));
  }
}

void TablePrinter::header() const {
  std::fprintf(out_, "%-*s  %-6s  %-8s  %-*s  %12s  %12s  %12s  %9s\n", name_width_, "case", "device", "dtype",
               shape_width_, "shape", "median us", "p20 us", "p80 us", "GB/s");
  std::fflush(out_);
}

void TablePrinter::row(const CaseResult& r) const {
  const CaseSpec& s = *r.spec;
  std::fprintf(out_, "%-*s  %-6s  %-8s  %-*s  %12.2f  %12.2f  %12.2f  %9.2f\n", name_width_, s.name.c_str(),
               device_name(s.device), s.dtype.c_str(), shape_width_, s.shape().c_str(), r.summary.median_s * 1e6,
               r.summary.p20_s * 1e6, r.summary.p80_s * 1e6, r.gbps);
  std::fflush(out_);  // rows appear as cases finish, also when piped into a CI log
}

namespace {

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// Microseconds with nanosecond resolution; the CUDA event clock is about 0.5 us.
std::string json_number(double value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.3f", value);
  return text;
}

std::string case_head(const CaseSpec& s) {
  return "{\"name\": " + json_string(s.name) + ", \"device\": " + json_string(device_name(s.device)) +
         ", \"dtype\": " + json_string(s.dtype) + ", \"shape\": {\"rows\": " + std::to_string(s.rows) +
         ", \"cols\": " + std::to_string(s.cols) + "}";
}

}  // namespace

void write_json(const std::string& path, const RunInfo& info, const std::vector<CaseResult>& results,
                const std::vector<SkippedCase>& skipped) {
  std::string text = "{\n  \"tool\": \"fastloss_bench\",\n";
  text += "  \"version\": " + json_string(info.version) + ",\n";
  text += "  \"date\": " + json_string(info.date) + ",\n";
  text += "  \"host\": " + json_string(info.host) + ",\n";
  text += "  \"device\": " + json_string(info.device) + ",\n";
  text += "  \"cases\": [";
  for (size_t i = 0; i < results.size(); ++i) {
    const CaseResult& r = results[i];
    text += i ? ",\n    " : "\n    ";
    text += case_head(*r.spec) + ", \"samples\": " + std::to_string(r.summary.samples) +
            ", \"median_us\": " + json_number(r.summary.median_s * 1e6) +
            ", \"p20_us\": " + json_number(r.summary.p20_s * 1e6) +
            ", \"p80_us\": " + json_number(r.summary.p80_s * 1e6) +
            ", \"min_us\": " + json_number(r.summary.min_s * 1e6) + ", \"bytes\": " + std::to_string(r.spec->bytes) +
            ", \"gbps\": " + json_number(r.gbps) + "}";
  }
  text += results.empty() ? "],\n" : "\n  ],\n";
  // Separate from "cases", so that every entry there has numbers to read.
  text += "  \"skipped\": [";
  for (size_t i = 0; i < skipped.size(); ++i) {
    text += i ? ",\n    " : "\n    ";
    text += case_head(*skipped[i].spec) + ", \"reason\": " + json_string(skipped[i].reason) + "}";
  }
  text += skipped.empty() ? "]\n}\n" : "\n  ]\n}\n";

  std::FILE* file = std::fopen(path.c_str(), "w");
  if (!file) throw std::runtime_error("cannot open '" + path + "' for writing: " + std::strerror(errno));
  const bool written = std::fwrite(text.data(), 1, text.size(), file) == text.size();
  const bool closed = std::fclose(file) == 0;
  if (!written || !closed) throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
}

}  // namespace fl_bench
