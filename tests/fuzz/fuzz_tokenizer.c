/* fuzz_tokenizer.c - libFuzzer target for the tokenizer on untrusted text.
 *
 * Input: one flag byte, then arbitrary bytes (invalid UTF-8, NULs, partial special tokens). The
 * text is encoded with special-token parsing on or off, with one of eight tokenizers (flag bits 0, 4
 * and 5: the smollm, llama3, qwen2, deepseek-llm, deepseek-coder, falcon or default pre-tokenizer, or
 * SentencePiece over the same vocabulary),
 * decoded whole and through the streaming decoder; invariants: no crash or over-read, the id count
 * fits the answer, every id is in the vocabulary, the stream never emits an incomplete character
 * mid-stream, chat templating of the text as a message succeeds, and its prompt ids hold no special
 * token but the template's. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mkmodel.h"
#include "tokenizer.h"

#define N_TOK 8
static tok_t *g_tok[N_TOK];
static int g_vocab = 1200;

static void init(void)
{
    char **tokens, **merges;
    int n_merges;
    if (mkmodel_vocab(g_vocab, &tokens, &merges, &n_merges, NULL)) abort();
    int32_t *types = malloc(sizeof(int32_t) * (size_t)g_vocab);
    for (int i = 0; i < g_vocab; i++) types[i] = i < MKMODEL_N_SPECIAL ? TOK_TYPE_CONTROL : TOK_TYPE_NORMAL;
    const char *tmpl = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                       "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' "
                       "}}{% endif %}";
    float *scores = malloc(sizeof(float) * (size_t)g_vocab);
    for (int i = 0; i < g_vocab; i++) scores[i] = (float)-(i % 97); /* ties too */
    const char *pres[N_TOK] = {"smollm", "llama3", "qwen2", "deepseek-llm", "deepseek-coder", "falcon", "default", NULL};
    for (int k = 0; k < N_TOK; k++) {
        tok_desc_t d = {.n_vocab = g_vocab, .tokens = (const char *const *)tokens, .token_types = types,
                        .n_merges = n_merges, .merges = (const char *const *)merges, .pre = pres[k],
                        .bos_id = 1, .eos_id = 2, .unk_id = -1, .pad_id = -1, .chat_template = tmpl,
                        .spm = !pres[k], .scores = scores, .add_space_prefix = true, .special_rstrip = k == 7};
        g_tok[k] = tok_new(&d, NULL);
        if (!g_tok[k]) abort();
    }
    mkmodel_vocab_free(tokens, g_vocab, merges, n_merges);
    free(types);
    free(scores);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_tok[0]) init();
    if (size < 1 || size > 1 << 16) return 0;
    const uint8_t flags = data[0];
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;
    const tok_t *t = g_tok[(flags & 1) | ((flags >> 3) & 6)];
    /* A first call with a small buffer reports the needed count (invalid bytes become U+FFFD, up to
     * three tokens each); the second must then fit exactly. */
    int32_t probe[4];
    const int need = tok_encode(t, text, len, flags & 2, flags & 4, probe, 4);
    if (need < 0) abort();
    const int cap = need > 0 ? need : 1;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    const int n = tok_encode(t, text, len, flags & 2, flags & 4, ids, cap);
    if (n != need) abort();
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= g_vocab) abort();
    /* Whole decode: the byte length of the pieces. */
    const int dl = tok_decode(t, ids, n, flags & 8, NULL, 0);
    if (dl < 0) abort();
    char *out = malloc((size_t)dl + 1);
    if (tok_decode(t, ids, n, flags & 8, out, (size_t)dl + 1) != dl) abort();
    free(out);
    /* Streaming decode. */
    tok_stream_t s;
    tok_stream_init(&s, flags & 8);
    const size_t scap = tok_max_token_len(t) * 3 + 16;
    char *buf = malloc(scap);
    for (int i = 0; i < n; i++)
        if (tok_stream_push(&s, t, ids[i], buf, scap) < 0) abort();
    if (tok_stream_flush(&s, buf, scap) < 0) abort();
    free(buf);
    /* Chat templating with the text as content. */
    char *content = malloc(len + 1);
    memcpy(content, text, len);
    content[len] = 0;
    tok_chat_msg_t msg = {"user", content};
    const int cl = tok_chat_apply(t, &msg, 1, true, NULL, 0);
    if (cl < 0) abort();
    char *chat = malloc((size_t)cl + 1);
    if (tok_chat_apply(t, &msg, 1, true, chat, (size_t)cl + 1) != cl) abort();
    free(chat);
    /* The same chat as prompt ids: whatever the content spells, the template's markers are the only
     * special tokens (two <|im_start|>, one <|im_end|>). */
    int32_t *pids = NULL;
    int pcap = 0;
    const int pn = tok_encode_prompt(t, NULL, 0, false, &msg, 1, &pids, &pcap, NULL);
    if (pn < 0 || pn > pcap) abort();
    int starts = 0, ends = 0;
    for (int i = 0; i < pn; i++) {
        if (pids[i] < 0 || pids[i] >= g_vocab || pids[i] == 0) abort();
        starts += pids[i] == 1;
        ends += pids[i] == 2;
    }
    if (starts != 2 || ends != 1) abort();
    free(pids);
    free(content);
    free(ids);
    return 0;
}
