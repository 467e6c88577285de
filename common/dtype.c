/* dtype.c - names and block sizes of tensor types; see dtype.h. */
#include "dtype.h"

#include <stdio.h>

bool fl_dtype_supported(int type)
{
    switch (type) {
    case FL_TYPE_F32: case FL_TYPE_F16: case FL_TYPE_BF16:
    case FL_TYPE_Q4_0: case FL_TYPE_Q4_1: case FL_TYPE_Q8_0:
        return true;
    default:
        return false;
    }
}

const char *fl_dtype_name(int type)
{
    switch (type) {
    case FL_TYPE_F32: return "F32";
    case FL_TYPE_F16: return "F16";
    case FL_TYPE_BF16: return "BF16";
    case FL_TYPE_Q4_0: return "Q4_0";
    case FL_TYPE_Q4_1: return "Q4_1";
    case FL_TYPE_Q8_0: return "Q8_0";
    case FL_TYPE_Q8_1: return "Q8_1";
    default: return "unknown";
    }
}

int64_t fl_dtype_block_elems(int type)
{
    switch (type) {
    case FL_TYPE_F32: case FL_TYPE_F16: case FL_TYPE_BF16: return 1;
    case FL_TYPE_Q4_0: case FL_TYPE_Q4_1: case FL_TYPE_Q8_0: case FL_TYPE_Q8_1: return FL_QK;
    default: return 0;
    }
}

size_t fl_dtype_block_bytes(int type)
{
    switch (type) {
    case FL_TYPE_F32: return 4;
    case FL_TYPE_F16: case FL_TYPE_BF16: return 2;
    case FL_TYPE_Q4_0: return sizeof(fl_block_q4_0_t);
    case FL_TYPE_Q4_1: return sizeof(fl_block_q4_1_t);
    case FL_TYPE_Q8_0: return sizeof(fl_block_q8_0_t);
    case FL_TYPE_Q8_1: return sizeof(fl_block_q8_1_t);
    default: return 0;
    }
}

size_t fl_dtype_row_bytes(int type, int64_t n)
{
    const int64_t be = fl_dtype_block_elems(type);
    if (be <= 0 || n < 0 || n % be) return 0;
    return (size_t)(n / be) * fl_dtype_block_bytes(type);
}
