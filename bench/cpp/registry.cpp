// Storage behind the registrars. Function-local statics, because registrars in
// other files run during static initialization, in an order C++ leaves open.
#include "registry.h"

#include <algorithm>
#include <string>
#include <utility>

namespace fl_bench {
namespace {

std::vector<std::pair<std::string, CaseGenerator>>& families() {
  static std::vector<std::pair<std::string, CaseGenerator>> list;
  return list;
}

std::vector<std::unique_ptr<Backend>>& backends() {
  static std::vector<std::unique_ptr<Backend>> list;
  return list;
}

}  // namespace

FamilyRegistrar::FamilyRegistrar(const char* key, CaseGenerator generate) { families().emplace_back(key, generate); }

BackendRegistrar::BackendRegistrar(std::unique_ptr<Backend> backend) { backends().push_back(std::move(backend)); }

std::vector<CaseSpec> registered_cases(bool quick) {
  // Sorted by key so that the output order does not depend on the link order.
  auto sorted = families();
  std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<CaseSpec> cases;
  for (const auto& family : sorted) {
    std::vector<CaseSpec> more = family.second(quick);
    cases.insert(cases.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  return cases;
}

Backend* find_backend(Device device) {
  for (const auto& backend : backends()) {
    if (backend->device() == device) return backend.get();
  }
  return nullptr;
}

void shutdown_backends() {
  for (const auto& backend : backends()) backend->shutdown();
}

}  // namespace fl_bench
