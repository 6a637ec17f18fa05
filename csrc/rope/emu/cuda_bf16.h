#pragma once
#include "common/half.h"
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { return lf::bf16_to_f32(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {lf::f32_to_bf16(f)}; }
