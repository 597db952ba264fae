// Which instruction set the kernels run: Highway's choice (the best target compiled here
// that the CPU supports), narrowed on request so that one machine can exercise every
// path it can run (PDSERVE_CPU_TARGET, tests).

#include "kernels.h"  // first: it sets Highway's targets

#include <cstdint>
#include <string>
#include <vector>

#include "hwy/highway.h"  // HWY_TARGETS as the kernels were compiled
#include "hwy/targets.h"

namespace pdserve {
namespace {

struct Name {
  int64_t target;
  const char* name;
};

// pdserve's names, by the CPU flags a user knows, for Highway's targets.
constexpr Name kNames[] = {
    {HWY_AVX3_DL, "avx512_vnni"}, {HWY_AVX3, "avx512"},   {HWY_AVX2, "avx2"},
    {HWY_SSE4, "sse4"},           {HWY_SSSE3, "ssse3"},   {HWY_SVE2_128, "sve2_128"},
    {HWY_SVE_256, "sve_256"},     {HWY_SVE2, "sve2"},     {HWY_SVE, "sve"},
    {HWY_NEON, "neon"},           {HWY_EMU128, "scalar"}, {HWY_SCALAR, "scalar"},
};

std::string name_of(int64_t target) {
  for (const Name& n : kNames)
    if (n.target == target) return n.name;
  return hwy::TargetName(target);
}

// Compiled here and supported by the CPU (or by the current narrowing), best first:
// Highway numbers better targets lower.
std::vector<int64_t> available() {
  std::vector<int64_t> found;
  for (int64_t bits = hwy::SupportedTargets() & HWY_TARGETS; bits != 0; bits &= bits - 1)
    found.push_back(bits & -bits);
  return found;
}

int64_t narrowed = 0;  // the one target dispatch is held to, or 0

}  // namespace

void serial(int64_t n, const RangeBody& body) {
  if (n > 0) body(0, n);
}

std::string current_target() {
  const std::vector<int64_t> targets = available();
  return targets.empty() ? "none" : name_of(targets.front());
}

std::vector<std::string> runnable_targets() {
  const int64_t held = narrowed;
  if (held) hwy::SetSupportedTargetsForTest(0);  // see past the narrowing
  std::vector<std::string> names;
  for (int64_t target : available()) names.push_back(name_of(target));
  if (held) hwy::SetSupportedTargetsForTest(held);
  return names;
}

bool use_target(const std::string& name) {
  if (name.empty()) {
    narrowed = 0;
    hwy::SetSupportedTargetsForTest(0);
    return true;
  }
  const int64_t held = narrowed;
  if (held) hwy::SetSupportedTargetsForTest(0);
  for (int64_t target : available()) {
    if (name_of(target) == name) {
      narrowed = target;
      hwy::SetSupportedTargetsForTest(target);
      return true;
    }
  }
  if (held) hwy::SetSupportedTargetsForTest(held);
  return false;
}

}  // namespace pdserve
