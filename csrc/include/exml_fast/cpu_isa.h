#pragma once
// Run-time choice between the two builds of the CPU loops: baseline x86-64 and
// AVX2 (compiled under `#pragma GCC target`). EXML_FAST_CPU_ISA=base forces the
// baseline, which lets the tests and benchmarks exercise and compare both builds.

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define EXML_FAST_X86_GNU 1
#else
#define EXML_FAST_X86_GNU 0
#endif

namespace exml_fast {

// True when the AVX2 build of the loops should run: the CPU has AVX2 (and FMA
// and F16C when `need_fma_f16c`) and EXML_FAST_CPU_ISA is not "base". Read once.
inline bool use_avx2_loops(bool need_fma_f16c = true) {
#if EXML_FAST_X86_GNU
  static const bool forced_base = [] {
    const char* isa = std::getenv("EXML_FAST_CPU_ISA");
    return isa != nullptr && std::strcmp(isa, "base") == 0;
  }();
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  static const bool fma_f16c = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return !forced_base && avx2 && (!need_fma_f16c || fma_f16c);
#else
  (void)need_fma_f16c;
  return false;
#endif
}

}  // namespace exml_fast
