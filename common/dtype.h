/* dtype.h - tensor element types (numbered as GGUF/ggml numbers them) and their block layouts.
 *
 * Quantized types store blocks of FL_QK elements:
 *   Q4_0: f16 d, 16 bytes of nibbles           x = d * (q - 8)      (18 bytes / 32)
 *   Q4_1: f16 d, f16 m, 16 bytes of nibbles    x = d * q + m        (20 bytes / 32)
 *   Q8_0: f16 d, 32 int8                        x = d * q            (34 bytes / 32)
 *   Q8_1: f32 d, f32 s (= d * sum q), 32 int8   activations only     (40 bytes / 32)
 * Nibble order: byte j holds element j in its low nibble and element j+16 in its high nibble. */
#ifndef FOLIO_DTYPE_H
#define FOLIO_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
#define _Static_assert static_assert
extern "C" {
#endif

typedef enum {
    FL_TYPE_F32 = 0,
    FL_TYPE_F16 = 1,
    FL_TYPE_Q4_0 = 2,
    FL_TYPE_Q4_1 = 3,
    FL_TYPE_Q8_0 = 8,
    FL_TYPE_Q8_1 = 9,
    FL_TYPE_BF16 = 30,
    FL_TYPE_COUNT = 40, /* upper bound of ggml type numbers folio knows the name of */
} fl_dtype_t;

#define FL_QK 32

typedef uint16_t fl_f16_t;
typedef uint16_t fl_bf16_t;

typedef struct { fl_f16_t d; uint8_t qs[FL_QK / 2]; } fl_block_q4_0_t;
typedef struct { fl_f16_t d, m; uint8_t qs[FL_QK / 2]; } fl_block_q4_1_t;
typedef struct { fl_f16_t d; int8_t qs[FL_QK]; } fl_block_q8_0_t;
typedef struct { float d, s; int8_t qs[FL_QK]; } fl_block_q8_1_t;

_Static_assert(sizeof(fl_block_q4_0_t) == 18, "q4_0 block");
_Static_assert(sizeof(fl_block_q4_1_t) == 20, "q4_1 block");
_Static_assert(sizeof(fl_block_q8_0_t) == 34, "q8_0 block");
_Static_assert(sizeof(fl_block_q8_1_t) == 40, "q8_1 block");

/* True for the types folio can load as weights. */
bool fl_dtype_supported(int type);
/* "Q4_1"; "type 17" style names are written into buf for unknown numbers (buf may be NULL: "?"). */
const char *fl_dtype_name(int type);
/* Elements per block (1 for plain types) and bytes per block; 0 for unsupported types. */
int64_t fl_dtype_block_elems(int type);
size_t fl_dtype_block_bytes(int type);
/* Bytes of a row of n elements, or 0 when n is not a multiple of the block size / type unknown. */
size_t fl_dtype_row_bytes(int type, int64_t n);

static inline float fl_f16_to_f32(fl_f16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even, as F16C's vcvtps2ph with rounding mode 0 does. */
static inline fl_f16_t fl_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (fl_f16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) return (fl_f16_t)(sign | 0x7c00); /* overflow to inf */
    if (absx < 0x38800000u) { /* subnormal or zero in f16 */
        if (absx < 0x33000000u) return (fl_f16_t)sign;
        const uint32_t e = absx >> 23, m = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e; /* value / 2^-24 = m >> shift */
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        uint32_t q = m >> shift;
        if (rem > half || (rem == half && (q & 1))) q++;
        return (fl_f16_t)(sign | q);
    }
    uint32_t h = ((absx >> 13) - ((127 - 15) << 10));
    const uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (fl_f16_t)(sign | h);
}

static inline float fl_bf16_to_f32(fl_bf16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline fl_bf16_t fl_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (fl_bf16_t)((x >> 16) | 64); /* quiet NaN */
    return (fl_bf16_t)((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

#ifdef __cplusplus
}
#endif

#endif
