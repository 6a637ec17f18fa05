// Run-time instruction-set dispatch for the CPU kernels.
// The default build targets the compiler's portable baseline (x86-64: SSE2); kernels with AVX2 or
// AVX-512 variants compile them with __attribute__((target(LF_TARGET_*))) and pick one per call
// with lf::cpu_isa(), so one wheel runs on every CPU of its architecture.
#pragma once
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define LF_X86 1
// The feature sets each variant is compiled for (and that cpu_isa() checks before choosing it).
// rope_cpu.cpp spells the AVX2 one out in a #pragma GCC target: keep the two equal.
#define LF_TARGET_AVX2 "avx2,fma,f16c,bmi,bmi2,popcnt"
#define LF_TARGET_AVX512 "avx512f,avx2,fma,f16c,bmi,bmi2,popcnt"
#define LF_TARGET_AVX512VBMI "avx512f,avx512bw,avx512vbmi,avx2,fma,f16c,bmi,bmi2,popcnt"
#else
#define LF_X86 0
#endif

namespace lf {

// Ordered: a CPU that runs a level runs every level below it.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU (and OS) supports, capped by the env var LENGEN_CPU_ISA
// (portable | avx2 | avx512 | auto; unset or empty = auto). A forced level the CPU lacks throws
// std::invalid_argument naming the variable, rather than dying later on an illegal instruction.
// The variable is read on every call, so a test can switch paths within one process.
Isa cpu_isa();
// The best level this CPU supports, ignoring LENGEN_CPU_ISA.
Isa cpu_isa_detected();
// AVX-512 VBMI (vpmultishiftqb), used by the AVX-512 counting pass; Ice Lake / Zen 4 and later.
bool cpu_has_avx512vbmi();
const char* isa_name(Isa isa);

}  // namespace lf
