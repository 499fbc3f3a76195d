// NGCUDA_CLONES: plain loops get AVX-512 / AVX2 clones picked at load time, because setup.py
// compiles for baseline x86-64 (the wheel must run on any x86-64 machine).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NGCUDA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NGCUDA_CLONES
#endif
