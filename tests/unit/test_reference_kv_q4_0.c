/* test_reference_kv_q4_0.c - test_reference.c with a q4_0 KV cache (K and V): greedy continuations,
 * batching, speculation and logits equal llama.cpp's with -ctk q4_0 -ctv q4_0 (flash attention on). */
#define REF_KV_TYPE "q4_0"
#include "test_reference.c"
