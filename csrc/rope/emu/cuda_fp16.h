#pragma once
#include "common/half.h"
struct __half { uint16_t x; };
inline float __half2float(__half h) { return lf::f16_to_f32(h.x); }
inline __half __float2half_rn(float f) { return {lf::f32_to_f16(f)}; }
