#!/bin/sh
# CMake flags that build llama.cpp (the bench's peer) for the SIMD this CPU has, AMX excepted:
# some virtual machines list AMX in /proc/cpuinfo but fault on its instructions (SIGILL in a prefill).
f=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { case "$f" in *" $1 "*) return 0 ;; esac; return 1; }
out="-DGGML_NATIVE=OFF"
for x in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512vbmi:AVX512_VBMI \
         avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
  has "${x%%:*}" && out="$out -DGGML_${x##*:}=ON"
done
has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512cd && out="$out -DGGML_AVX512=ON"
echo "$out"
