// lf::cpu_isa(): CPU feature detection (cached) plus the LENGEN_CPU_ISA override (read per call).
#include "common/isa.h"

#include <cstdlib>
#include <cstring>

#include "common/checks.h"

namespace lf {

namespace {

struct Features {
  bool avx2 = false, avx512 = false, avx512vbmi = false;
};

Features detect() {
  Features f;
#if LF_X86
  // libgcc's __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state (XCR0).
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f");
  f.avx512vbmi = f.avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi");
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "portable";
  }
}

Isa cpu_isa_detected() {
  const Features& f = features();
  return f.avx512 ? Isa::kAvx512 : f.avx2 ? Isa::kAvx2 : Isa::kPortable;
}

bool cpu_has_avx512vbmi() { return features().avx512vbmi; }

Isa cpu_isa() {
  const Isa best = cpu_isa_detected();
  const char* env = std::getenv("LENGEN_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want = best;
  if (std::strcmp(env, "portable") == 0) want = Isa::kPortable;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else LF_CHECK(false, "LENGEN_CPU_ISA must be one of portable, avx2, avx512, auto; got '" << env << "'");
  LF_CHECK(static_cast<int>(want) <= static_cast<int>(best),
           "LENGEN_CPU_ISA=" << env << " but this CPU supports at most '" << isa_name(best) << "'");
  return want;
}

}  // namespace lf
