/* test_reference_kv_q8_0.c - test_reference.c with a q8_0 KV cache (K and V): greedy continuations,
 * batching, speculation and logits equal llama.cpp's with -ctk q8_0 -ctv q8_0 (flash attention on). */
#define REF_KV_TYPE "q8_0"
#include "test_reference.c"
