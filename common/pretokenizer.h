/* pretokenizer.h - the pre-tokenizers of byte-level BPE vocabularies: how text is cut into words
 * before BPE, one per tokenizer.ggml.pre value, as llama.cpp's llm_tokenizer_bpe does it.
 *
 * A pre-tokenizer is a row of a table (pretokenizer.c): the GGUF names it answers to and the split
 * rules llama.cpp applies in order, each cutting every word the previous rules left into smaller ones
 * (matches and the text between them both become words). Rules are hand-written matchers for
 * llama.cpp's regexes, with llama.cpp's meaning of \s and the Unicode classes (common/unicode.h).
 * Rows are static and immutable; the functions are pure and thread-safe. */
#ifndef FOLIO_PRETOKENIZER_H
#define FOLIO_PRETOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pretok pretok_t;

/* The pre-tokenizer tokenizer.ggml.pre names, or NULL when folio has none for it. */
const pretok_t *pretok_find(const char *name);
/* The names pretok_find accepts, comma-separated, into buf (truncated to cap; for error messages). */
void pretok_names(char *buf, size_t cap);
/* llama.cpp's flags for the vocabulary: whole words found in the vocab skip BPE (ignore_merges), and
 * BOS is added when tokenizer.ggml.add_bos_token is absent. */
bool pretok_ignore_merges(const pretok_t *p);
bool pretok_add_bos(const pretok_t *p);

/* Cuts the code points cps[0..n) (their unicode_flags in fl) into words. seg_a and seg_b are scratch
 * of n entries each; the word lengths, in code points, end up in one of them, which *words points
 * to. Returns the number of words (0 for n == 0). */
int pretok_split(const pretok_t *p, const uint32_t *cps, const uint8_t *fl, int32_t n, int32_t *seg_a,
                 int32_t *seg_b, const int32_t **words);

#endif
